"""``python -m vistune`` (what ``torchrun -m vistune ...`` runs on every rank)."""

import sys

from vistune.cli import main

sys.exit(main())
