"""Linear probing: only the head trains; the backbone is a fixed feature extractor.

Because the backbone never changes, the engine may cache its features once (see engine)."""

from __future__ import annotations

import torch
from torch import nn

from vistune.methods.base import VPT_SGD_SEARCH, Method, NothingToMerge


class Linear(NothingToMerge, Method):
    name = "linear"
    formats = ("timm", "onnx")
    search_space = VPT_SGD_SEARCH
    pretrainable = False  # no modules: nothing to transfer
    tokenwise_hooks = True  # see Routing.tokenwise

    def attach(self, model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> None:
        """Nothing to insert: the tuning contract always trains the head."""

