"""``python -m m2pt_kernels`` is the ``m2pt`` command."""
import sys

from .cli import main

sys.exit(main())
