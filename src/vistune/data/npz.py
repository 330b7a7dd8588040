"""``npz:PATH`` — image arrays or encoded JPEG bytes in one ``.npz``.

Two layouts, told apart by the ``train_*`` keys:

* **arrays** (MedMNIST): ``{split}_images`` (uint8 ``(N,H,W)`` grey,
  ``(N,H,W,1)`` or ``(N,H,W,3)`` RGB) and ``{split}_labels`` (``(N,)`` or
  ``(N,1)``).
* **JPEG bytes with offsets** (``../shared/data/cifar10``, ``tinyimagenet``):
  ``{split}_jpeg`` (uint8, all encoded files concatenated),
  ``{split}_offsets`` (int, N+1; image i is ``jpeg[o[i]:o[i+1]]``),
  ``{split}_labels`` (N,) and optionally ``{split}_names`` (the original file
  names, used in warnings). Images are decoded only when the loader selects
  them, so ``--shots``/``--max-per-split`` never decode unused rows, and the
  bytes stay compressed in memory (57 MB for all of CIFAR-10, against 184 MB
  of raw pixels).

``train_*`` is required; a missing val/test split is carved by the loader.
Ids are ``"<split>:<row>"`` into the file's own arrays, so a manifest names
exactly which rows were used.

Classes: a ``class_names`` or ``classes`` key (1-D strings, label = index;
``class_names`` is preferred when both exist and its entries are distinct,
since Tiny-ImageNet's ``classes`` are WordNet ids) declares them, and every
label must then be inside it. Without one, the classes are ``"0".."C-1"``
with ``C`` taken from the training labels (see
:func:`~vistune.data.sources.classes_from_train`).
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError
from .sources import ArrayImages, ImageSource, RawSplit, SourceData, as_stored, classes_from_train
from .transforms import load_image_bytes, verify_image

SPLIT_NAMES = ("train", "val", "test")
CLASS_KEYS = ("class_names", "classes")


def _images(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 3 or (arr.ndim == 4 and arr.shape[-1] == 3)):
        raise DataError(f"{where}: expected images of shape (N,H,W) or (N,H,W,3), got {arr.shape}")
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.integer) and arr.size and arr.min() >= 0 and arr.max() <= 255:
            arr = arr.astype(np.uint8)
        else:
            raise DataError(f"{where}: expected uint8 pixels (0..255), got dtype {arr.dtype}")
    return np.ascontiguousarray(arr)


def _labels(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise DataError(f"{where}: expected labels of shape (N,) or (N,1) (single-label), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.mod(arr, 1) == 0):
            arr = arr.astype(np.int64)
        else:
            raise DataError(f"{where}: labels must be integers, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise DataError(f"{where}: label {int(arr.min())} is negative (row {int(np.argmin(arr))})")
    return arr.astype(np.int64)


def _strings(arr: np.ndarray, where: str) -> list[str]:
    if arr.ndim != 1 or arr.dtype.kind not in "US":
        raise DataError(f"{where}: expected a 1-D array of strings, got dtype {arr.dtype} shape {arr.shape}")
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in arr.tolist()]


def _class_names(archive: Any, keys: set[str], path: Path) -> tuple[list[str] | None, str | None]:
    """The declared class list and the key it came from, or (None, None)."""
    found = {k: _strings(archive[k], f"npz: {path}:{k}") for k in CLASS_KEYS if k in keys}
    for key in CLASS_KEYS:
        names = found.get(key)
        if names is None:
            continue
        other = [v for k, v in found.items() if k != key]
        if other and len(other[0]) != len(names):
            raise DataError(
                f"npz: {path}: {key} has {len(names)} entries but {CLASS_KEYS[1 - CLASS_KEYS.index(key)]} "
                f"{len(other[0])}"
            )
        if len(set(names)) == len(names):
            return names, key
    if found:  # duplicates in every list: the labels cannot be told apart by name
        key, names = next(iter(found.items()))
        dup = next(n for n in names if names.count(n) > 1)
        raise DataError(f"npz: {path}:{key}: class name {dup!r} appears more than once")
    return None, None


class JpegBytesImages(ImageSource):
    """Encoded images stored back to back in one uint8 array per split,
    addressed as ``"<split>:<row>"``.

    The arrays are dropped when pickled (DataLoader workers) and re-read from
    ``path`` on first use there, so workers do not each receive a copy.
    """

    def __init__(self, path: Path, arrays: dict[str, tuple[np.ndarray, np.ndarray]],
                 names: dict[str, np.ndarray]) -> None:  # fmt: skip
        self.path = path
        self.arrays: dict[str, tuple[np.ndarray, np.ndarray]] | None = arrays
        self.names = names
        self.splits = sorted(arrays)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["arrays"] = None
        return state

    def _bytes(self, sample_id: str) -> bytes:
        split, _, row = sample_id.rpartition(":")
        if self.arrays is None:
            with np.load(self.path, allow_pickle=False) as archive:
                self.arrays = {s: (archive[f"{s}_jpeg"], archive[f"{s}_offsets"]) for s in self.splits}
        jpeg, offsets = self.arrays[split]
        i = int(row)
        return jpeg[int(offsets[i]) : int(offsets[i + 1])].tobytes()

    def load(self, sample_id: str, size: int) -> np.ndarray:
        return load_image_bytes(self._bytes(sample_id), size)

    def verify(self, sample_id: str, size: int) -> None:
        verify_image(io.BytesIO(self._bytes(sample_id)))

    def encoded(self, sample_id: str) -> tuple[bytes, str]:
        return as_stored(self._bytes(sample_id))

    def describe(self, sample_id: str) -> str:
        split, _, row = sample_id.rpartition(":")
        names = self.names.get(split)
        extra = f" ({names[int(row)].decode('utf-8', 'replace')})" if names is not None else ""
        return f"{self.path}[{sample_id}]{extra}"


def _read_jpeg_split(archive: Any, keys: set[str], path: Path, split: str):
    jk, ok, lk = f"{split}_jpeg", f"{split}_offsets", f"{split}_labels"
    missing = [k for k in (jk, ok, lk) if k not in keys]
    if missing:
        raise DataError(f"npz: {path} has {split} JPEG data but no {', '.join(missing)}")
    jpeg, offsets = archive[jk], archive[ok]
    labs = _labels(archive[lk], f"npz: {path}:{lk}")
    if jpeg.ndim != 1 or jpeg.dtype != np.uint8:
        raise DataError(f"npz: {path}:{jk}: expected 1-D uint8 bytes, got dtype {jpeg.dtype} shape {jpeg.shape}")
    if offsets.ndim != 1 or not np.issubdtype(offsets.dtype, np.integer):
        raise DataError(f"npz: {path}:{ok}: expected 1-D integer offsets, got dtype {offsets.dtype}")
    if len(offsets) != len(labs) + 1:
        raise DataError(
            f"npz: {path}: {ok} has {len(offsets)} entries, expected N+1 = {len(labs) + 1} for {len(labs)} {lk}"
        )
    steps = np.diff(offsets)
    if len(offsets) and (offsets[0] < 0 or offsets[-1] > len(jpeg) or (steps <= 0).any()):
        bad = int(np.argmax(steps <= 0)) if (steps <= 0).any() else None
        raise DataError(
            f"npz: {path}:{ok}: offsets must increase strictly from >= 0 to <= {len(jpeg)} (the size of {jk})"
            + (f"; entry {bad} -> {bad + 1} does not" if bad is not None else f"; got {offsets[0]}..{offsets[-1]}")
        )
    names = archive[f"{split}_names"] if f"{split}_names" in keys else None
    if names is not None and (names.ndim != 1 or len(names) != len(labs) or names.dtype.kind != "S"):
        names = None  # informative only: never fail a load over it
    return jpeg, offsets.astype(np.int64), labs, names


def read_npz(arg: str) -> SourceData:
    path = Path(arg).expanduser()
    if not path.is_file():
        raise DataError(f"npz: file {path} does not exist")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"npz: cannot read {path}: {e}") from None
    with archive:
        keys = set(archive.files)
        jpeg_layout = "train_jpeg" in keys or "train_offsets" in keys
        if not jpeg_layout and "train_images" not in keys and "train_labels" not in keys:
            raise DataError(
                f"npz: {path} has neither train_images/train_labels nor train_jpeg/train_offsets/train_labels "
                f"(keys: {sorted(keys)})"
            )
        class_names, class_key = _class_names(archive, keys, path)
        splits: dict[str, RawSplit] = {}
        origins: dict[str, str] = {}
        arrays: dict[str, np.ndarray] = {}
        encoded: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        names: dict[str, np.ndarray] = {}
        for split in SPLIT_NAMES:
            lk = f"{split}_labels"
            if jpeg_layout:
                if f"{split}_jpeg" not in keys and f"{split}_offsets" not in keys:
                    if f"{split}_images" in keys:
                        raise DataError(f"npz: {path} mixes layouts: train is JPEG bytes but {split} is {split}_images")
                    continue
                jpeg, offsets, labs, split_names = _read_jpeg_split(archive, keys, path, split)
                encoded[split] = (jpeg, offsets)
                if split_names is not None:
                    names[split] = split_names
            else:
                ik = f"{split}_images"
                if ik not in keys and lk not in keys:
                    if f"{split}_jpeg" in keys:
                        raise DataError(f"npz: {path} mixes layouts: train is train_images but {split} is JPEG bytes")
                    continue
                if ik not in keys or lk not in keys:
                    raise DataError(f"npz: {path} has only one of {ik}/{lk}")
                imgs = _images(archive[ik], f"npz: {path}:{ik}")
                labs = _labels(archive[lk], f"npz: {path}:{lk}")
                if len(imgs) != len(labs):
                    raise DataError(f"npz: {path}: {len(imgs)} {ik} but {len(labs)} {lk}")
                arrays[split] = imgs
            splits[split] = RawSplit([f"{split}:{i}" for i in range(len(labs))], labs.tolist())
            origins[split] = f"{path}:{lk}"
    if not splits["train"].ids:
        raise DataError(f"npz: {path}: train split is empty")
    notes = [f"npz {'JPEG-bytes' if jpeg_layout else 'array'} layout, splits present: {', '.join(splits)}"]
    if class_names is None:
        class_names = classes_from_train("npz", splits, origins)
        notes.append(f"no class list in the file: {len(class_names)} classes from the training labels")
    else:
        notes.append(f"{len(class_names)} classes from the {class_key!r} key")
    source: ImageSource
    source = JpegBytesImages(path.resolve(), encoded, names) if jpeg_layout else ArrayImages(arrays, path.name)
    return SourceData("npz", str(path.resolve()), source, splits, class_names, notes, origins=origins)
