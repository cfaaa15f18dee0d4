#!/usr/bin/env python3
"""Run the benchmark suite and write benchmarks/results/<date>-<device>.json (+ a PNG with --plot).

Same arguments as ``m2pt bench`` / ``python -m m2pt_kernels.bench`` (see ``--help``); this script
only makes it work from a bare checkout (no install) and defaults the output into this folder.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from m2pt_kernels import bench  # noqa: E402


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--out" not in argv and "--no-save" not in argv:
        import torch
        dev = torch.device("cuda" if torch.cuda.is_available() and "--device" not in argv else
                           (argv[argv.index("--device") + 1] if "--device" in argv else "cpu"))
        out = os.path.join(HERE, "results", os.path.basename(bench.default_out(dev)).replace("m2pt-bench-", ""))
        argv += ["--out", out]
    return bench.main(argv)


if __name__ == "__main__":
    sys.exit(main())
