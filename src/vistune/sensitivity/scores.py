"""SPT stage A, part 1: the candidate pool, per-entry sensitivity Σ (∂L/∂w)², and score files."""

from __future__ import annotations

import itertools
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vistune.anatomy import ATTN_ROLES, MLP_ROLES, try_describe
from vistune.backbones import backbone_info, head_parameters
from vistune.errors import MethodError
from vistune.io import read_with_json_meta, save_atomic
from vistune.tuning import fingerprint, fingerprints_match

SCORES_FORMAT = "vistune.sensitivity/1"
_SCORES_META_KEY = "vistune.sensitivity"


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
    block_of: dict[int, int] = {}  # id(module) → index of the block holding it
    anatomy = try_describe(model)
    if anatomy is not None:
        block_of = anatomy.block_of()
        for block in anatomy.blocks:
            for site in block.sites:
                if isinstance(site.module, nn.Linear) and site.role in ATTN_ROLES + MLP_ROLES:
                    vit_parts.setdefault(id(site.module), []).append((site.role, site.rows, block.index))
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
    cross-entropy. See :func:`accumulate_sensitivity` for the rest.
    """
    if isinstance(classifier := model.get_classifier(), nn.Identity) or not list(classifier.parameters()):
        raise SensitivityError(
            "sensitivity needs a classification head (cross-entropy over the task's classes): "
            "call model.reset_classifier(num_classes) first"
        )
    loss_fn = loss_fn or F.cross_entropy

    def losses() -> Iterator[torch.Tensor]:
        for batch in batches:
            yield loss_fn(model(batch[0]), batch[1])

    return accumulate_sensitivity(model, losses(), num_batches)[0]


def accumulate_sensitivity(model: nn.Module, losses: Iterable[torch.Tensor],
                           num_batches: int = 16) -> tuple[dict[str, torch.Tensor], int]:
    """Σ (∂L/∂w)² over the first ``num_batches`` losses, per entry of every pool parameter of ``model``;
    returns the scores and how many losses there were (warns when fewer than asked).

    ``losses`` must compute each loss lazily (a generator), so its forward passes run after the
    pool has been given gradients: any task's loss works (a task's own throw-away head, a dense
    head on captured features...). Keys of the result are parameter names; values have the
    parameters' shapes, in float32 (float64 for a float64 model).

    Memory: the score tensors are the only extra copy of the parameters. Each gradient is folded
    into its score as soon as autograd has accumulated it (a post-accumulate-grad hook) and then
    dropped, so the gradients of the whole model never coexist.

    The model is run in eval mode (see the package docstring) and left exactly as found:
    ``requires_grad`` flags, every module's train/eval flag and any existing ``.grad`` tensors
    are restored, also when a loss raises.
    """
    if num_batches < 1:
        raise SensitivityError(f"num_batches must be >= 1, got {num_batches}")
    pool = pool_parameters(model)
    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    saved_grads = [p.grad for p in params]
    saved_modes = [(m, m.training) for m in model.modules()]
    scores: dict[str, torch.Tensor] = {}
    handles = []
    seen = 0
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
        for loss in itertools.islice(losses, num_batches):
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
    return scores, seen


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
    A model on the ``meta`` device (no values) skips the fingerprint check; a file recorded from
    one never matches real weights.
    """
    meta, scores = read_scores(path)
    want = meta.get("backbone", {})
    info = backbone_info(model)
    if want.get("arch") != info.arch:
        raise SensitivityError(f"sensitivity file {path} was computed on {want.get('arch')!r}, not {info.arch!r}")
    fp = fingerprint(model)
    if not fingerprints_match(want.get("fingerprint"), fp):
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
