"""``python -m vistune`` (what ``torchrun -m vistune ...`` runs on every rank)."""

import sys

from vistune.cli import main

try:
    code = main()
finally:
    from vistune.engine.distributed import shutdown_current

    shutdown_current()  # leave the process group cleanly (a no-op outside torchrun)
sys.exit(code)
