#!/usr/bin/env python3
"""Draw a results JSON: ``python benchmarks/plot.py RESULTS.json [-o PLOT.png] [--markdown]``.

The PNG shows time relative to ``plain`` against M, one line per provider, one panel per layer
(``m2pt_kernels.bench.plot_results``); ``--markdown`` prints the README table
(``m2pt_kernels.bench.markdown_table``). Default PNG path: the JSON's path with ``.png``.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from m2pt_kernels.bench import markdown_table, plot_results, validate_results  # noqa: E402

__all__ = ["markdown_table", "plot_results", "main"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="a results JSON written by benchmarks/run.py")
    p.add_argument("-o", "--out", default=None, help="PNG path (default: RESULTS with .png)")
    p.add_argument("--group", default=None,
                   help="model,dtype,pass,aux e.g. vit_b16,bf16,fwd+bwd,trainable (default: the main group)")
    p.add_argument("--markdown", action="store_true", help="also print the markdown table")
    args = p.parse_args(argv)
    try:
        with open(args.results) as f:
            res = json.load(f)
    except (OSError, ValueError) as exc:
        p.error(f"cannot read {args.results}: {exc}")
    if isinstance(res, dict) and res.get("kind") == "cpu_overhead":
        p.error(f"{args.results} is a benchmarks/cpu_overhead.py result (a table of call-path variants, no "
                "cases to plot); its own table: python benchmarks/cpu_overhead.py --help")
    try:
        validate_results(res)
    except ValueError as exc:
        p.error(f"{args.results} is not a results file of m2pt bench / benchmarks/run.py: {exc}")
    groups = sorted({(c["model"], c["dtype"], c["pass"], "trainable" if c["aux_trainable"] else "frozen")
                     for c in res["cases"] if c["ms"].get("plain")})
    shown = "; ".join(",".join(g) for g in groups) or "none (no case has a 'plain' time)"
    group = None
    if args.group:
        parts = [v.strip() for v in args.group.split(",")]
        if len(parts) != 4 or tuple(parts) not in groups:
            p.error(f"--group {args.group!r} is not a group of this file; its groups: {shown}")
        model, dtype, pas, aux = parts
        group = (model, dtype, pas, aux == "trainable")
    elif not groups:
        p.error(f"{args.results}: nothing to plot: {shown}")
    out = args.out or os.path.splitext(args.results)[0] + ".png"
    plot_results(res, out, group)
    print(f"plot: {out}")
    if args.markdown:
        print(markdown_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
