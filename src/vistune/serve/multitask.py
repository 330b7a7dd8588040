"""One frozen backbone in memory, many tuned files, mixed batches routed per sample.

Why this works without touching any method's forward code
---------------------------------------------------------
A method attaches to a model by inserting child modules and registering hooks on the model's own
modules. Two tasks cannot both attach to the one backbone (both LoRAs would be ``qkv.lora``), so
each task attaches to a **view** of it instead: a structural copy of the module tree whose
parameters and buffers *share storage* with the backbone (a deep copy whose memo maps every
backbone tensor to a new tensor object over the same memory). The method attaches to the view
exactly as ``load_tuned`` would attach it to a fresh backbone, and the tuned file is loaded with
the library's own :func:`~vistune.tuning.load_tensors` (same key and shape checks). Tensors the
method trains *in place* (BitFit's biases, SPT's whole vectors, every weight in full fine-tuning)
are first given private storage in the view, so loading never writes into the shared backbone:
its state dict stays bit-identical whatever is added or removed.

A task then costs its inserted modules, its head and its private tensors, i.e. its tuned file
(measured by :meth:`MultiTaskModel.memory_report`), plus the Python objects of the view's hosts.

Routing a mixed batch
---------------------
For every backbone module where some task's view has hooks or private tensors, a
:class:`_Router` sits on the real module (one pre- and one forward-hook). During a forward the
:class:`MultiTaskModel` holds the batch's task assignment (``task -> row indices``; on the object
for the duration of one pass, never a global), and each router applies, for each task present,
*that task's own hooks* (called with the task's view of the module, so ``host.lora`` is the task's
LoRA branch) to that task's rows only:

* pure hooks (LoRA, Adapter, SPT's LoRA/adapters, Pro-tuning's prompt blocks, VPT's prompt
  insertion/replacement/stripping): pre-hooks rewrite the task's rows of the input, forward
  hooks the task's rows of the output. Nothing is merged; a sample only sees its task's deltas
  (PEFT's ``_mixed_batch_forward`` idea, generalised from LoRA to every hook);
* a private bias on a module whose output is affine in its bias (Linear, ConvNd, LayerNorm,
  GroupNorm, BatchNorm in eval): the task's rows get ``out + (b_task - b)`` (BitFit; SPT's whole
  bias vectors), so BitFit tasks share the backbone pass too;
* anything else (SPT's sparse deltas, declared by ``Method.routing().swaps``; a private weight):
  the task's view of the module is re-run on the task's rows, with all its hooks.

Deep prompts: VPT-deep's prompts are learned constants at every block whose outputs are never
read (replaced at the next block, stripped after the last), so they reach the image tokens only
as extra keys and values of each block's attention, and those are constants too
(``Routing.kv_prompts``). The server computes them once per task when it is added and merges
them into the attention output of the task's rows (:class:`_KVRouter`); the rows keep the plain
sequence length and share the plain pass, at the cost of a plain row. ``add_task`` checks the
result against the task's own model on a probe image and keeps the prompts as tokens where it
differs (or where the blocks are not timm's pre-norm ``Block``/``Attention``).

Passes: rows whose tasks change the sequence length differently (shallow VPT's prompts,
``Method.routing().tokens``) cannot share a tensor as they are. VPT tasks of equal length share a
pass, each row getting its own task's prompts; different lengths (and rows without prompts) share
one *padded* pass when every task in it is token-wise (``Routing.tokenwise``) and classifies:
each row's sequence is padded at its end to the longest, and an attention mask keeps the padding
out of every real token's attention, so each row's output is still its own model's. The pass is
padded only when the padding costs less than the pass it saves (:meth:`MultiTaskModel.passes`);
otherwise, and for other tasks, the batch is split into one pass per prompt length.
A task whose re-run modules hold at least half the backbone's parameters (full fine-tuning,
which keeps a private copy of every weight), that changes the root module itself, or whose
method declares ``Routing.own_pass`` (VPT on Swin, VPT-pad) runs its view as a standalone
model in a pass of its own. Everything else (linear probes, BitFit, LoRA,
Adapter, SPT, Pro-tuning, classification and dense heads) shares one backbone pass.

Every pass is exact per sample: out[i] equals what task(i)'s own model (``load_tuned`` /
``load_dense`` on a fresh backbone) returns for ``x[i:i+1]``, up to fp32 rounding (tests/test_serve.py).
"""

from __future__ import annotations

import copy
import inspect
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vistune.backbones import (
    backbone_for_file,
    backbone_info,
    classifier,
    seeded_backbone,
)
from vistune.dense.features import FeatureExtractor, StopForward
from vistune.errors import MethodError, TunedFileError, VistuneError
from vistune.precision import resolve_precision
from vistune.tasks import get_task, kind_of_run
from vistune.tasks.base import tuned_file_of
from vistune.tuning import (
    MethodSpec,
    attach,
    check_backbone,
    fingerprint,
    load_tensors,
    read_tuned_file,
)

#: A pass's fixed cost in tokens of one row (see MultiTaskModel.passes), measured: DINOv2-S @84 px
#: (37 tokens; VPT 10 prompts), bf16, one thread, one padded pass vs a pass per prompt length was
#: 20.0 vs 24.2 ms with 10 padding tokens (LoRA + VPT row), 32.8 vs 34.8 with 30 (four tasks, one
#: row each), 57.9 vs 53.0 with 60 (two rows each): break-even near 40. Behind HTTP (batches of
#: 5-6, benchmarks/serve.py) merging up to 40 showed no gain over never merging in three paired
#: runs (it leaned the other way, within the noise), so the default merges only where the gain is
#: clear: at most 20 padding tokens per pass saved.
PASS_COST_TOKENS = 20

