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

from __future__ import annotations

import itertools
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vistune.backbones import VIT_MATRICES, backbone_info, head_parameters, is_vit, vit_block_linears
from vistune.errors import MethodError
from vistune.io import read_with_json_meta, save_atomic

SCORES_FORMAT = "vistune.sensitivity/1"
_SCORES_META_KEY = "vistune.sensitivity"
STRUCTURED_TYPES = ("lora", "adapter", "none")


class SensitivityError(MethodError):
    """Sensitivity scores cannot be computed, read or used as asked (wrong backbone, bad budget...)."""


# ------------------------------------------------------------------------------------------------
# The candidate pool


def excluded_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Backbone tensors SPT never tunes: the head, prefix tokens, patch and position embeddings.

    Found structurally: the classifier timm reports, the token parameters and the patch-embedding
    module the model owns. The head is re-initialised per task and always trained; the
    embeddings are excluded as in the reference (their sensitivity would be dominated by the
    input statistics, and the CLS token is a per-task choice, not a budget item).
    """
    out: list[nn.Parameter] = list(head_parameters(model))
    for attr in ("cls_token", "reg_token", "dist_token", "pos_embed", "patch_embed"):
        obj = getattr(model, attr, None)
        if isinstance(obj, nn.Parameter):
            out.append(obj)
        elif isinstance(obj, nn.Module):
            out.extend(obj.parameters())
    return out


def pool_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every backbone tensor that competes for the budget, in model order."""
    excluded = {id(p) for p in excluded_parameters(model)}
    return [(n, p) for n, p in model.named_parameters() if id(p) not in excluded]


@dataclass(frozen=True)
class Unit:
    """One item of the allocation: a weight matrix, a q/k/v third of a fused qkv weight, a vector
    (or a third of a fused qkv bias), or any other tensor.

    A unit is a contiguous range ``[start, start + numel)`` of its parameter's flattened entries
    (row blocks of a row-major matrix or of a conv weight ``(out, in/g, kh, kw)`` are contiguous),
    viewed as ``rows × cols``. ``host`` says which structured module fits it (``"linear"``,
    ``"conv"`` or ``None``); ``block``/``mtype`` place ViT matrices on the heat-map.
    """

    param: str
    module: str
    attr: str
    kind: str  # "matrix" | "vector" | "tensor"
    part: str  # "all", or "q"/"k"/"v" for a third of a fused qkv
    start: int
    rows: int
    cols: int
    host: str | None = None
    in_features: int = 0  # input width the host reads (LoRA's A, a parallel adapter's down)
    parallel: bool = False  # adapter placement: beside the host on its input (proj) vs on its output
    block: int | None = None
    mtype: str | None = None

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def label(self) -> str:
        return self.param if self.part == "all" else f"{self.param}[{self.part}]"

    def structured_size(self, structured: str, rank: int) -> int | None:
        """Parameters of the structured module this unit would get, or None when none fits.

        LoRA: r·(in + out). Adapter: down (in·r + r) + up (r·out + out), where ``in`` is the
        matrix's own output width for the sequential adapter (2·out·r + r + out, METHODS.md §2.1)
        and the host's input width for the parallel one on ``proj``. A structured module that is
        not smaller than the matrix itself would buy nothing, so it is never chosen.
        """
        if self.kind != "matrix" or self.host is None or structured == "none":
            return None
        size = self.module_size(structured, rank)
        return size if size < self.numel else None

    def module_size(self, structured: str, rank: int) -> int:
        """Parameters of a ``structured`` module of ``rank`` on this unit (no eligibility check)."""
        if structured == "lora":
            return rank * (self.in_features + self.rows)
        if structured == "adapter":
            width = self.in_features if self.parallel else self.rows
            return width * rank + rank + rank * self.rows + self.rows
        raise SensitivityError(f"structured must be 'lora' or 'adapter' for a module, got {structured!r}")


def _owner_map(model: nn.Module) -> dict[int, tuple[str, nn.Module, str]]:
    """id(parameter) → (module name, module, attribute) of the module that registered it."""
    owners: dict[int, tuple[str, nn.Module, str]] = {}
    for mname, module in model.named_modules():
        for attr, p in module._parameters.items():
            if p is not None and id(p) not in owners:
                owners[id(p)] = (mname, module, attr)
    return owners


