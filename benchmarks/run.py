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
    return bench.main(argv, results_dir=os.path.join(HERE, "results"))


if __name__ == "__main__":
    sys.exit(main())
