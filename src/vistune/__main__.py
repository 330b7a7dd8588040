"""``python -m vistune`` (what ``torchrun -m vistune ...`` runs on every rank)."""

import sys

from vistune.cli import main

try:
    code = main()
finally:
    # leave the process group cleanly (a no-op outside torchrun); a command that never imported
    # torch.distributed has no group, and importing the engine here to find that out would add
    # seconds of torch/torchvision imports to --help and to every one-line input error
    if "torch.distributed" in sys.modules:
        from vistune.engine.distributed import shutdown_current

        shutdown_current()
sys.exit(code)