def pool_units(model: nn.Module) -> list[Unit]:
    """The allocation units of ``model``'s pool, in model order.

    Works from shapes only, so a model on the ``meta`` device (e.g. ViT-B geometry for counting)
    is fine.
    """
    owners = _owner_map(model)
    vit_parts: dict[int, list[tuple[str, slice, int]]] = {}  # id(Linear) → [(mtype, rows, block)]
    block_of: dict[int, int] = {}  # id(module) → index of the ViT block holding it
    if is_vit(model):
        for bi, block in enumerate(model.blocks):
            for m in block.modules():
                block_of[id(m)] = bi
            for mtype, (lin, sl) in vit_block_linears(block).items():
                vit_parts.setdefault(id(lin), []).append((mtype, sl, bi))
    units: list[Unit] = []
    for name, p in pool_parameters(model):
        mname, module, attr = owners[id(p)]
        parts = vit_parts.get(id(module))
        if p.dim() <= 1:
            length = p.numel()
            if parts and attr == "bias" and len(parts) > 1:  # fused qkv bias → q/k/v vectors
                for mtype, sl, bi in sorted(parts, key=lambda t: t[1].start):
                    units.append(Unit(name, mname, attr, "vector", mtype, sl.start, sl.stop - sl.start, 1,
                                      block=bi, mtype=None))
            else:
                units.append(Unit(name, mname, attr, "vector", "all", 0, length, 1,
                                  block=block_of.get(id(module))))
            continue
        rows = p.shape[0]
        cols = p.numel() // max(rows, 1)
        is_linear = isinstance(module, nn.Linear) and attr == "weight"
        # Only a plain Conv2d computes conv(x, W) with W as stored, which LoRA/adapters assume.
        is_conv = type(module) is nn.Conv2d and attr == "weight"
        if is_linear:
            host, in_features = "linear", module.in_features
        elif is_conv:
            host, in_features = "conv", cols
        else:
            host, in_features = None, cols
        if is_linear and parts:
            for mtype, sl, bi in sorted(parts, key=lambda t: t[1].start):
                part = mtype if len(parts) > 1 else "all"
                units.append(Unit(name, mname, attr, "matrix", part, sl.start * cols, sl.stop - sl.start, cols,
                                  host, in_features, mtype == "proj", bi, mtype))
        else:
            kind = "matrix" if host is not None else "tensor"
            units.append(Unit(name, mname, attr, kind, "all", 0, rows, cols, host, in_features,
                              block=block_of.get(id(module))))
    return units


def backbone_param_count(model: nn.Module) -> int:
    """Backbone parameters (head excluded): the base of percentage budgets, as in parameter_report."""
    head = {id(p) for p in head_parameters(model)}
    return sum(p.numel() for p in model.parameters() if id(p) not in head)


# ------------------------------------------------------------------------------------------------
# Stage A: sensitivity


