"""``python -m distill ...`` (and ``torchrun -m distill ...``): the command line."""

import sys

from distill.cli import main

sys.exit(main())
