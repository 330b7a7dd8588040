"""``tv:NAME`` — a classification data set of ``torchvision.datasets``.

``NAME`` is the class name, case-insensitive (``tv:CIFAR100``,
``tv:Flowers102``, ``tv:OxfordIIITPet``, ``tv:DTD`` ...; :data:`SPLITS` lists
them). Files live where torchvision puts them under the data root:
``data_root`` (``--data-root``), else ``$VISTUNE_DATA_ROOT``, else
``~/.cache/vistune/data``. A root you already use with torchvision works as
is, since it is handed to torchvision unchanged.

When the files are absent the data set is downloaded (``download=True``),
once; without network that fails with one line naming the folder to fill.
``VISTUNE_OFFLINE=1`` forbids downloading (the line then says so), for
machines where a silent multi-GB download would be a surprise.

Splits: the data set's own ones as torchvision names them (:data:`SPLITS`:
e.g. Flowers102 train/val/test, OxfordIIITPet trainval -> train, CIFAR
train/test), missing ones carved by the loader; data sets without splits
(EuroSAT, SUN397, Caltech) are one pool carved 70/10/20.

Pixels: array-backed sets (CIFAR, MNIST family, SVHN, STL10) are read from
torchvision's in-memory arrays with the vectorised resize; file-backed sets
(Flowers102, Pets, DTD, ...) are decoded from their files like ``folder:``,
ids being paths relative to the data root; anything else goes through the
data set's own ``__getitem__``.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError
from .sources import (
    ArrayImages,
    FileImages,
    ImageSource,
    RawSplit,
    SourceData,
    as_label,
    classes_from_train,
    png_bytes,
)
from .transforms import pil_to_chw

ENV_VAR = "VISTUNE_DATA_ROOT"
OFFLINE_ENV_VAR = "VISTUNE_OFFLINE"
DEFAULT_ROOT = "~/.cache/vistune/data"

#: torchvision data sets known to be single-label image classification, with
#: how to ask each for its splits: ``"train-flag"`` (``train=True/False``:
#: train/test), ``{our split: their split}``, or ``None`` (one pool).
SPLITS: dict[str, str | dict[str, str] | None] = {
    "CIFAR10": "train-flag", "CIFAR100": "train-flag", "MNIST": "train-flag", "FashionMNIST": "train-flag",
    "KMNIST": "train-flag", "USPS": "train-flag",
    "SVHN": {"train": "train", "test": "test"},
    "STL10": {"train": "train", "test": "test"},
    "Flowers102": {"train": "train", "val": "val", "test": "test"},
    "OxfordIIITPet": {"train": "trainval", "test": "test"},
    "DTD": {"train": "train", "val": "val", "test": "test"},
    "FGVCAircraft": {"train": "train", "val": "val", "test": "test"},
    "StanfordCars": {"train": "train", "test": "test"},
    "Food101": {"train": "train", "test": "test"},
    "GTSRB": {"train": "train", "test": "test"},
    "Country211": {"train": "train", "val": "valid", "test": "test"},
    "RenderedSST2": {"train": "train", "val": "val", "test": "test"},
    "Imagenette": {"train": "train", "val": "val"},
    "ImageNet": {"train": "train", "val": "val"},
    "EuroSAT": None, "SUN397": None, "Caltech101": None, "Caltech256": None, "SEMEION": None,
}  # fmt: skip


def resolve_root(data_root: str | os.PathLike[str] | None) -> Path:
    return Path(data_root or os.environ.get(ENV_VAR) or DEFAULT_ROOT).expanduser()


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV_VAR, "").strip().lower() not in ("", "0", "false", "no")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"


def _dataset_class(name: str) -> tuple[str, type]:
    import torchvision.datasets as tvd

    by_lower = {n.lower(): n for n in SPLITS}
    canonical = by_lower.get(name.strip().lower())
    if canonical is None or not hasattr(tvd, canonical):
        known = ", ".join(n for n in SPLITS if hasattr(tvd, n))
        raise DataError(f"tv: {name!r} is not a torchvision classification data set vistune knows; known: {known}")
    return canonical, getattr(tvd, canonical)


def _construct(cls: type, root: Path, kwargs: dict[str, Any], download: bool) -> Any:
    params = inspect.signature(cls.__init__).parameters
    if "download" in params:
        kwargs = {**kwargs, "download": download}
    return cls(root=str(root), **kwargs)


def _open(name: str, cls: type, root: Path, kwargs: dict[str, Any]) -> Any:
    """Construct one split from disk, downloading when absent (see module docstring)."""
    try:
        return _construct(cls, root, kwargs, download=False)
    except Exception as first:  # torchvision raises RuntimeError / FileNotFoundError / ... when files are absent
        missing = _one_line(first)
    if "download" not in inspect.signature(cls.__init__).parameters:
        raise DataError(
            f"tv: {name} is not in {root} ({missing}) and torchvision cannot download it; "
            f"put its files there as torchvision expects them (or choose the folder with --data-root / ${ENV_VAR})"
        )
    if _offline():
        raise DataError(
            f"tv: {name} is not in {root} and ${OFFLINE_ENV_VAR} forbids downloading it; "
            f"unset it to download, or put torchvision's {name} files there "
            f"(--data-root / ${ENV_VAR} choose the folder)"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        return _construct(cls, root, kwargs, download=True)
    except Exception as e:  # URLError, HTTP errors, checksum mismatches, a full disk ...
        if _one_line(e) == missing:  # the files are there (nothing to download) but do not read
            raise DataError(
                f"tv: {name}: cannot read its files in {root} ({missing}); delete them to download again, "
                f"or fix them (--data-root / ${ENV_VAR} choose the folder)"
            ) from None
        raise DataError(
            f"tv: {name} is not in {root} and downloading it failed ({_one_line(e)}); connect to the network and "
            f"retry, or put torchvision's {name} files into {root} (--data-root / ${ENV_VAR} choose the folder)"
        ) from None


def _labels(ds: Any) -> list[int] | None:
    for attr in ("targets", "labels", "_labels", "y"):
        value = getattr(ds, attr, None)
        if value is not None and not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):
            arr = np.asarray(value.numpy() if hasattr(value, "numpy") else value)
            if arr.ndim == 1 and len(arr) == len(ds):
                return arr.tolist()
    for attr in ("_samples", "samples", "imgs"):
        value = getattr(ds, attr, None)
        if isinstance(value, Sequence) and len(value) == len(ds) and all(len(s) == 2 for s in value[:1]):
            return [s[1] for s in value]
    return None


def _files(ds: Any) -> list[Path] | None:
    for attr in ("_image_files", "_images"):
        value = getattr(ds, attr, None)
        if isinstance(value, Sequence) and len(value) == len(ds):
            return [Path(p) for p in value]
    for attr in ("_samples", "samples", "imgs"):
        value = getattr(ds, attr, None)
        if isinstance(value, Sequence) and len(value) == len(ds) and all(len(s) == 2 for s in value[:1]):
            return [Path(s[0]) for s in value]
    return None


def _array(ds: Any) -> np.ndarray | None:
    """The data set's uint8 pixels as ``(N,H,W)`` or ``(N,H,W,3)``, if it holds them."""
    data = getattr(ds, "data", None)
    if data is None or not hasattr(data, "shape") or len(data) != len(ds):
        return None
    arr = data.numpy() if hasattr(data, "numpy") else np.asarray(data)
    if arr.dtype != np.uint8:
        return None
    if arr.ndim == 4 and arr.shape[1] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(0, 2, 3, 1)  # SVHN, STL10 keep (N, C, H, W)
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 or (arr.ndim == 4 and arr.shape[-1] == 3):
        return arr
    return None


