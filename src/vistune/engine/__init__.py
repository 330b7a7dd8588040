"""The training engine: one loop (``loop.fit``) for every task, its checkpoints, callbacks,
output-folder protection and data parallelism. See ``engine/loop.py`` for how training works."""

from vistune.engine.callbacks import Callback, FitState
from vistune.engine.distributed import Dist, init_distributed
from vistune.engine.loop import DivergedError, StopFit, fit

__all__ = ["Callback", "Dist", "DivergedError", "FitState", "StopFit", "fit", "init_distributed"]
