"""CIFAR ResNets (He et al. 2016, section 4.2) as first-class timm models.

timm ships no CIFAR-style ResNet, yet the small real CIFAR-10 checkpoints available offline
(``resnet20-12fca82f.th``, ``resnet56-4bfd9763.th`` from ``pytorch_resnet_cifar10``) use exactly
that architecture: a 3x3 stem with 16 channels, three stages of ``n`` basic blocks with 16/32/64
channels (``n = 3`` for ResNet-20, ``n = 9`` for ResNet-56), option-A shortcuts (strided identity
with zero-padded channels, so the shortcut has no parameters), global average pooling and a
linear head.

The model is registered with timm (``resnet20_cifar``, ``resnet56_cifar``, plus 32/44/110 for
completeness) through ``register_model`` + ``build_model_with_cfg``, so that everything else in
vistune treats it like any other timm backbone::

    timm.create_model('resnet20_cifar', pretrained=True,
                      pretrained_cfg_overlay=dict(file=path), num_classes=100)

loads the file, and timm itself drops the 10-class head when ``num_classes`` differs. Module
names follow the checkpoints (``conv1``, ``bn1``, ``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}``,
``linear``) so the state dicts load strictly once their ``module.`` prefix is stripped; the head
keeps the name ``linear`` and the pretrained cfg says so (``classifier='linear'``), which is how
timm finds the head to drop or adapt.

Importing this module is what registers the models (timm's registry is keyed by the decorated
functions' names); ``vistune.weights`` imports it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from torch import nn

__all__ = ["CifarResNet", "BasicBlock", "ZeroPadShortcut", "CIFAR10_MEAN", "CIFAR10_STD"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_STAGE_CHANNELS = (16, 32, 64)


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially by ``stride`` and zero-pad the new channels.

    Parameter-free by design (that is what distinguishes option A from the projection shortcut
    of ImageNet ResNets); the extra channels are split evenly before and after the input's, as in
    the original CIFAR experiments, so pretrained blocks see the identity where they expect it.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        extra = out_chs - in_chs
        if extra < 0:
            raise ValueError(f"option-A shortcut cannot reduce channels ({in_chs} -> {out_chs})")
        self.stride = stride
        self.pad_before = extra // 2
        self.pad_after = extra - extra // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad_before or self.pad_after:
            x = F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))
        return x


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (ReLU after the sum)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        if stride != 1 or in_chs != out_chs:
            self.shortcut: nn.Module = ZeroPadShortcut(in_chs, out_chs, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2) implementing timm's model interface.

    ``forward_features`` returns the last stage's NCHW map (64 x H/4 x W/4), ``forward_head``
    pools and classifies, ``feature_info`` has one entry per stage so ``features_only=True`` and
    ``forward_intermediates`` work as for timm's own CNNs.
    """

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.conv1 = nn.Conv2d(in_chans, _STAGE_CHANNELS[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STAGE_CHANNELS[0])
        # A module (not F.relu) so timm's FeatureListNet, which runs the top-level children in
        # order for features_only=True, applies it.
        self.act1 = nn.ReLU(inplace=True)

        in_chs = _STAGE_CHANNELS[0]
        self.feature_info: list[dict[str, Any]] = []
        reduction = 1
        for stage_idx, out_chs in enumerate(_STAGE_CHANNELS):
            stride = 1 if stage_idx == 0 else 2
            reduction *= stride
            blocks = []
            for block_idx in range(blocks_per_stage):
                blocks.append(BasicBlock(in_chs, out_chs, stride if block_idx == 0 else 1))
                in_chs = out_chs
            name = f"layer{stage_idx + 1}"
            self.add_module(name, nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=name))

        self.num_features = self.head_hidden_size = in_chs
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.linear = self._make_classifier(num_classes)
        self._init_weights()

    # --- construction helpers -------------------------------------------------------------
    def _make_classifier(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        return nn.Linear(self.num_features * self.global_pool.feat_mult(), num_classes)

    def _init_weights(self) -> None:
        # Kaiming init as in the original CIFAR training code; only matters without weights.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def stages(self) -> list[nn.Sequential]:
        """The three residual stages, in order."""
        return [self.layer1, self.layer2, self.layer3]

    # --- timm model interface -------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise LR decay, in timm's format."""
        return dict(
            stem=r"^conv1|^bn1",
            blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)",
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.linear

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head (``num_classes=0`` makes ``forward`` return pooled features)."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.linear = self._make_classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        for stage in self.stages:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs as timm's ``forward_intermediates`` returns them.

        ``indices``: ``None`` = all stages, an int ``n`` = the last ``n``, a sequence = those
        stage indices (negative counts from the end). ``norm`` is accepted for interface
        compatibility; the model has no final norm.
        """
        if output_fmt != "NCHW":
            raise ValueError("CifarResNet only produces NCHW intermediates")
        take = _take_indices(len(self.feature_info), indices)
        last = max(take) if stop_early else len(self.feature_info) - 1
        intermediates = []
        x = self.act1(self.bn1(self.conv1(x)))
        for i, stage in enumerate(self.stages[: last + 1]):
            x = stage(x)
            if i in take:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] | tuple[int, ...] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop stages after the last requested one (and the head), as timm models do."""
        take = _take_indices(len(self.feature_info), indices)
        for i in range(max(take) + 1, len(self.feature_info)):
            setattr(self, f"layer{i + 1}", nn.Sequential())
        if prune_head:
            self.reset_classifier(0, "")
        return take


def _take_indices(num: int, indices: int | list[int] | tuple[int, ...] | None) -> list[int]:
    if indices is None:
        return list(range(num))
    if isinstance(indices, int):
        if not 0 < indices <= num:
            raise ValueError(f"last-n ({indices}) is out of range (1 to {num})")
        return list(range(num - indices, num))
    out = []
    for i in indices:
        idx = num + i if i < 0 else i
        if not 0 <= idx < num:
            raise ValueError(f"feature index {i} is out of range (0 to {num - 1})")
        out.append(idx)
    return out


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return dict(
        url="",
        num_classes=10,
        input_size=(3, 32, 32),
        pool_size=(8, 8),
        crop_pct=1.0,
        interpolation="bilinear",
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        first_conv="conv1",
        classifier="linear",
        license="bsd-2-clause",
        **kwargs,
    )


# Weights come from a local file (pretrained_cfg_overlay=dict(file=...)); the CIFAR-10 tag
# records what those files were trained on.
default_cfgs = generate_default_cfgs(
    {
        "resnet20_cifar.cifar10": _cfg(),
        "resnet32_cifar.cifar10": _cfg(),
        "resnet44_cifar.cifar10": _cfg(),
        "resnet56_cifar.cifar10": _cfg(),
        "resnet110_cifar.cifar10": _cfg(),
    }
)


def _create(variant: str, depth: int, pretrained: bool, **kwargs: Any) -> CifarResNet:
    return build_model_with_cfg(
        CifarResNet,
        variant,
        pretrained,
        depth=depth,
        # timm's default out_indices assume five feature levels; this model has three stages.
        feature_cfg=dict(out_indices=(0, 1, 2)),
        **kwargs,
    )


@register_model
def resnet20_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-20 (0.27 M params)."""
    return _create("resnet20_cifar", 20, pretrained, **kwargs)


@register_model
def resnet32_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-32 (0.46 M params)."""
    return _create("resnet32_cifar", 32, pretrained, **kwargs)


@register_model
def resnet44_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-44 (0.66 M params)."""
    return _create("resnet44_cifar", 44, pretrained, **kwargs)


@register_model
def resnet56_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-56 (0.85 M params)."""
    return _create("resnet56_cifar", 56, pretrained, **kwargs)


@register_model
def resnet110_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-110 (1.7 M params)."""
    return _create("resnet110_cifar", 110, pretrained, **kwargs)