def _class_names(ds: Any) -> list[str] | None:
    names = getattr(ds, "classes", None) or getattr(ds, "categories", None)
    if not names or not isinstance(names, Sequence):
        return None
    out = [str(n[0]) if isinstance(n, (tuple, list)) else str(n) for n in names]  # ImageNet: (name, synonyms...)
    return out if len(set(out)) == len(out) else [str(n) for n in names]


class TorchvisionItems(ImageSource):
    """Fallback: pixels from the data set's own ``__getitem__`` (a PIL image)."""

    def __init__(self, datasets: dict[str, Any], origin: str) -> None:
        self.datasets = datasets
        self.origin = origin

    def load(self, sample_id: str, size: int) -> np.ndarray:
        split, _, row = sample_id.rpartition(":")
        image = self.datasets[split][int(row)][0]
        return pil_to_chw(image, size)

    def encoded(self, sample_id: str) -> tuple[bytes, str]:
        split, _, row = sample_id.rpartition(":")
        return png_bytes(self.datasets[split][int(row)][0]), "png"

    def describe(self, sample_id: str) -> str:
        return f"{self.origin}[{sample_id}]"


def read_tv(arg: str, *, data_root: str | os.PathLike[str] | None = None) -> SourceData:
    """Read a ``tv:`` spec argument (see module docstring)."""
    if not arg:
        raise DataError(f"tv: the spec needs a data set name, e.g. tv:CIFAR100 (known: {', '.join(SPLITS)})")
    name, cls = _dataset_class(arg)
    root = resolve_root(data_root)
    how = SPLITS[name]
    if how == "train-flag":
        requests: dict[str, dict[str, Any]] = {"train": {"train": True}, "test": {"train": False}}
    elif how is None:
        requests = {"train": {}}
    else:
        assert isinstance(how, dict)
        requests = {ours: {"split": theirs} for ours, theirs in how.items()}
    opened = {ours: _open(name, cls, root, kwargs) for ours, kwargs in requests.items()}

    origins: dict[str, str] = {}
    splits: dict[str, RawSplit] = {}
    labels_of: dict[str, list[int]] = {}
    class_names = _class_names(opened["train"])
    for ours, ds in opened.items():
        args = ", ".join(f"{k}={v!r}" for k, v in requests[ours].items())
        origins[ours] = f"torchvision {name}({args}) in {root}"
        labels = _labels(ds)
        if labels is None:  # no label list: ask the data set item by item (decodes each image once)
            labels = [ds[i][1] for i in range(len(ds))]
        labels_of[ours] = [as_label(v, f"tv: {origins[ours]} (row {row})") for row, v in enumerate(labels)]
        own = _class_names(ds)
        if ours != "train" and class_names is not None and own is not None and own != class_names:
            # Some sets (DTD) index classes per split; a split missing a class
            # would shift every later label. Map by name onto train's indices.
            index = {c: i for i, c in enumerate(class_names)}
            unknown = sorted(set(own) - set(index))
            if unknown:
                raise DataError(f"tv: {origins[ours]}: classes {unknown[:5]} do not occur in the train split")
            labels_of[ours] = [index[own[lab]] if lab < len(own) else lab for lab in labels_of[ours]]

    arrays = {ours: _array(ds) for ours, ds in opened.items()}
    files = {ours: _files(ds) for ours, ds in opened.items()}
    source: ImageSource
    if all(a is not None for a in arrays.values()):
        source = ArrayImages({k: v for k, v in arrays.items() if v is not None}, f"torchvision {name}")
        ids = {ours: [f"{ours}:{i}" for i in range(len(ds))] for ours, ds in opened.items()}
        pixel_note = "pixels from torchvision's in-memory arrays"
    elif all(f is not None for f in files.values()):
        source = FileImages(root)
        ids = {}
        for ours, paths in files.items():
            assert paths is not None
            ids[ours] = [_relative(p, root) for p in paths]
        pixel_note = "pixels decoded from the data set's image files"
    else:
        source = TorchvisionItems(opened, f"torchvision {name}")
        ids = {ours: [f"{ours}:{i}" for i in range(len(ds))] for ours, ds in opened.items()}
        pixel_note = "pixels from the data set's __getitem__"
    for ours in opened:
        splits[ours] = RawSplit(ids[ours], labels_of[ours])

    asked = ", ".join(
        f"{ours}=({', '.join(f'{k}={v!r}' for k, v in kw.items()) or 'all'})" for ours, kw in requests.items()
    )
    notes = [f"torchvision.datasets.{name} under {root}: {asked}", pixel_note]
    if class_names is None:
        class_names = classes_from_train("tv", splits, origins)
        notes.append(f"no class names in the data set: {len(class_names)} classes from the training labels")
    return SourceData("tv", str(root.resolve()), source, splits, class_names, notes, origins=origins)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())
