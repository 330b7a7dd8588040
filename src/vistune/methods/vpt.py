"""VPT: visual prompt tuning (Jia et al., ECCV 2022), shallow and deep.

Prompts are inserted between the prefix tokens (CLS, registers) and the patch tokens, after the
position embedding, and never receive one. Deep prompts *replace* the prompt slots before every
block i >= 1. Prompts are stripped after the last block, so timm's own final norm, pooling and
head run unchanged: with token pooling the head reads the CLS token, as in the paper.

We attach through forward hooks on timm's existing blocks instead of wrapping or copying them:
the backbone's module tree and state-dict keys stay exactly timm's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from vistune.backbones import is_vit, vit_geometry
from vistune.errors import MethodError
from vistune.methods.base import VPT_SGD_SEARCH, Method, Routing, option


@dataclass
class VPTOptions:
    length: int = option(50, "prompt tokens per layer (VPT's p: 1-200 in the paper's grid)", min=1)
    deep: bool = option(False, "new prompts at every block's input (deep) or only before the first (shallow)")
    dropout: float = option(0.0, "dropout on the prompt tokens (VPT uses 0.1 on some tasks)", min=0.0, below=1.0)


class VPTPrompts(nn.Module):
    """The prompt tensors: (1, p, D) shallow, plus (depth-1, p, D) deep."""

    def __init__(self, length: int, width: int, depth: int, patch: int, deep: bool, dropout: float):
        super().__init__()
        bound = math.sqrt(6.0 / float(3 * patch * patch + width))
        self.shallow = nn.Parameter(torch.empty(1, length, width))
        nn.init.uniform_(self.shallow, -bound, bound)
        if deep and depth > 1:
            self.deep = nn.Parameter(torch.empty(depth - 1, length, width))
            nn.init.uniform_(self.deep, -bound, bound)
        else:
            self.deep = None
        self.dropout = nn.Dropout(dropout)
        self.length = length


class VPT(Method):
    name = "vpt"
    search_space = VPT_SGD_SEARCH
    not_mergeable_reason = "its prompt tokens are extra inputs to the blocks, not weights of the architecture"
    Options = VPTOptions

    def attach(self, model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> None:
        if not is_vit(model):
            raise MethodError(
                f"vpt needs a timm VisionTransformer-like backbone; {type(model).__name__} has no "
                "patch_embed/blocks/num_prefix_tokens"
            )
        g = vit_geometry(model)
        opts: VPTOptions = self.options
        p = opts.length
        prompts = VPTPrompts(p, g["width"], g["depth"], g["patch"], opts.deep, opts.dropout)
        prompts.to(next(model.parameters()).device)
        model.add_module("vpt", prompts)
        self._prompts = prompts
        prefix = g["prefix"]
        blocks = list(model.blocks)

        def insert(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            tokens = prompts.dropout(prompts.shallow.expand(x.shape[0], -1, -1)).to(x.dtype)
            return (torch.cat([x[:, :prefix], tokens, x[:, prefix:]], dim=1), *args[1:])

        def make_replace(i: int):
            def replace(module: nn.Module, args: tuple) -> tuple:
                x = args[0]
                tokens = prompts.dropout(prompts.deep[i - 1].expand(x.shape[0], -1, -1)).to(x.dtype)
                return (torch.cat([x[:, :prefix], tokens, x[:, prefix + p:]], dim=1), *args[1:])

            return replace

        def strip(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            return torch.cat([out[:, :prefix], out[:, prefix + p:]], dim=1)

        self.add_hook(blocks[0].register_forward_pre_hook(insert))
        if prompts.deep is not None:
            for i in range(1, len(blocks)):
                self.add_hook(blocks[i].register_forward_pre_hook(make_replace(i)))
        self.add_hook(blocks[-1].register_forward_hook(strip))

    def modules(self) -> list[nn.Module]:
        return [self._prompts]

    def routing(self) -> Routing:
        """The prompts lengthen the sequence from the first block to the last one."""
        return Routing(tokens=self._prompts.length)