def compute_sensitivity(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int = 16,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Σ over the first ``num_batches`` batches of (∂L/∂w)², per entry of every pool parameter.

    ``model`` is a plain timm model with a freshly initialised head for the task's classes (the
    gradients flow through that head, as in the reference); ``batches`` yields ``(images,
    labels)`` already on the model's device, in a fixed order (the reference uses the training
    split unshuffled, batch 32, 16 batches). ``loss_fn(logits, labels)`` defaults to
    cross-entropy. Keys of the result are parameter names; values have the parameters' shapes,
    in float32 (float64 for a float64 model).

    Memory: the score tensors are the only extra copy of the parameters. Each gradient is folded
    into its score as soon as autograd has accumulated it (a post-accumulate-grad hook) and then
    dropped, so the gradients of the whole model never coexist.

    The model is run in eval mode (see the module docstring) and left exactly as found:
    ``requires_grad`` flags, every module's train/eval flag and any existing ``.grad`` tensors
    are restored, also when a batch raises.
    """
    if num_batches < 1:
        raise SensitivityError(f"num_batches must be >= 1, got {num_batches}")
    if isinstance(classifier := model.get_classifier(), nn.Identity) or not list(classifier.parameters()):
        raise SensitivityError(
            "sensitivity needs a classification head (cross-entropy over the task's classes): "
            "call model.reset_classifier(num_classes) first"
        )
    loss_fn = loss_fn or F.cross_entropy
    pool = pool_parameters(model)
    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    saved_grads = [p.grad for p in params]
    saved_modes = [(m, m.training) for m in model.modules()]
    scores: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for p in params:
            p.grad = None
            p.requires_grad_(False)
        for name, p in pool:
            score = torch.zeros(p.shape, dtype=torch.promote_types(p.dtype, torch.float32), device=p.device)
            scores[name] = score
            p.requires_grad_(True)
            handles.append(p.register_post_accumulate_grad_hook(_fold_into(score)))
        model.eval()
        seen = 0
        for batch in itertools.islice(batches, num_batches):
            images, labels = batch[0], batch[1]
            loss = loss_fn(model(images), labels)
            loss.backward()
            seen += 1
    finally:
        for h in handles:
            h.remove()
        for p, flag, grad in zip(params, saved_flags, saved_grads):
            p.requires_grad_(flag)
            p.grad = grad
        for m, mode in saved_modes:
            m.training = mode
    if seen == 0:
        raise SensitivityError("sensitivity: the batch iterable yielded no batches")
    if seen < num_batches:
        warnings.warn(f"sensitivity: only {seen} of the requested {num_batches} batches were available",
                      stacklevel=2)
    return scores


def _fold_into(score: torch.Tensor) -> Callable[[torch.Tensor], None]:
    def hook(p: torch.Tensor) -> None:
        g = p.grad
        if g.dtype != score.dtype:
            g = g.to(score.dtype)
        score.addcmul_(g, g)
        p.grad = None

    return hook


# ------------------------------------------------------------------------------------------------
# Score files


def save_scores(
    path: str | os.PathLike,
    scores: dict[str, torch.Tensor],
    model: nn.Module,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write scores to a safetensors file whose metadata names the backbone it was computed on.

    Stored with the scores: backbone name/arch and weights fingerprint (so a file computed on other
    weights is refused at load), plus ``meta`` (e.g. ``num_batches``, ``batch_size``, ``seconds``).
    The write is atomic. Keys must be exactly the model's pool parameter names.
    """
    from vistune.tuning import fingerprint

    _check_keys(scores, model, f"scores for {Path(path)}")
    info = backbone_info(model)
    record = {
        "format": SCORES_FORMAT,
        "backbone": {"name": info.name, "arch": info.arch, "fingerprint": fingerprint(model)},
        **(meta or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in scores.items()}
    return save_atomic(tensors, path, {_SCORES_META_KEY: json.dumps(record)})


def read_scores(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Metadata and score tensors of a file, without checking which backbone they fit."""
    return read_with_json_meta(path, _SCORES_META_KEY, SCORES_FORMAT, SensitivityError, "sensitivity file",
                               "save_scores()")


def load_scores(path: str | os.PathLike, model: nn.Module) -> dict[str, torch.Tensor]:
    """Scores from ``path``, refused unless they were computed on this architecture and these weights.

    Sensitivity is a property of the pre-trained weights: scores of other weights (or of the same
    architecture at another image size, which resamples the position embeddings) would allocate
    the budget to the wrong entries without any visible error, so the fingerprint must match.
    A model on the ``meta`` device (no values) skips the fingerprint check.
    """
    from vistune.tuning import fingerprint

    meta, scores = read_scores(path)
    want = meta.get("backbone", {})
    info = backbone_info(model)
    if want.get("arch") != info.arch:
        raise SensitivityError(f"sensitivity file {path} was computed on {want.get('arch')!r}, not {info.arch!r}")
    fp = fingerprint(model)
    if "meta" not in (fp, want.get("fingerprint")) and want.get("fingerprint") != fp:
        raise SensitivityError(
            f"sensitivity file {path} was computed on {want.get('name')!r} weights with fingerprint "
            f"{str(want.get('fingerprint'))[:16]}…, but this backbone's fingerprint is {fp[:16]}… "
            "(other pre-trained weights or image size): recompute it with `vistune sensitivity`"
        )
    _check_keys(scores, model, f"sensitivity file {path}")
    return scores


def _check_keys(scores: dict[str, torch.Tensor], model: nn.Module, what: str) -> None:
    pool = dict(pool_parameters(model))
    missing = sorted(set(pool) - set(scores))
    unexpected = sorted(set(scores) - set(pool))
    if missing or unexpected:
        raise SensitivityError(
            f"{what} do not match this backbone's candidate pool: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    for name, p in pool.items():
        if tuple(scores[name].shape) != tuple(p.shape):
            raise SensitivityError(f"{what}: {name!r} has shape {tuple(scores[name].shape)}, "
                                   f"the parameter has {tuple(p.shape)}")


# ------------------------------------------------------------------------------------------------
# Budgets

_BUDGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmM%]?)\s*$")


def check_budget(budget: str | int | float) -> None:
    """Syntax check only: a percentage needs the backbone to become a count, so any positive
    percentage passes here (a huge stand-in backbone) and tiny ones fail at allocation."""
    parse_budget(budget, backbone_params=10**15)


def parse_budget(budget: str | int | float, backbone_params: int) -> int:
    """``400000``, ``"400k"``, ``"0.4M"`` → 400000; ``"0.5%"`` → 0.5 % of ``backbone_params``."""
    text = str(budget).replace("_", "").replace(",", "")
    m = _BUDGET_RE.match(text)
    if m is None:
        raise SensitivityError(f"budget {budget!r} is not a count (400000, 400k, 0.4M) or a percentage (0.5%)")
    value, suffix = float(m.group(1)), m.group(2).lower()
    if suffix == "%":
        count = backbone_params * value / 100.0
    else:
        count = value * {"": 1, "k": 1e3, "m": 1e6}[suffix]
    count = int(round(count))
    if count < 1:
        raise SensitivityError(f"budget {budget!r} is less than one parameter")
    return count


# ------------------------------------------------------------------------------------------------
# Allocation


@dataclass
class UnitChoice:
    """What one unit gets: ``structured``, ``unstructured`` (its ``indices``), ``whole`` or ``none``."""

    unit: Unit
    mode: str
    params: int
    sensitive: int | None = None  # n(W): its entries among the top-k (unknown when rebuilt from a file)
    indices: torch.Tensor | None = None  # unstructured: sorted flat indices relative to the unit


@dataclass
class Allocation:
    """The outcome of stage A at one budget: a choice per unit, plus how it was reached."""

    arch: str
    structured_type: str
    rank: int
    alpha: float
    beta: float
    choices: list[UnitChoice]
    target: int | None = None
    threshold: float | None = None  # sensitive ⇔ score >= threshold
    num_sensitive: int | None = None  # k: entries of the pool at or above the threshold
    max_realisable: int | None = None
    pool_size: int = 0
    backbone_params: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def _params(self, mode: str, kind: str | None = None) -> int:
        return sum(c.params for c in self.choices
                   if c.mode == mode and (kind is None or (c.unit.kind == "vector") == (kind == "vector")))

    @property
    def realised(self) -> int:
        """Tuned parameters the allocation costs (head excluded), as TunedModel will count them."""
        return sum(c.params for c in self.choices)

    def structured_units(self) -> list[Unit]:
        return [c.unit for c in self.choices if c.mode == "structured"]

    def whole_params(self) -> list[str]:
        """Names of vectors tuned whole that are entire parameters (marked trainable as they are)."""
        return [c.unit.param for c in self.choices
                if c.mode == "whole" and c.unit.start == 0 and c.unit.numel == _param_numel(self, c.unit.param)]

    def sparse_indices(self) -> dict[str, torch.Tensor]:
        """Parameter name → sorted flat indices tuned through a sparse delta.

        Unstructured entries, plus whole vectors that are only part of a parameter (a third of a
        fused qkv bias): those cannot be marked trainable on their own, and a delta over their
        whole range costs the same parameters.
        """
        whole = set(self.whole_params())
        out: dict[str, list[torch.Tensor]] = {}
        for c in self.choices:
            u = c.unit
            if c.mode == "unstructured":
                out.setdefault(u.param, []).append(c.indices.to(torch.long) + u.start)
            elif c.mode == "whole" and u.param not in whole:
                out.setdefault(u.param, []).append(torch.arange(u.start, u.start + u.numel, dtype=torch.long))
        return {k: torch.sort(torch.cat(v)).values for k, v in out.items()}

    def summary(self) -> dict[str, Any]:
        """Plain numbers for logs, the CLI and reports."""
        structured = [c for c in self.choices if c.mode == "structured"]
        return {
            "arch": self.arch,
            "structured_type": self.structured_type,
            "rank": self.rank,
            "alpha": self.alpha,
            "beta": self.beta,
            "target": self.target,
            "realised": self.realised,
            "realised_over_target": (self.realised / self.target) if self.target else None,
            "max_realisable": self.max_realisable,
            "structured_params": self._params("structured"),
            "unstructured_params": self._params("unstructured", "matrix"),
            "unstructured_vector_params": self._params("unstructured", "vector"),
            "vector_params": self._params("whole"),
            "num_structured": len(structured),
            "num_unstructured_tensors": sum(c.mode == "unstructured" for c in self.choices),
            "num_whole_vectors": sum(c.mode == "whole" for c in self.choices),
            "structured_matrices": [c.unit.label for c in structured],
            "threshold": self.threshold,
            "num_sensitive": self.num_sensitive,
            "pool_size": self.pool_size,
            "backbone_params": self.backbone_params,
        }


def _param_numel(alloc: Allocation, param: str) -> int:
    return max(c.unit.start + c.unit.numel for c in alloc.choices if c.unit.param == param)


def _min_count(size: int, divisor: float) -> int:
    """Smallest integer n with n ≥ size/divisor, without float rounding surprises."""
    n = max(0, math.ceil(size / divisor))
    while n > 0 and (n - 1) * divisor >= size:
        n -= 1
    while n * divisor < size:
        n += 1
    return n


@dataclass
class _Ranked:
    unit: Unit
    flat: torch.Tensor  # the unit's scores, flattened (a view)
    cap: int | None  # n at which the unit jumps to structured/whole; None = never
    jump: int  # parameters once it has jumped
    values: torch.Tensor  # its top scores (> 0), descending
    indices: torch.Tensor  # their flat positions in the unit
    complete: bool  # values hold every positive entry up to the cap (not cut by a budget limit)


@dataclass
class _Events:
    """All units' ranked entries merged in descending score order (stable, so each unit's own
    order is kept), with the unit each belongs to and the realised-count increment it causes."""

    values: torch.Tensor
    unit: torch.Tensor
    incr: torch.Tensor
    realised: torch.Tensor  # cumulative sum of incr

    def valid(self) -> torch.Tensor:
        """Positions that end a tie group: a threshold cannot separate equal scores."""
        last = torch.ones(len(self.values), dtype=torch.bool)
        if len(self.values) > 1:
            last[:-1] = self.values[:-1] != self.values[1:]
        return last


class Allocator:
    """Allocation of one score set at any number of budgets (the ranking is done once).

    For a threshold t, n(W) = #entries of W with score ≥ t. A matrix costs P_struct(W) when
    n(W) ≥ P_struct(W)/α, else n(W); a vector costs its length when n ≥ len/β, else n. Each unit's
    cost is non-decreasing in n, so the realised count is a monotone step function of the top-k
    size: it rises by one per sensitive entry and jumps when a unit turns structured/whole. Only
    each unit's top ``cap`` scores can change its cost, so we keep just those, merge them into one
    ranked event list with the cost increment each event causes, and a cumulative sum gives the
    realised count at every possible k. The closest to the target is then exact (ties go to the
    smaller count), not a grid scan. Every event raises the count by at least one, so events past
    the target's rank cannot matter: units no structured module fits keep only target+1 entries.

    The closest top-k can still miss the target by up to half a jump (a LoRA on a ViT-B fc matrix
    turns ~3k sensitive entries into 30,720 parameters). ``fill=True`` goes beyond the paper to
    honour the budget: it takes the largest top-k at or under the target, then walks on down the
    ranking taking every entry whose cost still fits (a single entry, or a unit's jump to
    structured if the whole module fits), skipping units whose jump does not. Each unit still
    obeys the α/β rules for the entries it holds; only the global top-k property is relaxed.
    """

    def __init__(
        self,
        model: nn.Module,
        scores: dict[str, torch.Tensor],
        structured: str = "lora",
        alpha: float = 10.0,
        beta: float = 5.0,
        rank: int = 8,
    ) -> None:
        if structured not in STRUCTURED_TYPES:
            raise SensitivityError(f"structured must be one of {STRUCTURED_TYPES}, got {structured!r}")
        if alpha <= 0 or beta <= 0 or rank < 1:
            raise SensitivityError(f"need alpha > 0, beta > 0 and rank >= 1 (got {alpha}, {beta}, {rank})")
        _check_keys(scores, model, "scores")
        self.arch = backbone_info(model).arch
        self.structured, self.alpha, self.beta, self.rank = structured, float(alpha), float(beta), int(rank)
        self.units = pool_units(model)
        self.backbone_params = backbone_param_count(model)
        self.pool_size = sum(u.numel for u in self.units)
        self._scores = scores
        self._ranked: list[_Ranked | None] = [None] * len(self.units)
        self._limit = 0  # every entry of _ranked is valid for budgets up to this many events

    def _rank_unit(self, u: Unit, limit: int) -> _Ranked:
        flat = self._scores[u.param].detach().reshape(-1)[u.start:u.start + u.numel]
        if u.kind == "vector":
            cap, jump = _min_count(u.numel, self.beta), u.numel
        else:
            size = u.structured_size(self.structured, self.rank)
            cap, jump = (None, 0) if size is None else (_min_count(size, self.alpha), size)
        if cap is not None and cap > u.numel:
            cap = None
        need = min(u.numel, cap if cap is not None else u.numel)
        keep = min(need, limit)
        cpu = flat.to("cpu")
        values, idx = torch.topk(cpu, keep, sorted=True) if keep else (cpu[:0], torch.zeros(0, dtype=torch.long))
        if torch.isnan(values).any():
            raise SensitivityError(f"scores of {u.label} contain NaN")
        positive = values > 0
        complete = keep == need or not bool(positive.all())
        return _Ranked(u, flat, cap, jump, values[positive], idx[positive], complete)

    def _ranking(self, limit: int) -> list[_Ranked]:
        """Each unit's top entries; a larger limit re-ranks only the units the old one cut short."""
        if limit > self._limit:
            for i, u in enumerate(self.units):
                r = self._ranked[i]
                if r is None or not r.complete:
                    self._ranked[i] = self._rank_unit(u, limit)
            self._limit = limit
        return list(self._ranked)

    @staticmethod
    def _events(ranked: list[_Ranked]) -> _Events:
        values, incr, owner = [], [], []
        for i, r in enumerate(ranked):
            n = len(r.values)
            step = torch.ones(n, dtype=torch.long)
            if r.cap is not None and r.cap <= n:
                step[r.cap - 1] = r.jump - (r.cap - 1)
            values.append(r.values.to(torch.float64))
            incr.append(step)
            owner.append(torch.full((n,), i, dtype=torch.long))
        v = torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)
        order = torch.sort(v, descending=True, stable=True).indices
        inc = torch.cat(incr)[order] if incr else torch.zeros(0, dtype=torch.long)
        return _Events(v[order], torch.cat(owner)[order] if owner else inc, inc, torch.cumsum(inc, 0))

    def allocate(self, budget: str | int | float, fill: bool = False) -> Allocation:
        """The allocation whose realised count is the closest to ``budget`` (see :func:`parse_budget`);
        with ``fill``, the closest at or under it, topped up as the class docstring describes."""
        target = parse_budget(budget, self.backbone_params)
        ranked = self._ranking(target + 1)
        ev = self._events(ranked)
        ends = torch.nonzero(ev.valid()).reshape(-1)  # a top-k = all events up to and including an end
        options = torch.cat([torch.zeros(1, dtype=torch.long), ev.realised[ends]])
        if fill:
            best = int((options <= target).sum()) - 1  # options are non-decreasing: the last one under
        else:
            best = int(torch.argmin((options - target).abs()))  # first minimum: the smaller count wins ties
        top = 0 if best == 0 else int(ends[best - 1]) + 1  # events in the top-k part
        threshold = float("inf") if best == 0 else float(ev.values[top - 1])
        counts = torch.bincount(ev.unit[:top], minlength=len(ranked)).tolist()
        filled = 0
        if fill:
            filled = self._fill(ev, top, target - int(options[best]), counts, ranked)
        choices, k = [], 0  # counts already include the filled entries
        for r, n in zip(ranked, counts):
            choice, n_sensitive = self._choose(r, n, threshold)
            choices.append(choice)
            k += n_sensitive
        alloc = Allocation(
            arch=self.arch, structured_type=self.structured, rank=self.rank, alpha=self.alpha, beta=self.beta,
            choices=choices, target=target, threshold=None if best == 0 else threshold, num_sensitive=k,
            pool_size=self.pool_size, backbone_params=self.backbone_params, extra={"fill": fill, "filled": filled},
        )
        if ev.realised.numel() == 0 or int(ev.realised[-1]) < target:
            # Every event adds at least one parameter, so a list cut at target+1 events alone would
            # exceed the target: falling short means all lists were complete and this is the most
            # the positive scores can buy.
            alloc.max_realisable = int(ev.realised[-1]) if ev.realised.numel() else 0
            warnings.warn(f"SPT budget {target:,} is out of reach: only {alloc.max_realisable:,} parameters "
                          "have positive sensitivity under these rules", stacklevel=2)
        return alloc

    @staticmethod
    def _fill(ev: _Events, start: int, room: int, counts: list[int], ranked: list[_Ranked]) -> int:
        """Walk the ranking past the top-k taking what fits; updates ``counts``, returns entries taken."""
        blocked: set[int] = set()
        taken = 0
        units, incr = ev.unit.tolist(), ev.incr.tolist()
        for pos in range(start, len(units)):
            if room <= 0:
                break
            u = units[pos]
            if u in blocked:
                continue
            if incr[pos] <= room:
                room -= incr[pos]
                counts[u] += 1
                taken += 1
            else:
                blocked.add(u)  # its jump does not fit, and later entries of it would need the jump
        return taken

    def _choose(self, r: _Ranked, n: int, threshold: float) -> tuple[UnitChoice, int]:
        """The unit's choice given n (its entries in the allocation); also its sensitive count."""
        u = r.unit
        if n == len(r.values) and n and not r.complete and float(r.values[-1]) >= threshold:
            # the list was cut at the target's rank; ties at the threshold may reach past it
            mask = r.flat >= threshold
            n = int(mask.sum())
            idx = torch.nonzero(mask.to("cpu")).reshape(-1)
        else:
            idx = r.indices[:n]
        if n == 0:
            return UnitChoice(u, "none", 0, 0), 0
        if r.cap is not None and n >= r.cap:
            # k counts every entry at or above the threshold, also those a structured module
            # subsumes (the top-k list stops at the cap)
            k = max(n, int((r.flat >= threshold).sum())) if threshold != float("inf") else n
            return UnitChoice(u, "whole" if u.kind == "vector" else "structured", r.jump, k), k
        return UnitChoice(u, "unstructured", n, n, torch.sort(idx.to(torch.long)).values), n


