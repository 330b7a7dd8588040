"""``npz:PATH`` — MedMNIST-style arrays in one ``.npz``.

Keys ``{train,val,test}_images`` (uint8 ``(N,H,W)`` grey, ``(N,H,W,1)`` or
``(N,H,W,3)`` RGB) and ``{train,val,test}_labels`` (``(N,)`` or ``(N,1)``).
``train_*`` is required; a missing val/test pair is carved by the loader.
Ids are ``"<split>:<index>"`` into the file's own arrays, so a manifest
names exactly which rows were used. Class names are ``"0".."C-1"`` with
``C = max label + 1`` over all splits (npz files carry no names).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .errors import DataError
from .sources import ArrayImages, RawSplit, SourceData


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
        raise DataError(f"{where}: label {int(arr.min())} is negative")
    return arr.astype(np.int64)


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
        arrays: dict[str, np.ndarray] = {}
        splits: dict[str, RawSplit] = {}
        for split in ("train", "val", "test"):
            ik, lk = f"{split}_images", f"{split}_labels"
            if ik not in keys and lk not in keys:
                if split == "train":
                    raise DataError(f"npz: {path} has no train_images/train_labels (keys: {sorted(keys)})")
                continue
            if ik not in keys or lk not in keys:
                raise DataError(f"npz: {path} has only one of {ik}/{lk}")
            imgs = _images(archive[ik], f"{path}:{ik}")
            labs = _labels(archive[lk], f"{path}:{lk}")
            if len(imgs) != len(labs):
                raise DataError(f"npz: {path}: {len(imgs)} {ik} but {len(labs)} {lk}")
            arrays[split] = imgs
            splits[split] = RawSplit([f"{split}:{i}" for i in range(len(labs))], labs.tolist())
    if not splits["train"].ids:
        raise DataError(f"npz: {path}: train split is empty")
    num_classes = 1 + max(max(s.labels, default=0) for s in splits.values())
    return SourceData(
        "npz", str(path.resolve()), ArrayImages(arrays, path.name), splits, [str(i) for i in range(num_classes)],
        [f"npz arrays present: {', '.join(splits)}"],
    )
