"""SPT: sensitivity-aware parameter-efficient tuning (He et al., ICCV 2023; METHODS.md §2).

Stage A (``vistune.sensitivity``) scores every backbone entry and allocates a parameter budget;
this method (stage B) turns the :class:`~vistune.sensitivity.Allocation` into modules on an
unmodified timm model:

* **Unstructured entries** get a zero-initialised delta on exactly those positions, through a
  :class:`SparseDelta` child of the module that owns the parameter (``<host>.spt_sparse``, with
  ``<attr>_idx``, a persistent long buffer of flat indices, and ``<attr>_delta``). A forward
  pre-hook puts ``W + scatter(delta)`` in the host's parameter slot for the duration of its
  forward and a forward hook (``always_call``, so also after an exception) puts the original
  parameter back. Whatever the host does with its parameter (a Linear's matmul, a LayerNorm's or
  BatchNorm's affine, a LayerScale, a conv) therefore sees the updated value, so the rule is the
  same for every module type: LayerNorm/BatchNorm entries are tuned, not silently dropped as in
  the reference. The base parameter never requires grad and is never written; only ``delta``
  receives gradients (scatter's backward is a gather of ∂L/∂W'). For a Linear's weight whose
  entries span a small sub-matrix (rows R × columns C; the usual case) autograd's ∂L/∂W' would be
  the full out×in weight gradient, the cost of full fine-tuning: there ``W'`` goes in as a constant
  (built directly in autocast's dtype under autocast) and a gradient tap on the output
  (:class:`_SparseWeightGrad`) computes ∂L/∂Δ from ``(∂L/∂y)[:, R]ᵀ · x[:, C]``, an |R|×|C| GEMM.
  Same values as the differentiable swap (bit-identical outputs); one weight-sized copy per such
  Linear per forward (in fp32; under autocast it replaces autocast's own cast). ``merge()``
  removes all of it.
* **Structured matrices** get LoRA (a parallel low-rank branch, ``<host>.spt_lora``; for a third
  of a fused qkv only those output rows; on a Conv2d a rank-r delta of the (out × in·kh·kw)
  matrix) or an adapter (``<host>.spt_adapter``): a bottleneck ``up(GELU(down(·)))`` on the
  matrix's output rows added to them (sequential, as the reference does for q/k/v/fc1/fc2 and we
  do for convs, on the channel dimension), and for ``proj`` a parallel bottleneck reading proj's
  input, as in the reference. Simplifications: no branch dropout or drop-path (the reference uses
  0.1 of each) and no α/r scaling on LoRA (the reference has none either).
* **Whole vectors** are the backbone's own parameters marked tuned; a whole third of a fused qkv
  bias cannot be marked on its own and becomes a sparse delta over that range (same count).

The allocation travels inside the tuned file: the sparse indices are the ``*_idx`` buffers
(returned by :meth:`tuned_buffers`), structured modules and their rows are named by their keys
(``<host>.spt_lora.A.<part>``, ``<host>.spt_adapter.adapters.<part>...``, part = ``q``/``k``/``v``
or ``all``) and whole vectors by the backbone parameter names. ``attach(model, state=...)``
rebuilds exactly that allocation and never reads a scores file.

Merging folds sparse deltas (W.flat[idx] += delta) and LoRA (W += B·A) into the weights and
removes every module and hook; unmerge subtracts LoRA and restores the sparse entries' saved
original values bit-exactly. Adapters sit behind a GELU, so an allocation holding any adapter
raises :class:`~vistune.errors.NotMergeableError`.

Limits of the parameter swap: (1) the module that registered a parameter must be the one whose
forward reads it. That holds for timm's ViT, ResNet, ConvNeXt, EfficientNet...; a model whose
parent reads a child's weight directly (timm's EVA computes ``F.linear(x, self.qkv.weight)``)
would silently ignore that delta, as it would ignore LoRA's hook. (2) While a forward runs, the
host's parameter slot holds the updated tensor, so one model instance must not run forwards from
several threads at once; merge it for serving.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vistune.backbones import backbone_info
from vistune.errors import MethodError, NotMergeableError
from vistune.methods.adapter import Bottleneck
from vistune.methods.base import Method, Routing, check_merged_finite, option
from vistune.methods.lora import ConvLoRA, LoRABranch
from vistune.sensitivity import (
    STRUCTURED_TYPES,
    Allocation,
    SensitivityError,
    Unit,
    UnitChoice,
    accumulate_sensitivity,
    allocate,
    backbone_param_count,
    check_budget,
    load_scores,
    pool_parameters,
    pool_units,
    save_scores,
)

SPARSE, LORA, ADAPTER = "spt_sparse", "spt_lora", "spt_adapter"
#: A Linear's sparse weight entries span a sub-matrix (their distinct rows × distinct columns).
#: Up to this share of the full matrix, their gradient is that small dense sub-matrix's, an |R|×|C|
#: GEMM on the output gradient (:class:`_SparseWeightGrad`); above it, a differentiable swap of
#: W + scatter(Δ) and the full out×in weight-gradient GEMM cost about the same. Sensitivity concentrates the
#: entries in few columns: on DINOv2-S a typical host has 100-1,000 entries in 20-250 rows × 10-100
#: columns, 1-5% of the matrix.
SUBMATRIX_MAX_SHARE = 0.25


@dataclass
class SPTOptions:
    budget: str = option("0.4M", "tuned parameters: 400000 | 400k | 0.4M | 0.5% (of the backbone, head excluded)")
    structured: str = option("lora", "what a sensitive matrix gets: lora | adapter | none (sparse entries and "
                             "whole vectors only)", choices=STRUCTURED_TYPES)
    alpha: float = option(10.0, "a matrix is structured when n(W) >= P_struct(W) / alpha", min=1e-12)
    beta: float = option(5.0, "a vector is tuned whole when n >= len / beta", min=1e-12)
    rank: int = option(8, "LoRA rank / adapter bottleneck of structured matrices", min=1)
    sensitivity: str | None = option(None, "scores file from `vistune sensitivity` (ignored when loading)")
    fill: bool = option(False, "top up to the exact budget past the closest top-k (see sensitivity.Allocator)")

    def validate(self) -> None:
        try:
            check_budget(self.budget)
        except SensitivityError as err:
            raise ValueError(str(err)) from None


# ------------------------------------------------------------------------------------------------
# Modules


class SparseDelta(nn.Module):
    """Deltas on chosen flat entries of its host's own parameters (one pair per parameter)."""

    def __init__(self, entries: dict[str, tuple[torch.Tensor, torch.dtype]]) -> None:
        super().__init__()
        self.attrs = tuple(sorted(entries))
        for attr in self.attrs:
            idx, dtype = entries[attr]
            self.register_buffer(f"{attr}_idx", idx.to(torch.long).clone(), persistent=True)
            setattr(self, f"{attr}_delta", nn.Parameter(torch.zeros(idx.numel(), dtype=dtype, device=idx.device)))
        self._stash: dict[str, nn.Parameter] = {}  # host parameters swapped out during a forward

    def index(self, attr: str) -> torch.Tensor:
        return getattr(self, f"{attr}_idx")

    def delta(self, attr: str) -> nn.Parameter:
        return getattr(self, f"{attr}_delta")

    def updated(self, attr: str, base: torch.Tensor) -> torch.Tensor:
        """``base + scatter(delta)``, differentiable in ``delta`` only."""
        flat = base.detach().reshape(-1)
        return flat.index_add(0, self.index(attr), self.delta(attr).to(flat.dtype)).view_as(base)

    @torch.no_grad()
    def constant(self, attr: str, base: torch.Tensor) -> torch.Tensor:
        """``base + scatter(delta)`` as a constant, already in autocast's dtype when autocast would
        cast it for the host's matmul: the same values elementwise (a cast is elementwise), without
        the full-precision copy that would only be cast again."""
        cast = _autocast_dtype(base)
        if cast is None:
            return self.updated(attr, base)
        flat = base.detach().reshape(-1)
        idx = self.index(attr)
        out = flat.to(cast)
        out[idx] = (flat[idx] + self.delta(attr).to(flat.dtype)).to(cast)  # indices are distinct (grad_tapped)
        return out.view_as(base)

    #: Sparse weight deltas of a Linear get their gradient from a tap on the output (fast); False
    #: swaps the weight differentiably as for every other parameter (what graph exporters need:
    #: a traced graph must not hold a custom autograd Function).
    fast_linear: bool = True

    def linear_entries(self, host: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(rows, cols, local) when ``host`` is a Linear whose sparse weight deltas get their
        gradient from the output tap: the distinct rows R and columns C the entries touch, and each
        entry's flat index in the |R|×|C| sub-matrix. None: a differentiable swap (export mode,
        entries spread over more than ``SUBMATRIX_MAX_SHARE`` of the matrix, or repeated entries).

        A differentiable swap of ``W + scatter(delta)`` makes autograd compute the full ``out × in``
        weight gradient only to gather k entries from it — the cost that made SPT nearly as slow as
        full fine-tuning. The sub-matrix keeps every product dense (GEMMs, no per-entry scatter over
        tokens) at the size the entries actually span.
        """
        if not self.fast_linear or not isinstance(host, nn.Linear) or "weight" not in self.attrs:
            return None
        key = "_submatrix"
        cached = self.__dict__.get(key)
        idx = self.index("weight")
        if cached is None or cached[0] is not idx or cached[1] != idx._version:  # a load may rewrite it in place
            rows, r_local = (idx // host.in_features).unique(return_inverse=True)
            cols, c_local = (idx % host.in_features).unique(return_inverse=True)
            local = r_local * cols.numel() + c_local
            small = rows.numel() * cols.numel() <= SUBMATRIX_MAX_SHARE * host.out_features * host.in_features
            distinct = local.unique().numel() == local.numel()  # a repeated entry adds twice: keep the swap
            cached = (idx, idx._version, (rows, cols, local) if small and distinct else None)
            self.__dict__[key] = cached
        return cached[2]

    def grad_tapped(self, host: nn.Module, attr: str) -> bool:
        """Whether ``attr`` of ``host`` is swapped in as a constant ``W + scatter(Δ)`` whose delta
        gradient a :class:`_SparseWeightGrad` tap on the host's output supplies (a Linear's weight
        with entries in a small sub-matrix), instead of a differentiable swap."""
        return attr == "weight" and self.linear_entries(host) is not None


class _SparseWeightGrad(torch.autograd.Function):
    """Identity on a Linear's output ``y`` whose backward also returns the gradient of the sparse
    weight deltas: ``∂L/∂Δ[e] = Σ_n ∂L/∂y[n, r_e] · x[n, c_e]``, computed as the |R|×|C| GEMM
    ``(∂L/∂y)[:, R]ᵀ · x[:, C]`` and gathered at the k entries.

    Why: the host's own matmul already ran with the constant ``W' = W + scatter(Δ)`` swapped in, so
    its forward value and its input gradient ``∂L/∂y · W'`` are those of a differentiable swap; only
    ``∂L/∂Δ`` is missing, and autograd would get it from the full out×in weight gradient (the cost
    of full fine-tuning). The previous fast path (``y[:, R] += x[:, C]·Sᵀ``, in place on a view of
    the output) cost as much again in the backward: a clone of the whole output gradient for the
    in-place edit, an input-sized zero fill + index_add for ``x[:, C]``'s gradient, and an
    input-sized add to merge it with the matmul's. Here nothing output- or input-sized is
    allocated: the forward keeps ``x[:, C]`` (N×|C|) and the backward reads ``∂L/∂y[:, R]``.

    The output shares ``y``'s storage (``detach``, not a view) so that later hooks may write into
    it in place (SPT-LoRA on another third of the same qkv), as they may into ``y``.
    """

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, x_cols: torch.Tensor, delta: torch.Tensor,  # type: ignore[override]
                rows: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_cols, rows, local)
        ctx.delta_dtype = delta.dtype
        return y.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor, None, None]:  # type: ignore[override]
        x_cols, rows, local = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        g = g.gather(1, rows.expand(g.shape[0], -1))  # gather: 2-5x faster than index_select on dim 1 (CPU)
        sub = g.t() @ x_cols.to(g.dtype)
        return grad, None, sub.reshape(-1).index_select(0, local).to(ctx.delta_dtype), None, None


def _autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast casts ``t`` to for a matmul, or None when it leaves ``t`` as it is."""
    kind = t.device.type
    if t.dtype != torch.float32 or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def _swap_in(host: nn.Module, args: tuple) -> None:
    sparse: SparseDelta = host._modules[SPARSE]
    for attr in sparse.attrs:
        base = sparse._stash.get(attr, host._parameters[attr])
        sparse._stash[attr] = base
        if sparse.grad_tapped(host, attr):  # a constant W': its delta's gradient comes from the output tap
            host._parameters[attr] = sparse.constant(attr, base)
        else:
            host._parameters[attr] = sparse.updated(attr, base)