def allocate(
    model: nn.Module,
    scores: dict[str, torch.Tensor],
    budget: str | int | float,
    structured: str = "lora",
    alpha: float = 10.0,
    beta: float = 5.0,
    rank: int = 8,
    fill: bool = False,
) -> Allocation:
    """Allocate ``budget`` tuned parameters over ``model``'s pool by its sensitivity ``scores``.

    One-shot form of :class:`Allocator` (use that to try several budgets on one score set).
    ``model`` is only read for its structure, so a ``meta``-device model works.
    """
    return Allocator(model, scores, structured, alpha, beta, rank).allocate(budget, fill=fill)


# ------------------------------------------------------------------------------------------------
# The picture


def _fmt(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e6:.3g}M" if n >= 1e5 else f"{n / 1e3:.3g}k" if n >= 1e3 else str(n)


def _title(alloc: Allocation) -> str:
    kind = {"lora": "SPT-LoRA", "adapter": "SPT-Adapter", "none": "SPT (unstructured)"}[alloc.structured_type]
    if alloc.target:
        delta = f" ({alloc.realised / alloc.target - 1:+.1%})"
        budget = f"target {_fmt(alloc.target)}, realised {_fmt(alloc.realised)}{delta}"
    else:
        budget = f"realised {_fmt(alloc.realised)}"
    return f"{kind} on {alloc.arch}: {budget}"


