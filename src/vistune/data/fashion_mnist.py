"""``fashion-mnist[:DIR]`` — Fashion-MNIST from its gzipped IDX files.

The files come from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``). torchvision's reader expects its own
download layout and un-gzipped files, so the IDX format is parsed here with
numpy (it is a 4-byte magic, big-endian dimension sizes, raw bytes).

Directory: ``DIR`` from the spec, else ``$VISTUNE_FASHION_MNIST_DIR``, else
the Debian path. Official 60k train / 10k test; the loader carves a seeded
stratified 10% validation split from train (ids ``"train:<row>"``), so model
selection never uses the official test rows.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from .errors import DataError
from .sources import ArrayImages, RawSplit, SourceData

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "VISTUNE_FASHION_MNIST_DIR"
INSTALL_HINT = "apt-get install dataset-fashion-mnist"
CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def resolve_dir(arg: str | None) -> Path:
    return Path(arg or os.environ.get(ENV_VAR) or DEFAULT_DIR).expanduser()


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse one IDX file (gzipped or not) holding unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"fashion-mnist: cannot read {path}: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"fashion-mnist: {path} is not an IDX file (bad magic)")
    if data[2] != 0x08 or data[3] != ndim:
        raise DataError(
            f"fashion-mnist: {path}: expected unsigned-byte IDX with {ndim} dims, "
            f"got type 0x{data[2]:02x} with {data[3]} dims"
        )
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + int(np.prod(shape)):
        raise DataError(f"fashion-mnist: {path}: size {len(data)} does not match header shape {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_fashion_mnist(arg: str | None) -> SourceData:
    directory = resolve_dir(arg)
    found = {stem: _find(directory, stem) for pair in FILES.values() for stem in pair}
    missing = [stem + ".gz" for stem, p in found.items() if p is None]
    if missing:
        raise DataError(
            f"fashion-mnist: files not found in {directory}: {', '.join(missing)}. "
            f"Install them with `{INSTALL_HINT}` (Debian/Ubuntu, as root), "
            f"or point ${ENV_VAR} (or the spec fashion-mnist:DIR) at a folder holding them."
        )
    arrays: dict[str, np.ndarray] = {}
    splits: dict[str, RawSplit] = {}
    for split, (img_stem, lab_stem) in FILES.items():
        imgs = read_idx(found[img_stem], 3)
        labs = read_idx(found[lab_stem], 1)
        if len(imgs) != len(labs):
            raise DataError(f"fashion-mnist: {len(imgs)} images but {len(labs)} labels in {directory} ({split})")
        if labs.size and labs.max() >= len(CLASS_NAMES):
            raise DataError(f"fashion-mnist: {found[lab_stem]}: label {int(labs.max())} out of range 0..9")
        arrays[split] = imgs
        splits[split] = RawSplit([f"{split}:{i}" for i in range(len(labs))], labs.astype(np.int64).tolist())
    return SourceData(
        "fashion-mnist", str(directory.resolve()), ArrayImages(arrays, "fashion-mnist"), splits, list(CLASS_NAMES),
        ["official train/test files; val carved from train"],
        origins={split: str(found[lab]) for split, (_, lab) in FILES.items()},
    )