#: Task names travel in URLs and JSON: keep them to a safe alphabet.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_task_name(name: Any) -> str:
    """``name`` if it is a valid task name; a ServeError (400 over HTTP) otherwise.

    ``fullmatch``, not ``match``: ``$`` also matches before a trailing newline, which let
    ``"flowers\n"`` through as a name (names travel in URLs, JSON and log lines).
    """
    if isinstance(name, str) and any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in name):
        raise ServeError(f"task name {name!r} contains a control character")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ServeError(f"task name {name!r} is invalid: use 1-64 letters, digits, '_', '-' or '.', "
                         "starting with a letter or digit")
    return name


def _bias_axes() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """Module types whose output is ``f(x) + bias`` (eval mode), bias on the last axis / on axis 1.

    A task's private bias on such a module becomes a delta on that axis instead of a re-run.
    Exact types only: a subclass may do more after the bias (timm's BatchNormAct2d applies an
    activation), so timm's own affine-in-bias layers are listed by name.
    """
    import timm.layers as tl

    last = [nn.Linear, nn.LayerNorm] + [getattr(tl, n) for n in ("Linear", "LayerNorm", "LayerNormFp32")
                                        if hasattr(tl, n)]
    channel = [nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d]
    channel += [getattr(tl, n) for n in ("LayerNorm2d", "GroupNorm", "GroupNorm1") if hasattr(tl, n)]
    return tuple(last), tuple(channel)


_BIAS_LAST, _BIAS_CHANNEL = _bias_axes()


class ServeError(VistuneError, ValueError):
    """A task cannot be added, found or run as asked."""


class DuplicateTaskError(ServeError):
    """A task of that name is already loaded."""