def plot_allocation(allocation: Allocation, path: str | os.PathLike) -> Path:
    """Draw where the budget went and save it (PNG/PDF/SVG by suffix).

    ViTs: a blocks × (q, k, v, proj, fc1, fc2) heat-map whose colour is the share of the matrix's
    entries that are sensitive, with an L (LoRA) or A (adapter) where the matrix got a structured
    module, beside a per-block bar chart of tuned parameters by kind. CNNs and other models: one
    bar per weight tensor in model order (tuned parameters, log scale), coloured by what it got.
    The title gives target vs realised budget. Uses matplotlib's object API with the Agg canvas, so
    no global backend state is touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    vit = [c for c in allocation.choices if c.unit.mtype is not None]
    if vit:
        fig = _plot_vit(allocation, vit, Figure)
    else:
        fig = _plot_layers(allocation, Figure)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)
    return path


def _share(c: UnitChoice) -> float:
    n = c.sensitive if c.sensitive is not None else c.params
    return min(1.0, n / max(c.unit.numel, 1))


def _plot_vit(alloc: Allocation, vit: list[UnitChoice], Figure) -> Any:
    from matplotlib.colors import PowerNorm
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    depth = max(c.unit.block for c in vit) + 1
    cols = list(VIT_MATRICES)
    grid = torch.full((depth, len(cols)), float("nan"))
    marks: list[tuple[int, int, str]] = []
    per_block = {k: [0] * depth for k in ("structured", "unstructured", "vectors")}
    outside = 0
    for c in alloc.choices:
        u = c.unit
        if u.mtype is not None:
            grid[u.block, cols.index(u.mtype)] = 100.0 * _share(c)
            if c.mode == "structured":
                marks.append((u.block, cols.index(u.mtype), "L" if alloc.structured_type == "lora" else "A"))
        if u.block is None:
            outside += c.params
            continue
        key = "vectors" if u.kind == "vector" else c.mode
        if key in per_block:
            per_block[key][u.block] += c.params
    fig = Figure(figsize=(10, 1.2 + 0.42 * depth))
    ax, bx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.1, 1]})
    vmax = max(float(torch.nan_to_num(grid, 0.0).max()), 1e-3)
    # a square-root colour scale: shares span orders of magnitude between early and late blocks
    im = ax.imshow(grid.numpy(), cmap="viridis", aspect="auto", norm=PowerNorm(0.5, vmin=0.0, vmax=vmax))
    for bi, ci, text in marks:
        ax.text(ci, bi, text, ha="center", va="center", color="white", fontweight="bold",
                bbox=dict(boxstyle="circle,pad=0.15", fc="black", alpha=0.55, lw=0))
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(depth), [str(i) for i in range(depth)])
    ax.set_ylabel("block")
    ax.set_title("sensitive entries per matrix (%)  L/A = structured", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    left = [0] * depth
    colours = {"structured": "tab:orange", "unstructured": "tab:blue", "vectors": "tab:green"}
    for key, vals in per_block.items():
        bx.barh(range(depth), vals, left=left, color=colours[key], label=key)
        left = [a + b for a, b in zip(left, vals)]
    bx.invert_yaxis()
    bx.set_yticks(range(depth), [str(i) for i in range(depth)])
    bx.set_xlabel("tuned parameters")
    bx.xaxis.set_major_locator(MaxNLocator(4))
    bx.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _fmt(int(v))))
    bx.legend(fontsize=8, loc="lower right")
    if outside:
        bx.set_title(f"per block (+{_fmt(outside)} outside blocks)", fontsize=9)
    else:
        bx.set_title("per block", fontsize=9)
    fig.suptitle(_title(alloc), fontsize=11)
    fig.tight_layout()
    return fig


def _plot_layers(alloc: Allocation, Figure) -> Any:
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter

    mats = [c for c in alloc.choices if c.unit.kind != "vector"]
    vec = [c for c in alloc.choices if c.unit.kind == "vector"]
    colours = {"structured": "tab:orange", "unstructured": "tab:blue"}
    fig = Figure(figsize=(max(6.0, 0.28 * len(mats) + 2), 4.4))
    ax = fig.subplots()
    xs = range(len(mats))
    ax.bar(xs, [c.params for c in mats], color=[colours.get(c.mode, "lightgrey") for c in mats])
    ax.set_yscale("symlog", linthresh=10)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _fmt(int(v))))
    ax.set_xticks(xs, [c.unit.module or c.unit.param for c in mats], rotation=90, fontsize=7)
    ax.set_ylabel("tuned parameters")
    share = ax.twinx()
    share.plot(xs, [100.0 * _share(c) for c in mats], "k.", markersize=5)
    share.set_ylabel("sensitive entries (%)")
    share.set_ylim(bottom=0)
    whole = sum(c.params for c in vec if c.mode == "whole")
    sparse = sum(c.params for c in vec if c.mode == "unstructured")
    handles = [Patch(color=colour, label=mode) for mode, colour in colours.items()]
    handles.append(ax.plot([], [], "k.", label="sensitive share")[0])
    ax.legend(handles=handles, fontsize=8, loc="upper left",
              title=f"vectors: {_fmt(whole)} whole, {_fmt(sparse)} sparse entries", title_fontsize=8)
    fig.suptitle(_title(alloc), fontsize=11)
    fig.tight_layout()
    return fig