def _swap_out(host: nn.Module, args: tuple, out: Any) -> None:
    sparse: SparseDelta = host._modules[SPARSE]
    for attr, base in sparse._stash.items():
        host._parameters[attr] = base
    sparse._stash.clear()


def _sparse_linear_grad(host: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """Route the sparse weight deltas' gradient through the Linear's output (see
    :class:`_SparseWeightGrad`); its value already holds them (``W'`` was swapped in)."""
    sparse: SparseDelta = host._modules[SPARSE]
    if not sparse.grad_tapped(host, "weight"):  # switched to differentiable swaps (export), or spread out
        return out
    delta = sparse.delta("weight")
    if not (torch.is_grad_enabled() and delta.requires_grad):
        return out
    rows, cols, local = sparse.linear_entries(host)  # type: ignore[misc]
    x = args[0].detach().reshape(-1, args[0].shape[-1])
    x_cols = x.gather(1, cols.expand(x.shape[0], -1)).to(out.dtype)  # (N, |C|)
    return _SparseWeightGrad.apply(out, x_cols, delta, rows, local)


def _lora_linear(host: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return host._modules[LORA].add_into(out, args[0])


def _lora_conv(host: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out + host._modules[LORA](host, args[0])


class SPTAdapter(nn.Module):
    """Bottlenecks on row blocks of one host's output (sequential) or reading its input (parallel).

    ``parts`` maps a part name to (first row, last row + 1, parallel). ``channel_dim`` is where
    the host's output features live: -1 for Linear, 1 for Conv2d.
    """

    def __init__(self, parts: dict[str, tuple[int, int, bool]], in_features: int, out_features: int,
                 rank: int, channel_dim: int) -> None:
        super().__init__()
        self.parts = dict(sorted(parts.items(), key=lambda kv: kv[1][0]))
        self.out_features = out_features
        self.channel_dim = channel_dim
        self.adapters = nn.ModuleDict({
            name: Bottleneck(in_features if parallel else stop - start, rank, stop - start)
            for name, (start, stop, parallel) in self.parts.items()
        })

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.channel_dim != -1:
            # non-negative dims: the TorchScript ONNX exporter turns movedim(-1, 1) into an invalid Transpose
            x, y = x.movedim(self.channel_dim, x.ndim - 1), y.movedim(self.channel_dim, y.ndim - 1)
        pieces: list[torch.Tensor] = []
        pos = 0
        # under autocast the bottleneck's Linears cast their input themselves; casting it to the
        # adapter's dtype first would add two copies (and two in backward) for the same values
        cast = not torch.is_autocast_enabled(y.device.type)
        for name, (start, stop, parallel) in self.parts.items():
            if start > pos:
                pieces.append(y.new_zeros(*y.shape[:-1], start - pos))
            source = x if parallel else y[..., start:stop]
            if cast:
                source = source.to(self.adapters[name].up.weight.dtype)
            pieces.append(self.adapters[name](source).to(y.dtype))
            pos = stop
        if pos < self.out_features:
            pieces.append(y.new_zeros(*y.shape[:-1], self.out_features - pos))
        delta = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
        out = y + delta
        return out.movedim(out.ndim - 1, self.channel_dim) if self.channel_dim != -1 else out


def _adapter(host: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return host._modules[ADAPTER](args[0], out)


# ------------------------------------------------------------------------------------------------
# The method


class SPT(Method):
    """Sensitivity-chosen sparse deltas, whole vectors and LoRA/adapters on the most sensitive matrices."""

    name = "spt"
    formats = ("timm", "onnx")  # timm only while the allocation holds no adapter (mergeable)
    not_mergeable_reason = ("its allocation holds adapters (structured=adapter), which sit behind a GELU and "
                            "cannot be merged")
    Options = SPTOptions
    mergeable = True  # per instance: False once the allocation holds an adapter

    #: SPT's reference sensitivity pass: 16 batches (of 32 images for classification)
    SENSITIVITY_BATCHES = 16

    @classmethod
    def prepare(cls, backbone: nn.Module, options: dict[str, Any], probe: Any) -> dict[str, Any]:
        """Measure the sensitivity scores with the task's loss unless a scores file exists.

        The file is ``options["sensitivity"]`` or the task's ``probe.scores_path``; it is computed
        when absent and reused when present (its fingerprint is checked at attach).
        """
        path = options.get("sensitivity") or probe.scores_path
        if path is None:
            raise MethodError("spt needs a place for its sensitivity scores: give sensitivity=FILE or an output folder")
        if not Path(path).is_file():
            t0 = time.perf_counter()
            losses = probe.losses(backbone, cls.SENSITIVITY_BATCHES)
            scores, used = accumulate_sensitivity(backbone, losses, cls.SENSITIVITY_BATCHES)
            save_scores(path, scores, backbone, {"batch_size": probe.batch_size, "num_batches": used,
                                                 "data": probe.data_label, "loss": probe.loss_name,
                                                 "seconds": time.perf_counter() - t0})
        return {**options, "sensitivity": str(path)}

    def attach(self, model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> None:
        opts: SPTOptions = self.options
        if state is not None:
            allocation = allocation_from_state(model, state, opts)
        else:
            if not opts.sensitivity:
                raise MethodError(
                    "spt needs sensitivity scores: pass sensitivity=FILE (made by `vistune sensitivity` "
                    "or vistune.sensitivity.compute_sensitivity + save_scores)"
                )
            scores = load_scores(opts.sensitivity, model)
            allocation = allocate(model, scores, opts.budget, opts.structured, opts.alpha, opts.beta,
                                  opts.rank, fill=opts.fill)
        self.allocation: Allocation = allocation
        self._build(model, allocation)

    # -- building ---------------------------------------------------------------------------
    def _build(self, model: nn.Module, allocation: Allocation) -> None:
        opts: SPTOptions = self.options
        modules = dict(model.named_modules())
        params = dict(model.named_parameters())
        owner = {u.param: (u.module, u.attr) for u in pool_units(model)}
        self._sites: list[tuple[nn.Module, str, nn.Module]] = []  # (host, child name, child)
        self._originals: dict[int, dict[str, torch.Tensor]] = {}  # sparse values saved at merge

        sparse: dict[str, dict[str, tuple[torch.Tensor, torch.dtype]]] = {}
        for pname, idx in allocation.sparse_indices().items():
            mname, attr = owner[pname]
            p = params[pname]
            sparse.setdefault(mname, {})[attr] = (idx.to(p.device), p.dtype)
        for mname, entries in sparse.items():
            self._add_site(modules[mname], SPARSE, SparseDelta(entries))

        by_host: dict[str, list[Unit]] = {}
        for u in allocation.structured_units():
            by_host.setdefault(u.module, []).append(u)
        for mname, units in by_host.items():
            host = modules[mname]
            weight = host.weight
            if opts.structured == "lora" and isinstance(host, nn.Linear):
                slices = {u.part: slice(u.start // u.cols, u.start // u.cols + u.rows) for u in units}
                child = LoRABranch(host.in_features, host.out_features, slices, opts.rank, 1.0)
            elif opts.structured == "lora" and isinstance(host, nn.Conv2d):
                child = ConvLoRA(host, opts.rank)
            elif opts.structured == "adapter" and isinstance(host, (nn.Linear, nn.Conv2d)):
                parts = {u.part: (u.start // u.cols, u.start // u.cols + u.rows, u.parallel) for u in units}
                out_features = weight.shape[0]
                child = SPTAdapter(parts, units[0].in_features, out_features, opts.rank,
                                   -1 if isinstance(host, nn.Linear) else 1)
            else:
                raise MethodError(f"spt: cannot place a {opts.structured} module on {mname} ({type(host).__name__})")
            child.to(device=weight.device, dtype=weight.dtype)
            self._add_site(host, LORA if opts.structured == "lora" else ADAPTER, child)

        self._whole = [params[name] for name in allocation.whole_params()]
        self.mergeable = not any(kind == ADAPTER for _, kind, _ in self._sites)
        self._attach_sites()

    def _add_site(self, host: nn.Module, kind: str, child: nn.Module) -> None:
        if kind in host._modules:
            raise MethodError(f"spt: {type(host).__name__} already has a child named {kind!r}")
        self._sites.append((host, kind, child))

    def _attach_sites(self) -> None:
        for host, kind, child in self._sites:
            host.add_module(kind, child)
            if kind == SPARSE:
                self.add_hook(host.register_forward_pre_hook(_swap_in))
                self.add_hook(host.register_forward_hook(_swap_out, always_call=True))
                if isinstance(host, nn.Linear):  # first: it taps ∂L/∂y of the Linear itself, not of y + adapter
                    self.add_hook(host.register_forward_hook(_sparse_linear_grad, prepend=True))
            elif kind == LORA:
                self.add_hook(host.register_forward_hook(_lora_conv if isinstance(child, ConvLoRA) else _lora_linear))
            else:
                self.add_hook(host.register_forward_hook(_adapter))

    # -- the contract -----------------------------------------------------------------------
    def modules(self) -> list[nn.Module]:
        return [child for _, _, child in self._sites]

    def tuned_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for m in self.modules() for p in m.parameters()] + list(self._whole)

    def trace_friendly(self, on: bool = True) -> None:
        """Give sparse Linear deltas their gradient by differentiable weight swaps (``on``) instead
        of the output tap: the same function, in plain ops only (a traced graph must not hold a
        custom autograd Function, and a tracer with grad enabled would record the tap)."""
        for _, kind, child in self._sites:
            if kind == SPARSE:
                child.fast_linear = not on

    def routing(self) -> Routing:
        """Sparse deltas swap their host's parameters during its forward: a server re-runs those hosts."""
        return Routing(swaps=tuple(host for host, kind, _ in self._sites if kind == SPARSE), tokenwise=True)

    @torch.no_grad()
    def merge(self, model: nn.Module) -> None:
        adapters = [child for _, kind, child in self._sites if kind == ADAPTER]
        if adapters:
            raise NotMergeableError(
                f"spt placed {len(adapters)} adapter(s) (structured=adapter): an adapter is a bottleneck "
                "behind a GELU, not a change of the weights, so it cannot be merged; keep it attached, or "
                "use structured=lora for a mergeable SPT"
            )
        for host, kind, child in self._sites:  # all sites are checked before any is written
            if kind == SPARSE:
                for attr in child.attrs:
                    flat = host._parameters[attr].data.view(-1)
                    idx = child.index(attr)
                    check_merged_finite(model, host, attr, flat[idx] + child.delta(attr).to(flat.dtype))
            else:
                check_merged_finite(model, host, "weight",
                                    host.weight + child.delta_weight().view_as(host.weight).to(host.weight.dtype))
        for host, kind, child in self._sites:
            if kind == SPARSE:
                saved = {}
                for attr in child.attrs:
                    flat = host._parameters[attr].data.view(-1)
                    idx = child.index(attr)
                    saved[attr] = flat[idx].clone()
                    flat.index_add_(0, idx, child.delta(attr).to(flat.dtype))
                self._originals[id(child)] = saved
            else:
                host.weight += child.delta_weight().view_as(host.weight).to(host.weight.dtype)
            del host._modules[kind]
        self.remove_hooks()
        self.merged = True

    @torch.no_grad()
    def unmerge(self, model: nn.Module) -> None:
        for host, kind, child in self._sites:
            if kind == SPARSE:
                for attr, values in self._originals.pop(id(child)).items():
                    host._parameters[attr].data.view(-1)[child.index(attr)] = values
            else:
                host.weight -= child.delta_weight().view_as(host.weight).to(host.weight.dtype)
        self._attach_sites()
        self.merged = False


# ------------------------------------------------------------------------------------------------
# Rebuilding an allocation from a tuned file


def _split_key(key: str, child: str) -> tuple[str, str] | None:
    """``"blocks.0.attn.qkv.spt_lora.A.q"`` → ``("blocks.0.attn.qkv", "A.q")`` for child ``spt_lora``."""
    if key.startswith(child + "."):
        return "", key[len(child) + 1:]
    host, sep, rest = key.partition(f".{child}.")
    return (host, rest) if sep else None


def allocation_from_state(model: nn.Module, state: dict[str, torch.Tensor], opts: SPTOptions) -> Allocation:
    """The allocation a tuned file holds, read from its tensor names and index buffers.

    Structured modules are named by their keys, whole vectors by backbone parameter names and
    sparse entries by the ``*_idx`` buffers; other keys (the head) are left to the loader, which
    checks the full key set. Nothing is read from a scores file.
    """
    units = pool_units(model)
    by_param: dict[str, list[Unit]] = {}
    for u in units:
        by_param.setdefault(u.param, []).append(u)
    pool = dict(pool_parameters(model))
    modes: dict[tuple[str, str], tuple[str, torch.Tensor | None]] = {}  # (param, part) → mode, indices

    def structured(host: str, part: str, key: str, kind: str) -> None:
        if opts.structured != kind:
            raise MethodError(f"spt: tuned file holds {kind} tensor {key!r}, but structured={opts.structured!r}")
        param = f"{host}.weight" if host else "weight"
        if not any(u.part == part and u.kind == "matrix" for u in by_param.get(param, [])):
            raise MethodError(f"spt: tuned-file tensor {key!r} names no {part!r} matrix of this backbone")
        modes[(param, part)] = ("structured", None)

    for key, tensor in state.items():
        if (split := _split_key(key, SPARSE)) is not None:
            host, rest = split
            if not rest.endswith("_idx"):
                continue
            attr = rest[: -len("_idx")]
            param = f"{host}.{attr}" if host else attr
            if param not in by_param:
                raise MethodError(f"spt: tuned-file index buffer {key!r} names no tunable parameter")
            flat = tensor.to(torch.long).reshape(-1)
            if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= pool[param].numel()):
                raise MethodError(f"spt: tuned-file index buffer {key!r} points outside {param!r}")
            for u in by_param[param]:
                inside = flat[(flat >= u.start) & (flat < u.start + u.numel)] - u.start
                if inside.numel():
                    whole = u.kind == "vector" and u.part != "all" and inside.numel() == u.numel
                    modes[(param, u.part)] = ("whole", None) if whole else ("unstructured", inside)
        elif (split := _split_key(key, LORA)) is not None:
            host, rest = split
            if rest.startswith("A."):
                structured(host, rest[2:], key, "lora")
        elif (split := _split_key(key, ADAPTER)) is not None:
            host, rest = split
            if rest.startswith("adapters.") and rest.endswith(".down.weight"):
                structured(host, rest[len("adapters."):-len(".down.weight")], key, "adapter")
        elif key in pool:
            if [u.kind for u in by_param[key]] != ["vector"]:
                raise MethodError(f"spt: tuned file tunes {key!r} whole, but only whole vectors are tuned so")
            modes[(key, "all")] = ("whole", None)

    choices: list[UnitChoice] = []
    for u in units:
        mode, inside = modes.get((u.param, u.part), ("none", None))
        if mode == "structured":
            choices.append(UnitChoice(u, mode, u.module_size(opts.structured, opts.rank)))
        elif mode == "whole":
            choices.append(UnitChoice(u, mode, u.numel))
        elif mode == "unstructured":
            n = int(inside.numel())
            choices.append(UnitChoice(u, mode, n, n, torch.sort(inside).values))
        else:
            choices.append(UnitChoice(u, "none", 0, 0))
    return Allocation(
        arch=backbone_info(model).arch, structured_type=opts.structured, rank=opts.rank, alpha=opts.alpha,
        beta=opts.beta, choices=choices, pool_size=sum(u.numel for u in units),
        backbone_params=backbone_param_count(model), extra={"from": "tuned file"},
    )