class UnknownTaskError(ServeError, KeyError):
    """A request names a task that is not loaded."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


# ------------------------------------------------------------------------------------------------
# Views: the backbone's module tree over the backbone's own tensors


def share_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers share storage with ``model``'s.

    The copy's tensors are new objects (so a method may replace or re-point them in the copy)
    over the same memory (so the copy costs Python objects, not weights).
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(p.data, requires_grad=False)
    for b in model.buffers():
        memo[id(b)] = b.detach()
    return copy.deepcopy(model, memo)


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def _own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in module._parameters.items() if v is not None}
    out.update({k: v for k, v in module._buffers.items() if v is not None})
    return out


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.device == b.device and a.dtype == b.dtype and a.shape == b.shape
            and a.stride() == b.stride() and a.data_ptr() == b.data_ptr())


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def _storage_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


# ------------------------------------------------------------------------------------------------
# Routes and routers


@dataclass
class _Route:
    """One task's change to one backbone module, applied by that module's router."""

    host: nn.Module  # the task's view of the module (its hooks and inserted children live here)
    pre: list[Callable] = field(default_factory=list)
    post: list[Callable] = field(default_factory=list)
    rerun: bool = False  # re-run ``host`` on the task's rows (swapped or private weights)
    bias: torch.Tensor | None = None  # b_task - b, added along ``bias_dim``
    bias_dim: int = -1


def _take(args: tuple, rows: torch.Tensor, batch: int) -> tuple:
    """The rows of every batch-shaped tensor argument."""
    return tuple(a.index_select(0, rows) if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == batch
                 else a for a in args)


def _aliased(out: torch.Tensor, args: tuple) -> bool:
    """Whether ``out`` shares memory with an input (an Identity, an eval-mode Dropout, a view):
    writing into it would change what the rest of the network reads as that input."""
    ptr = out.untyped_storage().data_ptr()
    return any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == ptr for a in args)


def _fit_tokens(t: torch.Tensor, length: int) -> torch.Tensor:
    """``t`` (rows, tokens, ...) with zero tokens appended or trailing tokens cut to ``length``."""
    n = t.shape[1]
    if n > length:
        return t[:, :length]
    if n < length:
        return torch.cat([t, t.new_zeros((t.shape[0], length - n, *t.shape[2:]))], dim=1)
    return t


def _assemble(base: torch.Tensor, pieces: list[tuple[torch.Tensor, torch.Tensor]], where: str,
              in_place: bool = False, padded: bool = False) -> torch.Tensor:
    """``base`` with each ``(rows, values)`` written in: into ``base`` itself when ``in_place``
    (a module's own fresh output), else into a new tensor (``base`` may be aliased).

    ``padded`` (a padded pass, see :meth:`MultiTaskModel.passes`): pieces whose token count
    differs from the rest are brought to one length at the end of the token axis, where each
    row's padding sits. A route that lengthened its rows (prompts inserted) sets the length and
    the other rows get zero tokens appended; one that shortened them (prompts stripped) cuts
    every row to the shortest, which drops exactly the padding.
    """
    if padded and base.dim() >= 3 and any(v.shape[1] != base.shape[1] for _, v in pieces):
        lengths = [base.shape[1], *(v.shape[1] for _, v in pieces)]
        length = max(lengths) if max(lengths) > base.shape[1] else min(lengths)
        base = _fit_tokens(base, length)
        pieces = [(r, _fit_tokens(v, length)) for r, v in pieces]
    same = all(v.shape[1:] == base.shape[1:] for _, v in pieces)
    dtype = base.dtype
    for _, v in pieces:
        dtype = torch.promote_types(dtype, v.dtype)
    if same:
        out = base if in_place and dtype == base.dtype else base.to(dtype=dtype, copy=True)
    else:
        covered = sum(len(r) for r, _ in pieces)
        shapes = {tuple(v.shape[1:]) for _, v in pieces}
        if covered != base.shape[0] or len(shapes) != 1:
            raise ServeError(
                f"{where}: tasks in one pass change the tensor shape differently ({sorted(shapes)}); "
                "their rows cannot share a batch (is Method.routing().tokens declared?)"
            )
        out = pieces[0][1].new_empty((base.shape[0], *pieces[0][1].shape[1:]), dtype=dtype)
    for rows, v in pieces:
        out[rows] = v.to(dtype)
    return out


class _Router:
    """The hooks on one backbone module that apply every task's route to that task's rows."""

    def __init__(self, owner: MultiTaskModel, name: str, module: nn.Module) -> None:
        self.owner = owner
        self.name = name or "<root>"
        self.routes: dict[str, _Route] = {}
        self.saved: list[tuple] = []  # inputs as called, for re-runs (a stack: modules may nest)
        self.handles = [module.register_forward_pre_hook(self.pre),
                        module.register_forward_hook(self.post)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _active(self) -> list[tuple[_Route, torch.Tensor]]:
        rows = self.owner._rows
        if not rows:
            return []
        return [(self.routes[t], r) for t, r in rows.items() if t in self.routes]

    def _check_batch(self, args: tuple) -> int:
        batch = self.owner._batch_size
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != batch:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ServeError(
                f"cannot route rows at module {self.name!r}: its input {shape} does not lead with the "
                f"batch size {batch} (the architecture reshapes the batch before this module)"
            )
        return batch

    def pre(self, module: nn.Module, args: tuple) -> tuple | None:
        active = self._active()
        if not active:
            return None
        batch = self._check_batch(args)
        self.saved.append(args)
        active = [(route, rows) for route, rows in active if route.pre and not route.rerun]
        if not active:
            return None
        if len(active) == 1 and len(active[0][1]) == batch:  # one task holds every row: no split, no copy
            new = _pre_inputs(active[0][0], args)
            return None if new is args else new
        changed: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for route, rows in active:
            sub = _take(args, rows, batch)
            new = _pre_inputs(route, sub)
            for i, (a, b) in enumerate(zip(sub, new)):
                if a is not b:
                    changed.setdefault(i, []).append((rows, b))
        if not changed:
            return None
        out = list(args)
        for i, pieces in changed.items():
            out[i] = _assemble(args[i], pieces, f"module {self.name!r} (input {i})", padded=self.owner._padded)
        return tuple(out)

    def post(self, module: nn.Module, args: tuple, out: Any) -> Any:
        active = self._active()
        if not active:
            return None
        called = self.saved.pop() if self.saved else args
        if not isinstance(out, torch.Tensor):
            raise ServeError(f"cannot route rows at module {self.name!r}: it returns {type(out).__name__}, "
                             "not a tensor")
        batch = self.owner._batch_size
        fresh = not _aliased(out, called)
        if len(active) == 1 and len(active[0][1]) == batch and fresh:  # one task holds every row
            return _post_output(active[0][0], called, args, out, None, batch)
        pieces = []
        for route, rows in active:
            y = _post_output(route, called, args, out, rows, batch)
            if y is not None:
                pieces.append((rows, y))
        if not pieces:
            return None
        return _assemble(out, pieces, f"module {self.name!r}", in_place=fresh, padded=self.owner._padded)


def _pre_inputs(route: _Route, args: tuple) -> tuple:
    """``args`` through the route's pre-hooks (the same tuple when none changes them)."""
    new = args
    for fn in route.pre:
        res = fn(route.host, new)
        if res is not None:
            new = res if isinstance(res, tuple) else (res,)
    return new


def _post_output(route: _Route, called: tuple, args: tuple, out: torch.Tensor, rows: torch.Tensor | None,
                 batch: int) -> torch.Tensor | None:
    """The route's output for its ``rows`` (None: every row, computed on ``out`` itself), or None
    when the route leaves this module's output as it is."""
    def take(a: tuple) -> tuple:
        return a if rows is None else _take(a, rows, batch)

    if route.rerun:
        return route.host(*take(called))
    if not route.post and route.bias is None:
        return None
    y = out if rows is None else out.index_select(0, rows)
    if route.bias is not None:
        shape = [1] * y.dim()
        shape[route.bias_dim] = -1
        y = y + route.bias.view(shape).to(y.dtype) if route.bias_dim != -1 else y + route.bias.to(y.dtype)
    sub = take(args)
    for fn in route.post:
        res = fn(route.host, sub, y)
        if res is not None:
            y = res
    return y


def _kv_attention(block: nn.Module) -> nn.Module | None:
    """``block.attn`` when prompts given to ``block`` reach the image tokens only as keys and
    values that :class:`_KVRouter` can add (else None, and the prompts stay tokens).

    Exact classes only: timm's ``Block`` feeds ``attn(norm1(x))``, and its ``Attention`` ends
    in ``proj(norm(o))`` with ``o`` the per-head attention output; the router merges extra
    keys into ``o`` just before ``proj``, which needs ``norm`` to be the identity and no gate
    between them. Anything else (post-norm blocks, fused or windowed attention) keeps tokens.
    """
    try:
        from timm.models.vision_transformer import Attention, Block
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    attn = getattr(block, "attn", None)
    if type(block) is not Block or type(attn) is not Attention:
        return None
    if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity) or getattr(attn, "gate", None) is not None:
        return None
    if int(attn.num_heads) * int(attn.head_dim) != int(getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)):
        return None
    return attn


