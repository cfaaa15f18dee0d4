"""pytest-benchmark suites: ``python -m pytest benchmarks`` (CPU: seconds; GPU: set M2PT_BENCH_FULL=1
for the ViT-B/L shapes). These give pytest-benchmark's statistics; the side-by-side results JSON,
targets and plot come from ``benchmarks/run.py``."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")
if not torch.cuda.is_available():
    torch.set_num_threads(1)  # steadier on small shared CPUs
