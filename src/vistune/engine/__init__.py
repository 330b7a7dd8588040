"""Training and evaluation engine (re-exports)."""

from vistune.engine.evaluate import evaluate
from vistune.engine.trainer import evaluate_file, prepare, train

__all__ = ["evaluate", "evaluate_file", "prepare", "train"]
