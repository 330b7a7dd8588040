"""LoRA: a trainable low-rank update ΔW = (alpha/r)·B·A beside frozen weight matrices.

The update runs as a parallel branch on the activations (x·Aᵀ·Bᵀ), never by materialising
W + ΔW during training: that keeps the backward pass free of the full weight gradient, which is
what makes LoRA cheaper than full fine-tuning. ``merge()`` folds ΔW into W for zero-overhead
inference and removes every trace of the branch; ``unmerge()`` restores it.

timm fuses q, k, v into one Linear; targeting ``q,v`` adds deltas to the first and last thirds
of its output rows only.

Sites are found by *role* through :mod:`vistune.anatomy` (``q,v``, ``attn``, ``mlp``, ``pw``,
``conv`` ... mean the same on ViT, Swin, ConvNeXt, ResNet and EfficientNet), or by PEFT-style
module-name patterns (``modules=``) for anything else. A Conv2d gets :class:`ConvLoRA`: ΔW from a
k×k convolution to r channels followed by a 1×1 convolution, as PEFT's Conv2d LoRA, and it
merges exactly.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers.padding import pad_same
from torch import nn

from vistune.anatomy import GROUPS, ROLES, Site, describe, plain_conv
from vistune.backbones import BackboneError, classifier
from vistune.errors import MethodError
from vistune.methods.base import Method, check_merged_finite, option


@dataclass
class LoRAOptions:
    rank: int = option(8, "r, the rank of each update B·A", min=1)
    alpha: float | None = option(None, "scale = alpha / rank; none means alpha = rank (scale 1)", min=0.0)
    targets: tuple[str, ...] | None = option(
        None, "roles of each block to update (q,k,v,proj,fc1,fc2,pw,conv,dw or the groups attn,mlp,convs); "
        "none = the family's default (q,v on transformers, mlp on ConvNeXt, convs on ResNets, pw on EfficientNets)",
        each=ROLES + tuple(GROUPS))
    modules: tuple[str, ...] = option(
        (), "module-name patterns (fnmatch, e.g. 'layers.*.blocks.*.attn.proj'), each Linear or Conv2d "
        "they match gets an update as well (PEFT's target_modules)")
    dropout: float = option(0.0, "dropout on the branch's input", min=0.0, below=1.0)


class LoRABranch(nn.Module):
    """Low-rank deltas for chosen row-slices of one host Linear (several slices when fused)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        slices: dict[str, slice],
        rank: int,
        scale: float,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.out_features = out_features
        self.slices = dict(sorted(slices.items(), key=lambda kv: kv[1].start))
        self.scale = scale
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for key, sl in self.slices.items():
            a = nn.Parameter(torch.empty(rank, in_features))
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.A[key] = a
            self.B[key] = nn.Parameter(torch.zeros(sl.stop - sl.start, rank))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The delta to add to the host's output (same trailing size as the host)."""
        x = self.dropout(x)
        pieces: list[torch.Tensor] = []
        pos = 0
        for key, sl in self.slices.items():
            if sl.start > pos:
                pieces.append(x.new_zeros(*x.shape[:-1], sl.start - pos))
            a, b = self.A[key], self.B[key]
            pieces.append((x @ a.t().to(x.dtype)) @ b.t().to(x.dtype) * self.scale)
            pos = sl.stop
        if pos < self.out_features:
            pieces.append(x.new_zeros(*x.shape[:-1], self.out_features - pos))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)

    def add_into(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``out + delta(x)`` without building the full-width delta.

        On timm's fused qkv with targets q,v the naive delta is a (B, N, 3D) tensor two thirds
        zeros (allocate, concatenate, add, and the same again in backward). Here one skinny matmul
        projects ``x`` onto every slice's A at once and each slice's B·(A·x) is added in place
        into its rows of the host's output. In place is safe: a Linear's backward never reads its
        output, and the branch reads ``x``, not ``out``.
        """
        x = self.dropout(x)
        keys = list(self.slices)
        if len(keys) == 1:
            a = self.A[keys[0]]
            xa = x @ a.t().to(x.dtype)
        else:
            a = torch.cat([self.A[k] for k in keys])
            xa = x @ a.t().to(x.dtype)
        rank = self.A[keys[0]].shape[0]
        for j, key in enumerate(keys):
            sl = self.slices[key]
            part = xa[..., j * rank: (j + 1) * rank] if len(keys) > 1 else xa
            delta = part @ self.B[key].t().to(part.dtype)
            if sl.start == 0 and sl.stop == self.out_features:
                out = out.add(delta.to(out.dtype), alpha=self.scale)
            else:
                out[..., sl].add_(delta.to(out.dtype), alpha=self.scale)
        return out

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """ΔW with the host weight's shape (rows outside the targeted slices are zero)."""
        any_a = next(iter(self.A.values()))
        dw = torch.zeros(self.out_features, any_a.shape[1], dtype=any_a.dtype, device=any_a.device)
        for key, sl in self.slices.items():
            dw[sl] = self.B[key] @ self.A[key] * self.scale
        return dw


class ConvLoRA(nn.Module):
    """LoRA for a Conv2d: ΔW = scale·B·A reshaped to the conv weight, A: r × (in/g·kh·kw), B: out × r.

    With groups == 1 (and zero padding) the branch runs factorised, conv(x, A as r filters)
    then a 1×1 conv with B, which is exactly conv(x, ΔW) at a fraction of its cost; grouped
    convs materialise ΔW and convolve through the host's own ``_conv_forward``.
    Parameters are keyed ``all`` to share the key layout of :class:`LoRABranch`.
    """

    def __init__(self, conv: nn.Conv2d, rank: int, scale: float = 1.0, dropout: float = 0.0) -> None:
        super().__init__()
        out, in_g, kh, kw = conv.weight.shape
        self.weight_shape = (out, in_g, kh, kw)
        self.scale = scale
        self.A = nn.ParameterDict({"all": nn.Parameter(torch.empty(rank, in_g * kh * kw))})
        self.B = nn.ParameterDict({"all": nn.Parameter(torch.zeros(out, rank))})
        nn.init.kaiming_uniform_(self.A["all"], a=math.sqrt(5))
        self.factorised = conv.groups == 1 and conv.padding_mode == "zeros"
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, host: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        if type(host) is not nn.Conv2d:  # timm's Conv2dSame: the host's dynamic 'same' pad, then padding 0
            x = pad_same(x, host.kernel_size, host.stride, host.dilation)
        a, b = self.A["all"].to(x.dtype), self.B["all"].to(x.dtype)
        out, in_g, kh, kw = self.weight_shape
        if self.factorised:
            h = F.conv2d(x, a.view(-1, in_g, kh, kw), None, host.stride, host.padding, host.dilation)
            y = F.conv2d(h, b.view(out, -1, 1, 1))
        else:
            y = host._conv_forward(x, (b @ a).view(self.weight_shape), None)
        return y * self.scale if self.scale != 1.0 else y

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        return (self.B["all"] @ self.A["all"]).view(self.weight_shape) * self.scale


def _add_branch_output(host: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return host.lora.add_into(out, args[0])


def _add_conv_output(host: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out + host.lora(host, args[0]).to(out.dtype)


def _weight_bypassed(model: nn.Module, site: Site) -> bool:
    """True when the site's parent reads ``weight`` with F.linear instead of calling the module.

    timm's EVA and Swin-V2 attention compute ``F.linear(x, self.qkv.weight, q/k/v biases)`` when
    they hold separate q/v biases, so a forward hook on ``qkv`` would never run and the update
    would silently do nothing.
    """
    parent_name = site.name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    return (getattr(parent, "qkv", None) is site.module and getattr(parent, "q_bias", None) is not None
            and not getattr(parent, "qkv_bias_separate", False))


class LoRA(Method):
    name = "lora"
    formats = ("timm", "onnx", "peft")
    Options = LoRAOptions
    mergeable = True
    tokenwise_hooks = True  # see Routing.tokenwise

    def attach(self, model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> None:
        opts: LoRAOptions = self.options
        sites = self._select(model, opts)
        scale = (opts.alpha if opts.alpha is not None else opts.rank) / opts.rank
        device = next(model.parameters()).device
        by_host: dict[int, tuple[nn.Module, dict[str, slice]]] = {}
        for site in sites:
            slices = by_host.setdefault(id(site.module), (site.module, {}))[1]
            # Keys are the roles (``lora.A.q``: the layout tuned files and the PEFT exporter know).
            slices["all" if site.role == "module" else site.role] = site.rows
        self._sites: list[tuple[nn.Module, nn.Module]] = []
        for host, slices in by_host.values():
            if isinstance(host, nn.Conv2d):
                branch: nn.Module = ConvLoRA(host, opts.rank, scale, opts.dropout)
            else:
                branch = LoRABranch(host.in_features, host.out_features, slices, opts.rank, scale, opts.dropout)
            branch.to(device=device)
            self._sites.append((host, branch))
        self._attach_sites()

    def _select(self, model: nn.Module, opts: LoRAOptions) -> list[Site]:
        """The sites ``targets`` and ``modules`` name; records the resolved targets in the options."""
        try:
            anatomy = describe(model)
        except BackboneError as err:
            if not opts.modules:
                raise MethodError(f"lora: {err}; name modules with modules=PATTERN") from None
            anatomy = None
        sites: list[Site] = []
        if anatomy is not None and (opts.targets is not None or not opts.modules):
            targets = opts.targets if opts.targets is not None else anatomy.default_roles
            try:
                sites = anatomy.sites(targets)
            except BackboneError as err:
                raise MethodError(f"lora: {err}") from None
            self.options = dataclasses.replace(opts, targets=tuple(targets))
        sites += _pattern_sites(model, opts.modules, {id(s.module) for s in sites})
        bypassed = [s.name for s in sites if _weight_bypassed(model, s)]
        if bypassed:
            arch = anatomy.arch if anatomy is not None else type(model).__name__
            raise MethodError(
                f"lora: {arch} computes {bypassed[0]} with F.linear on its weight (separate q/v biases), so an "
                "update there would never run; target proj,fc1,fc2 instead, or use spt"
            )
        return sites

    def _attach_sites(self) -> None:
        for host, branch in self._sites:
            host.add_module("lora", branch)
            hook = _add_conv_output if isinstance(branch, ConvLoRA) else _add_branch_output
            self.add_hook(host.register_forward_hook(hook))

    def modules(self) -> list[nn.Module]:
        return [branch for _, branch in self._sites]

    @torch.no_grad()
    def merge(self, model: nn.Module) -> None:
        # Check every site first, write none unless all are finite (recomputing ΔW below is a
        # rank-r matmul per site: cheaper than holding every merged weight at once).
        for host, branch in self._sites:
            check_merged_finite(model, host, "weight", host.weight + branch.delta_weight().to(host.weight.dtype))
        for host, branch in self._sites:
            host.weight += branch.delta_weight().to(host.weight.dtype)
            del host._modules["lora"]
        self.remove_hooks()
        self.merged = True

    @torch.no_grad()
    def unmerge(self, model: nn.Module) -> None:
        for host, branch in self._sites:
            host.weight -= branch.delta_weight().to(host.weight.dtype)
        self._attach_sites()
        self.merged = False


def _rows(module: nn.Module) -> int:
    return int(module.out_channels if isinstance(module, nn.Conv2d) else module.out_features)


def _pattern_sites(model: nn.Module, patterns: tuple[str, ...], taken: set[int]) -> list[Site]:
    """Sites for PEFT-style module-name patterns; each must match, and only Linear/Conv2d."""
    out: list[Site] = []
    # The classifier is trained as the head of every method, never carries an update.
    head = {id(m) for m in classifier(model).modules()} if hasattr(model, "get_classifier") else set()
    names = [n for n, m in model.named_modules() if n and id(m) not in head]
    carriers = [n for n in names if type(model.get_submodule(n)) in (nn.Linear, nn.Conv2d)]
    for pattern in patterns:
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern) or n.endswith("." + pattern) or n == pattern]
        if not matched:
            raise MethodError(
                f"lora: modules pattern {pattern!r} matches no backbone module of {type(model).__name__} "
                f"(its Linear/Conv2d modules are named like {', '.join(carriers[:2])}, ..., {carriers[-1]})"
            )
        for name in matched:
            module = model.get_submodule(name)
            if type(module) is not nn.Linear and not plain_conv(module):
                raise MethodError(
                    f"lora: modules pattern {pattern!r} matches {name!r}, a {type(module).__name__}; "
                    "only nn.Linear and nn.Conv2d can carry an update"
                )
            if id(module) not in taken:
                taken.add(id(module))
                out.append(Site("module", module, slice(0, _rows(module)), name))
    return out