def prompt_kv(block: nn.Module, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values (heads, p, head_dim) that ``prompts`` (p, D) contribute to ``block``'s
    attention, computed by the block's own modules (so a task's hooks on them apply)."""
    attn = block.attn
    p = prompts.shape[0]
    x = block.norm1(prompts[None])
    qkv = attn.qkv(x).reshape(1, p, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return attn.k_norm(qkv[1])[0].contiguous(), qkv[2][0].contiguous()


class _KVRouter:
    """Adds each task's constant prompt keys/values to one timm attention module, for its rows.

    Attention over ``[K; K_p]`` splits exactly into attention over the image keys ``K`` (what
    the module computes anyway, ``o``) and over the prompt keys ``K_p`` (``o_p``), mixed by
    their softmax masses: ``o' = w o + (1 - w) o_p`` with ``w = sigmoid(lse(qK^T s) -
    lse(qK_p^T s))``. The router reads ``q`` and ``k`` where the module normalises them
    (``q_norm``/``k_norm``: after every route on ``qkv``) and rewrites the task's rows of
    ``proj``'s input, so the module's own code runs unchanged and a prompt costs two small
    products per block instead of a token through every projection and MLP.
    """

    def __init__(self, owner: MultiTaskModel, name: str, attn: nn.Module) -> None:
        self.owner = owner
        self.name = name
        self.attn = attn
        self.routes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # task -> its (k, v) here
        self.q: torch.Tensor | None = None
        self.k: torch.Tensor | None = None
        self.handles = [attn.q_norm.register_forward_hook(self._read_q),
                        attn.k_norm.register_forward_hook(self._read_k),
                        # first of proj's pre-hooks: a router there saves the merged input
                        attn.proj.register_forward_pre_hook(self._merge, prepend=True)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def clear(self) -> None:
        self.q = self.k = None

    def _active(self) -> list[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]]:
        rows = self.owner._rows
        return [(self.routes[t], r) for t, r in rows.items() if t in self.routes] if rows else []

    def _read_q(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if self._active():
            self.q = out

    def _read_k(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if self._active():
            self.k = out

    def _merge(self, module: nn.Module, args: tuple) -> tuple | None:
        active = self._active()
        if not active:
            return None
        x, q, k = args[0], self.q, self.k
        self.clear()
        batch = self.owner._batch_size
        if q is None or k is None or q.shape[0] != batch or x.shape[0] != batch:
            raise ServeError(f"cannot add prompt keys at {self.name!r}: the attention did not run on the "
                             f"batch of {batch} rows as expected")
        heads, dim = q.shape[1], q.shape[-1]
        scale = float(getattr(self.attn, "scale", dim ** -0.5))
        mask = self.owner._mask  # a padded pass: the padding keys are masked out of attention
        pieces = []
        with torch.autocast(x.device.type, enabled=False):  # the merge in fp32, whatever the pass runs in
            for (kp, vp), rows in active:
                def take(t: torch.Tensor, rows: torch.Tensor = rows) -> torch.Tensor:
                    return t if len(rows) == batch else t.index_select(0, rows)

                qr = take(q).float()
                o = take(x).float().unflatten(-1, (heads, dim)).transpose(1, 2)
                s = (qr @ take(k).float().transpose(-2, -1)) * scale
                if mask is not None:
                    s = s.masked_fill(~take(mask), float("-inf"))
                sp = (qr @ kp.transpose(-2, -1)) * scale
                w = torch.sigmoid(torch.logsumexp(s, -1, keepdim=True) - torch.logsumexp(sp, -1, keepdim=True))
                merged = torch.lerp(torch.softmax(sp, -1) @ vp, o, w)
                pieces.append((rows, merged.transpose(1, 2).flatten(2).to(x.dtype)))
        if len(pieces) == 1 and len(pieces[0][0]) == batch:  # one task holds every row
            return (pieces[0][1], *args[1:])
        return (_assemble(x, pieces, f"module {self.name!r}"), *args[1:])


# ------------------------------------------------------------------------------------------------
# Tasks


@dataclass
class Task:
    """One loaded tuned file (or dense run) and everything needed to run and describe it."""

    name: str
    kind: str  # classify | segment | detect
    path: str
    method: str
    options: dict[str, Any]
    classes: list[str]
    report: dict[str, Any]  # TunedModel.parameter_report() (+ dense head params)
    file_bytes: int  # tensor bytes of its file(s)
    tokens: int  # sequence tokens its method adds (VPT): the pass it runs in
    tokenwise: bool  # may share a padded pass with other token counts (Routing.tokenwise)
    head: nn.Module  # the classifier (classify) or the DenseHead
    levels: list[Any] = field(default_factory=list)  # dense: vistune.dense.features.Level
    view: nn.Module | None = None  # set when the task runs as a standalone model (own pass)
    routes: dict[str, _Route] = field(default_factory=dict)
    #: deep prompts served as keys/values: attention module name -> (k, v), each (heads, p, dim)
    kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    private: list[torch.Tensor] = field(default_factory=list)  # every tensor only this task holds
    score_threshold: float = 0.3

    @property
    def own_pass(self) -> bool:
        return self.view is not None

    def info(self) -> dict[str, Any]:
        """JSON-able description (the service's task list)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "method": self.method,
            "options": self.options,
            "classes": list(self.classes),
            "num_classes": len(self.classes),
            "tuned_params": int(self.report.get("tuned_params", 0)),
            "head_params": int(self.report.get("head_params", 0)),
            "file_bytes": int(self.file_bytes),
            "shares_backbone_pass": not self.own_pass,
            "prompts_as_kv": bool(self.kv),
            "path": self.path,
        }


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def class_names(names: Any, n: int) -> list[str]:
    if isinstance(names, list) and len(names) == n:
        return [str(c) for c in names]
    return [str(i) for i in range(n)]


