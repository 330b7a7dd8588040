"""SPT stage A: per-parameter sensitivity, its allocation at a parameter budget, score files, a picture.

SPT (He et al., ICCV 2023; METHODS.md §2) spends a fixed budget of trainable parameters where the
task needs them. A one-shot pass measures each backbone weight's *sensitivity*
s = Σ_batches (∂L/∂w)² (the squared first-order loss change of one gradient step); a global top-k
over those scores marks entries as sensitive; each weight matrix then gets either a structured
module (LoRA or an adapter) when enough of it is sensitive, or exactly its sensitive entries as an
unstructured (sparse) delta. This module does everything up to that decision; ``methods/spt.py``
turns an :class:`Allocation` into modules.

What differs from the reference code, and why
---------------------------------------------
* **Eval mode during the pass.** The reference runs the model in train mode (drop-path 0.1). We run
  it in eval mode: the scores become deterministic (so a score file is reproducible), BatchNorm
  running statistics are not disturbed (they are part of the backbone's fingerprint), and it is the
  mode the frozen backbone runs in while SPT trains (``TunedModel`` keeps it in eval mode).
* **Only the candidate pool gets gradients.** Excluded tensors (head, CLS/register tokens, patch and
  position embeddings) cannot be allocated, so computing their gradients would only cost time.
* **Exact budget search.** The reference scans τ on a 0.02 M grid and keeps the closest; realised
  budgets then miss targets by up to 25 %. We find the top-k size whose realised count is the
  closest to the target exactly (see :class:`Allocator`).
* **Any pool tensor.** Besides the reference's q/k/v/proj/fc matrices and norm/bias vectors, every
  other backbone tensor competes too: CNN convolutions (structured = LoRA or adapter on the conv),
  LayerScale gammas, BatchNorm affine vectors. Tensors no structured module fits (e.g. conv
  subclasses that transform their weight) can still be tuned unstructured.
* **Only positive scores are sensitive.** An entry whose gradient was exactly zero on every batch
  is never selected, however large the budget; the allocation then reports the shortfall.

On a ViT, timm's fused ``attn.qkv`` is split into its q/k/v row blocks for scoring and allocation:
each third is its own matrix with its own LoRA/adapter decision, and the fused bias splits into
three vectors likewise.
"""

from vistune.sensitivity.allocate import (
    STRUCTURED_TYPES,
    Allocation,
    Allocator,
    UnitChoice,
    allocate,
    check_budget,
    parse_budget,
)
from vistune.sensitivity.plot import plot_allocation
from vistune.sensitivity.scores import (
    SCORES_FORMAT,
    SensitivityError,
    Unit,
    accumulate_sensitivity,
    backbone_param_count,
    compute_sensitivity,
    excluded_parameters,
    load_scores,
    pool_parameters,
    pool_units,
    read_scores,
    save_scores,
)

__all__ = [
    "SCORES_FORMAT", "STRUCTURED_TYPES", "Allocation", "Allocator", "SensitivityError", "Unit", "UnitChoice",
    "accumulate_sensitivity", "allocate", "backbone_param_count", "check_budget", "compute_sensitivity",
    "excluded_parameters", "load_scores", "parse_budget", "plot_allocation", "pool_parameters", "pool_units",
    "read_scores", "save_scores",
]
