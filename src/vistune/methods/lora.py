"""LoRA: a trainable low-rank update ΔW = (alpha/r)·B·A beside frozen weight matrices.

The update runs as a parallel branch on the activations (x·Aᵀ·Bᵀ), never by materialising
W + ΔW during training: that keeps the backward pass free of the full weight gradient, which is
what makes LoRA cheaper than full fine-tuning. ``merge()`` folds ΔW into W for zero-overhead
inference and removes every trace of the branch; ``unmerge()`` restores it.

timm fuses q, k, v into one Linear; targeting ``q,v`` adds deltas to the first and last thirds
of its output rows only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from vistune.backbones import VIT_MATRICES, is_vit, vit_block_linears
from vistune.errors import MethodError
from vistune.methods.base import Method, check_merged_finite, option


@dataclass
class LoRAOptions:
    rank: int = option(8, "r, the rank of each update B·A", min=1)
    alpha: float | None = option(None, "scale = alpha / rank; none means alpha = rank (scale 1)", min=0.0)
    targets: tuple[str, ...] = option(("q", "v"), "which matrices of each block get an update", each=VIT_MATRICES)
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


def _add_branch_output(host: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return host.lora.add_into(out, args[0])


class LoRA(Method):
    name = "lora"
    formats = ("timm", "onnx", "peft")
    Options = LoRAOptions
    mergeable = True

    def attach(self, model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> None:
        if not is_vit(model):
            raise MethodError(
                f"lora targets the q/k/v/proj/fc1/fc2 matrices of timm ViT blocks; "
                f"{type(model).__name__} has none (use spt for LoRA on CNN convolutions)"
            )
        opts: LoRAOptions = self.options
        scale = (opts.alpha if opts.alpha is not None else opts.rank) / opts.rank
        self._sites: list[tuple[nn.Linear, LoRABranch]] = []
        for bi, block in enumerate(model.blocks):
            linears = vit_block_linears(block)
            missing = [t for t in opts.targets if t not in linears]
            if missing:
                raise MethodError(f"lora: block {bi} has no {missing} Linear to target")
            by_host: dict[int, tuple[nn.Linear, dict[str, slice]]] = {}
            for t in opts.targets:
                host, sl = linears[t]
                by_host.setdefault(id(host), (host, {}))[1][t] = sl
            for host, slices in by_host.values():
                branch = LoRABranch(host.in_features, host.out_features, slices, opts.rank, scale, opts.dropout)
                branch.to(device=host.weight.device)
                self._sites.append((host, branch))
        self._attach_sites()

    def _attach_sites(self) -> None:
        for host, branch in self._sites:
            host.add_module("lora", branch)
            self.add_hook(host.register_forward_hook(_add_branch_output))

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