class MultiTaskModel:
    """A frozen backbone shared by many tasks; ``forward(images, tasks)`` routes each sample.

    ``backbone`` is a plain timm model (``create_backbone``); its classifier is dropped (every
    task brings its own head) and it is put in eval mode with gradients off. Tasks are added
    from tuned files (classification) or dense run folders at any time; a file made for other
    backbone weights is refused by the same fingerprint check ``load_tuned`` does.
    """

    def __init__(self, backbone: nn.Module, *, precision: str = "auto", bf16: bool | None = None,
                 device: str | torch.device | None = None, kv_prompts: bool = True) -> None:
        for name, m in backbone.named_modules():
            if _has_hooks(m):
                raise ServeError(
                    f"the backbone has hooks on {name or 'its root'}: pass a plain backbone "
                    "(create_backbone), not a model with a method attached"
                )
        if int(getattr(backbone, "num_classes", 0) or 0) != 0:
            backbone.reset_classifier(0)
        if device is not None:
            backbone.to(device)  # before the views are made: they share the storage as it is now
        backbone.eval()
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.backbone = backbone
        if bf16 is not None:  # the older switch: bf16=True/False is precision bf16/fp32
            precision = "bf16" if bf16 else "fp32"
        #: ``auto``: bf16 autocast only where this device runs it natively (vistune.precision)
        self.precision = resolve_precision(precision, next(backbone.parameters()).device)
        self.fingerprint = fingerprint(backbone)
        self.info = backbone_info(backbone)
        self._numel = sum(p.numel() for p in backbone.parameters())
        self._template = share_copy(backbone)  # never hooked: each task's view is copied from it
        self._modules = dict(backbone.named_modules())
        self._tasks: dict[str, Task] = {}
        self._routers: dict[str, _Router] = {}
        self._kv_routers: dict[str, _KVRouter] = {}
        #: serve deep prompts (``Routing.kv_prompts``) as attention keys/values where the blocks
        #: allow it; False keeps them tokens (padded or separate passes), e.g. to compare the two
        self.kv_prompts = kv_prompts
        self.lock = threading.RLock()  # held by forward/add/remove; hold it to make several calls atomic
        # The batch being routed: task -> row indices, for the duration of one pass only.
        self._rows: dict[str, torch.Tensor] | None = None
        self._batch_size = 0
        self._padded = False  # the pass in progress pads rows to one token count (see passes)
        self._mask: torch.Tensor | None = None  # that pass's attention mask
        #: Rows with different prompt lengths share one padded pass when the padding costs less
        #: than the passes it saves, a pass's fixed cost counted as this many tokens (see passes).
        self.pass_cost_tokens = PASS_COST_TOKENS
        # a padded pass hands timm's blocks an attention mask through forward_features
        self._maskable = (hasattr(backbone, "blocks") and hasattr(backbone, "patch_embed")
                          and _accepts_attn_mask(getattr(backbone, "forward_features", None)))

    @property
    def bf16(self) -> bool:
        return self.precision.name == "bf16"

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, *, weights: str | None = None, img_size: int | None = None,
                  precision: str = "auto", bf16: bool | None = None,
                  device: str | torch.device | None = None, kv_prompts: bool = True) -> MultiTaskModel:
        """Build the backbone the way training did (``vistune train --backbone NAME ...``)."""
        return cls(seeded_backbone(name, weights, img_size), precision=precision, bf16=bf16, device=device,
                   kv_prompts=kv_prompts)

    @classmethod
    def for_file(cls, path: str | os.PathLike, *, weights: str | None = None, precision: str = "auto",
                 bf16: bool | None = None, device: str | torch.device | None = None,
                 kv_prompts: bool = True) -> MultiTaskModel:
        """The backbone a tuned file (or dense run) names in its metadata (its weights are a
        label: a run trained on a local weights file needs ``weights`` passed again)."""
        tuned = _tuned_path(path)
        meta, _ = read_tuned_file(tuned)
        return cls(backbone_for_file(meta.get("backbone"), tuned, weights), precision=precision, bf16=bf16,
                   device=device, kv_prompts=kv_prompts)

    # -- tasks ----------------------------------------------------------------------------------
    @property
    def tasks(self) -> dict[str, Task]:
        return dict(self._tasks)

    def task_names(self) -> list[str]:
        return list(self._tasks)

    def __contains__(self, name: str) -> bool:
        return name in self._tasks

    def add_task(self, name: str, source: str | os.PathLike) -> Task:
        """Load a tuned file or a dense run folder as task ``name``; the backbone is not reloaded."""
        check_task_name(name)
        with self.lock:
            if name in self._tasks:
                raise DuplicateTaskError(f"task {name!r} is already loaded (remove it first)")
            task, probe = self._build_task(name, Path(source))
            self._install(task)
            if probe is not None and not self._kv_reproduces(task, *probe):
                self.remove_task(name)  # keys/values that do not reproduce the model: prompts stay tokens
                task, _ = self._build_task(name, Path(source), kv=False)
                self._install(task)
            return task

    def _install(self, task: Task) -> None:
        """Put ``task``'s routes on the backbone's modules and list it (the lock is held)."""
        name = task.name
        for routers, table, kind in ((self._routers, task.routes, _Router), (self._kv_routers, task.kv, _KVRouter)):
            for host_name, route in table.items():
                router = routers.get(host_name)
                if router is None:
                    router = routers[host_name] = kind(self, host_name, self._modules[host_name])
                router.routes[name] = route
        self._tasks[name] = task

    def _kv_reproduces(self, task: Task, probe: torch.Tensor, want: torch.Tensor) -> bool:
        """Whether the backbone with ``task``'s prompt keys/values gives the features its own model
        (hooks and prompt tokens) gave on a probe image: a guard against blocks that look like
        timm's but compute otherwise (another timm version, a subclass), where the task then
        keeps its prompts as tokens."""
        with torch.inference_mode():
            self._rows, self._batch_size = {task.name: torch.zeros(1, dtype=torch.long, device=probe.device)}, 1
            try:
                got = self.backbone.forward_features(probe)
            finally:
                self._clear_pass()
        ok = got.shape == want.shape and bool(torch.allclose(got, want, rtol=1e-3, atol=1e-4))
        if not ok:
            diff = (got - want).abs().max().item() if got.shape == want.shape else f"shape {tuple(got.shape)}"
            warnings.warn(f"task {task.name!r}: its deep prompts served as attention keys/values did not reproduce "
                          f"its model on a probe image (max difference {diff}); they are served as tokens",
                          stacklevel=3)
        return ok

    def remove_task(self, name: str) -> None:
        with self.lock:
            if name not in self._tasks:
                raise UnknownTaskError(f"no task {name!r} is loaded (loaded: {', '.join(self._tasks) or 'none'})")
            task = self._tasks.pop(name)
            for routers, table in ((self._routers, task.routes), (self._kv_routers, task.kv)):
                for host_name in table:
                    router = routers[host_name]
                    router.routes.pop(name, None)
                    if not router.routes:
                        router.remove()
                        del routers[host_name]

    def _build_task(self, name: str, source: Path, kv: bool = True) -> tuple[Task, tuple | None]:
        """The task, and when its prompts are served as keys/values, ``(probe image, the features
        its own model gave)`` for :meth:`_kv_reproduces` (the hooks are gone once this returns)."""
        kind = kind_of_run(source)  # the run's task class: it knows its files and its head
        tuned_path = kind.tuned_file(source)
        meta, tensors = read_tuned_file(tuned_path)
        try:
            check_backbone(tuned_path, meta, self.backbone, self.fingerprint)
        except KeyError as err:
            raise TunedFileError(f"tuned file {tuned_path}: backbone metadata lacks {err}") from None
        try:
            spec = MethodSpec.from_dict(meta["method"])
            num_classes = int(meta["num_classes"])
        except (KeyError, TypeError, ValueError) as err:
            raise TunedFileError(f"tuned file {tuned_path}: metadata lacks {err}") from None

        view = share_copy(self._template)
        try:
            tuned = attach(view, spec, num_classes=num_classes, state=tensors, base_fingerprint=self.fingerprint)
        except MethodError as err:
            raise TunedFileError(f"tuned file {tuned_path}: cannot rebuild its method: {err}") from None
        self._unshare_trained_in_place(view, tuned)
        load_tensors(tuned, tensors, tuned_path)
        view.to(next(self.backbone.parameters()).device)  # the new head; shared tensors stay put
        tuned.eval()
        report = tuned.parameter_report()
        file_bytes = tensor_bytes(tensors)

        served = kind.serve_head(source, tuned_path, meta, view, next(self.backbone.parameters()).device)
        if served.head_params is not None:
            report["head_params"] = served.head_params
        file_bytes += served.file_bytes
        head, levels, classes = served.head, served.levels, served.classes

        routing = tuned.method.routing()
        keys_values = self._prompt_kv(view, routing) if kv else {}
        probe = None
        if keys_values:  # the hooks go: the prompts enter as keys/values (checked against them in add_task)
            probe = torch.randn(1, 3, self.info.img_size, self.info.img_size,
                                generator=torch.Generator().manual_seed(0)).to(next(self.backbone.parameters()).device)
            with torch.inference_mode():
                probe = (probe, view.forward_features(probe))
            tuned.method.remove_hooks()
        task = Task(name=name, kind=kind.name, path=str(source), method=spec.name, options=dict(tuned.spec.options),
                    classes=classes, report=report, file_bytes=file_bytes,
                    tokens=0 if keys_values else int(routing.tokens), tokenwise=bool(routing.tokenwise), head=head,
                    levels=levels, kv=keys_values)
        if routing.own_pass:
            task.view = view  # hooks that cannot run on a subset of rows (Routing.own_pass)
        else:
            routes, rerun_numel = self._routes(view, head, {id(m) for m in routing.swaps})
            if "" in routes or 2 * rerun_numel >= self._numel:
                if keys_values:  # a standalone model needs its prompt hooks back
                    return self._build_task(name, source, kv=False)
                task.view = view  # full fine-tuning & co: a standalone model over private weights
            else:
                task.routes = routes
                # a re-run gets the host's positional inputs only: a padded pass's attention mask
                # is a keyword argument (of blocks and attention), so no re-run host may take one
                task.tokenwise &= not any(r.rerun and _accepts_attn_mask(r.host.forward) for r in routes.values())
        task.private = self._private_tensors(view, task)
        return task, probe

    def _prompt_kv(self, view: nn.Module, routing: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each attention module's prompt keys/values when the method's prompts may be served
        that way (``Routing.kv_prompts``) and every block they enter allows it; else {}."""
        if not self.kv_prompts or routing.kv_prompts is None or routing.own_pass:
            return {}
        names = {id(m): n for n, m in view.named_modules()}
        out = {}
        with torch.no_grad():
            for block, prompts in routing.kv_prompts():
                name = names.get(id(block))
                if (name is None or _kv_attention(block) is None or f"{name}.attn" not in self._modules
                        or not self._kv_pays(block, prompts.shape[0])):
                    return {}
                out[f"{name}.attn"] = prompt_kv(block, prompts.detach().float())
        return out

    def _kv_pays(self, block: nn.Module, prompts: int) -> bool:
        """Whether keys/values cost less than tokens, in multiply-adds per row and block: the
        merge recomputes the image tokens' scores, ``N^2 d``, where ``p`` prompt tokens would
        run the projections and the MLP, ``p (4 d^2 + 2 d h)`` (the attention terms in ``N p d``
        are alike). So keys/values where ``N^2 <= p (4 d + 2 h)``: DINOv2-S (d 384, h 1536) with
        10 prompts up to N = 215 tokens (196 px), with 50 prompts up to 480."""
        d = int(block.attn.qkv.in_features)
        fc1 = getattr(getattr(block, "mlp", None), "fc1", None)
        h = int(getattr(fc1, "out_features", 4 * d))
        grid = getattr(getattr(self.backbone, "patch_embed", None), "grid_size", None)
        if grid is None:
            return True
        n = int(getattr(self.backbone, "num_prefix_tokens", 0)) + int(grid[0]) * int(grid[1])
        return n * n <= prompts * (4 * d + 2 * h)

    def _unshare_trained_in_place(self, view: nn.Module, tuned: Any) -> None:
        """Give private storage to the backbone tensors a method trains in place, before loading."""
        backbone_names = {n for n, _ in self._template.named_parameters(remove_duplicate=False)}
        backbone_names |= {n for n, _ in self._template.named_buffers(remove_duplicate=False)}
        head_ids = {id(p) for p in classifier(view).parameters()}
        for name in tuned.tuned_state_dict():
            if name not in backbone_names:
                continue  # an inserted module's tensor: already private
            owner_name, _, attr = name.rpartition(".")
            owner = view.get_submodule(owner_name)
            if attr in owner._parameters:
                p = owner._parameters[attr]
                if id(p) not in head_ids:
                    p.data = torch.empty_like(p.data)
            else:
                owner._buffers[attr] = torch.empty_like(owner._buffers[attr])

    def _routes(self, view: nn.Module, head: nn.Module, swaps: set[int]) -> tuple[dict[str, _Route], int]:
        """What each backbone module must do for this task's rows, and the parameters of re-run modules."""
        routes: dict[str, _Route] = {}
        rerun_numel = 0
        head_ids = {id(m) for m in head.modules()}
        for name, vm in view.named_modules():
            real = self._modules.get(name)
            if real is None or id(vm) in head_ids:
                continue  # inserted modules run through their host's hooks; the head runs apart
            if vm._forward_hooks_with_kwargs or vm._forward_pre_hooks_with_kwargs:
                raise ServeError(f"module {name!r}: hooks that take keyword arguments cannot be routed")
            real_own, view_own = _own_tensors(real), _own_tensors(vm)
            private = {k for k, t in view_own.items() if k not in real_own or not _same_storage(t, real_own[k])}
            private |= set(real_own) - set(view_own)
            pre, post = list(vm._forward_pre_hooks.values()), list(vm._forward_hooks.values())
            if not (pre or post or private or id(vm) in swaps):
                continue
            route = _Route(host=vm, pre=pre, post=post)
            bias_dim = -1 if type(vm) in _BIAS_LAST else 1 if type(vm) in _BIAS_CHANNEL else None
            if id(vm) in swaps or (private and (private != {"bias"} or bias_dim is None)):
                route.rerun = True
                rerun_numel += sum(t.numel() for t in real_own.values())
            elif private:
                with torch.no_grad():
                    route.bias = (view_own["bias"] - real_own["bias"]).detach().clone()
                route.bias_dim = bias_dim
                # the view's copy is no longer read: point it back at the shared bias
                vm._parameters["bias"].data = real_own["bias"].data
            routes[name] = route
        return routes, rerun_numel

    def _private_tensors(self, view: nn.Module, task: Task) -> list[torch.Tensor]:
        """Every tensor this task holds that the backbone does not (for memory accounting)."""
        shared = {_storage_key(t) for t in self.backbone.parameters()} | {_storage_key(t) for t in self.backbone.buffers()}
        seen: set[tuple[str, int]] = set()
        out: list[torch.Tensor] = []

        def add(ts: Iterable[torch.Tensor]) -> None:
            for t in ts:
                key = _storage_key(t)
                if key not in shared and key not in seen and t.device.type != "meta":
                    seen.add(key)
                    out.append(t)

        for m in (view, task.head):  # the whole view: VPT/Pro-tuning keep their modules on its root
            add(m.parameters())
            add(m.buffers())
        add(r.bias for r in task.routes.values() if r.bias is not None)
        add(t for kv in task.kv.values() for t in kv)
        return out

    # -- memory ---------------------------------------------------------------------------------
    def memory_report(self) -> dict[str, Any]:
        """Bytes of tensor storage: the backbone once, then what each task adds on top of it."""
        backbone = {_storage_key(t): _storage_bytes(t) for t in (*self.backbone.parameters(), *self.backbone.buffers())}
        tasks = {}
        for name, task in list(self._tasks.items()):  # a scrape of /metrics may run beside add/remove
            tasks[name] = {"tensor_bytes": sum(_storage_bytes(t) for t in task.private),
                           "file_bytes": task.file_bytes}
        return {"backbone_bytes": sum(backbone.values()), "tasks": tasks}

    # -- running --------------------------------------------------------------------------------
    def _check_tasks(self, tasks: Sequence[str]) -> None:
        for t in tasks:
            if t not in self._tasks:
                raise UnknownTaskError(f"no task {t!r} is loaded (loaded: {', '.join(self._tasks) or 'none'})")

    def passes(self, tasks: Sequence[str]) -> list[tuple[tuple[int, str], list[int]]]:
        """How ``forward`` splits a batch: (prompt tokens, own-pass task or '') -> sample indices.

        Rows of tasks that add different numbers of tokens (VPT with other prompt lengths, or
        none) cannot share a tensor as they are. When every such task is token-wise
        (``Routing.tokenwise``), classifies, and the backbone's blocks take an attention mask,
        they share one pass instead, each row padded at the end of its sequence to the longest
        (key: that longest count), the padding masked out of attention so every row's output is
        its own model's. Padding costs compute, a pass costs a fixed overhead (hooks, small
        GEMMs): the pass is merged when the padded tokens, summed over rows, are at most
        ``pass_cost_tokens`` per pass saved.
        """
        groups: dict[tuple[int, str], list[int]] = {}
        for i, t in enumerate(tasks):
            task = self._tasks[t]
            key = (0, t) if task.own_pass else (task.tokens, "")
            groups.setdefault(key, []).append(i)
        shared = {k: idx for k, idx in groups.items() if not k[1]}
        if len(shared) > 1 and self._maskable and all(
                self._tasks[tasks[i]].tokenwise and not self._tasks[tasks[i]].levels
                for idx in shared.values() for i in idx):
            longest = max(p for p, _ in shared)
            padding = sum((longest - p) * len(idx) for (p, _), idx in shared.items())
            if padding <= self.pass_cost_tokens * (len(shared) - 1):
                for k in shared:
                    del groups[k]
                groups[(longest, "")] = sorted(i for idx in shared.values() for i in idx)
        return sorted(groups.items())

    # inference_mode, not no_grad: no version counters or view tracking on the many small ops
    # routing adds (measured on DINOv2-S @84, one thread: -6% on one task's batch of 4, -10% on
    # a batch of four tasks); the outputs are inference tensors (read them, do not edit in place)
    @torch.inference_mode()
    def forward(self, images: torch.Tensor, tasks: Sequence[str]) -> list[Any]:
        """Per sample, what that sample's task model returns for ``images[i:i+1]``.

        ``tasks[i]`` names the task of ``images[i]``. Classification: logits ``(1, K)``;
        segmentation: logits ``(1, K, S, S)``; detection: the head's output dict for one image.
        Dense tasks expect letterboxed inputs, classification tasks resized ones (see
        :mod:`vistune.serve.predict`); the model does not check which.
        """
        tasks = list(tasks)
        if images.dim() != 4 or images.shape[0] != len(tasks):
            raise ServeError(f"images must be (N, C, H, W) with one task per image; got {tuple(images.shape)} "
                             f"and {len(tasks)} task names")
        with self.lock:
            self._check_tasks(tasks)
            outputs: list[Any] = [None] * len(tasks)
            device = next(self.backbone.parameters()).device
            for (_, own), idx in self.passes(tasks):
                x = images[idx].to(device)
                names = [tasks[i] for i in idx]
                model = self._tasks[own].view if own else self.backbone
                for i, out in zip(idx, self._run_pass(model, x, names, routed=not own)):
                    outputs[i] = out
            return outputs

    __call__ = forward

    def _run_pass(self, model: nn.Module, x: torch.Tensor, names: list[str], routed: bool) -> list[Any]:
        rows: dict[str, torch.Tensor] = {}
        for j, t in enumerate(names):
            rows.setdefault(t, []).append(j)  # type: ignore[arg-type]
        rows = {t: torch.tensor(r, dtype=torch.long, device=x.device) for t, r in rows.items()}
        tasks = {t: self._tasks[t] for t in rows}
        levels = {}
        for task in tasks.values():
            for lv in task.levels:
                levels.setdefault(lv.module, lv)
        kinds = {t: get_task(task.kind) for t, task in tasks.items()}
        classify = any(k.uses_pre_logits for k in kinds.values())  # the pooled head runs only if read
        extractor = FeatureExtractor(model, list(levels.values())) if levels else None
        captured: dict[int, Any] = {}
        pre, maps = None, {}
        mask = self._padding_mask(model, x, [tasks[t].tokens for t in names]) if routed else None
        if routed:
            self._rows, self._batch_size, self._padded, self._mask = rows, x.shape[0], mask is not None, mask
        try:
            with self.precision.autocast(x.device.type):
                if mask is not None:  # passes() admits classification tasks only here
                    pre = model.forward_head(model.forward_features(x, attn_mask=mask), pre_logits=True)
                elif extractor is None:
                    pre = model.forward_head(model.forward_features(x), pre_logits=True)
                else:
                    with extractor.capture(stop=not classify) as captured:
                        try:
                            feats = model.forward_features(x)
                            if classify:
                                pre = model.forward_head(feats, pre_logits=True)
                        except StopForward:
                            pass
                    maps = self._maps(extractor, dict(captured), x)
                outputs: list[Any] = [None] * len(names)
                for t, task in tasks.items():
                    r = rows[t]
                    per = kinds[t].serve_outputs(task, pre, maps, r, tuple(x.shape[-2:]))
                    for j, o in zip(r.tolist(), per):
                        outputs[j] = o
                return outputs
        finally:
            if routed:
                self._clear_pass()

    def _clear_pass(self) -> None:
        """Forget the pass in progress (rows, mask, what routers saved of it)."""
        self._rows, self._batch_size, self._padded, self._mask = None, 0, False, None
        for router in self._routers.values():
            router.saved.clear()
        for kv_router in self._kv_routers.values():
            kv_router.clear()

    @staticmethod
    def _padding_mask(model: nn.Module, x: torch.Tensor, tokens: list[int]) -> torch.Tensor | None:
        """The key mask of a padded pass (None when every row adds the same tokens): row i's
        sequence is its prefix, its ``tokens[i]`` prompts and the patches, then padding up to the
        longest row; (B, 1, 1, N) booleans, True where attention may look."""
        longest = max(tokens)
        if min(tokens) == longest:
            return None
        real = int(getattr(model, "num_prefix_tokens", 0)) + _patch_count(model, x)
        t = torch.tensor(tokens, device=x.device)
        keys = torch.arange(real + longest, device=x.device)
        return (keys[None, :] < (real + t)[:, None])[:, None, None, :]

    def _maps(self, extractor: Any, captured: dict[int, Any], x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Captured level outputs -> NCHW maps by module name; prompt tokens are dropped first (the
        extractor reads the last H*W tokens; VPT's prompts sit between the prefix and the patches)."""
        if extractor.vit:
            model = extractor.model
            patches = _patch_count(model, x)
            prefix = int(getattr(model, "num_prefix_tokens", 0))
            for i, out in captured.items():
                if isinstance(out, torch.Tensor) and out.dim() == 3 and out.shape[1] > prefix + patches:
                    captured[i] = torch.cat([out[:, :prefix], out[:, out.shape[1] - patches:]], dim=1)
        maps = extractor.maps(captured, x)
        return {lv.module: m for lv, m in zip(extractor.levels, maps)}


def _patch_count(model: nn.Module, x: torch.Tensor) -> int:
    """Patch tokens a timm ViT makes of ``x``."""
    pe = model.patch_embed
    if getattr(model, "dynamic_img_size", False):
        ph, pw = pe.patch_size if isinstance(pe.patch_size, (tuple, list)) else (pe.patch_size,) * 2
        return (x.shape[-2] // ph) * (x.shape[-1] // pw)
    return int(pe.grid_size[0]) * int(pe.grid_size[1])


def _accepts_attn_mask(fn: Any) -> bool:
    """Whether ``fn`` takes an ``attn_mask`` argument (timm's VisionTransformer.forward_features
    passes it on to every block, which a padded pass needs; a re-run host that takes one would
    not get it)."""
    try:
        return "attn_mask" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


_tuned_path = tuned_file_of  # the one resolution of "a tuned file or its run folder" (vistune.tasks.base)
