"""``folder:DIR`` — an image-classification folder tree.

Two layouts are recognised:

* split mode, when ``DIR/train/`` exists: ``DIR/{train,val,test}/<class>/…``
  (``valid``/``validation`` are accepted for ``val``). Splits that are present
  are used as given; missing ones are carved by the loader (see
  :func:`vistune.data.loader.complete_splits`).
* flat mode otherwise: ``DIR/<class>/…`` is one pool that the loader carves
  into train/val/test.

Class names are the sorted union of class-folder names over all splits, so
labels are contiguous and identical across splits. Files are listed sorted by
their relative path (recursively, like torchvision's ImageFolder), which is
what makes seeded selections independent of file-system order. Hidden files
(``.DS_Store`` …) and non-image files are ignored; a class folder with no
image file at all is an error, because it almost always means a broken copy.
"""

from __future__ import annotations

from pathlib import Path

from .errors import DataError
from .sources import FileImages, RawSplit, SourceData

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
SPLIT_DIR_NAMES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _class_dirs(split_dir: Path) -> list[Path]:
    dirs = sorted((p for p in split_dir.iterdir() if p.is_dir() and _visible(p)), key=lambda p: p.name)
    if not dirs:
        raise DataError(f"folder: no class sub-folders in {split_dir} (expected {split_dir}/<class>/*.jpg)")
    return dirs


def _image_files(class_dir: Path, root: Path) -> list[str]:
    files = []
    for p in class_dir.rglob("*"):
        rel = p.relative_to(root)
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and all(not s.startswith(".") for s in rel.parts):
            files.append(rel.as_posix())
    if not files:
        raise DataError(
            f"folder: class folder {class_dir} contains no image files "
            f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return sorted(files)


def read_folder(arg: str) -> SourceData:
    """List the tree under ``arg`` (see module docstring)."""
    root = Path(arg).expanduser()
    if not root.is_dir():
        raise DataError(f"folder: {root} is not a directory")
    split_dirs: dict[str, Path] = {}
    if (root / "train").is_dir():
        for split, names in SPLIT_DIR_NAMES.items():
            for name in names:
                if (root / name).is_dir():
                    split_dirs[split] = root / name
                    break
        mode_note = "split sub-folders found: " + ", ".join(
            f"{s}={d.name}/" for s, d in split_dirs.items()
        )
    else:
        split_dirs["train"] = root
        mode_note = "no split sub-folders: the whole folder is one pool"

    listing: dict[str, dict[str, list[str]]] = {}
    for split, d in split_dirs.items():
        listing[split] = {c.name: _image_files(c, root) for c in _class_dirs(d)}
    class_names = sorted({c for per_class in listing.values() for c in per_class})
    index = {c: i for i, c in enumerate(class_names)}
    splits = {}
    for split, per_class in listing.items():
        ids: list[str] = []
        labels: list[int] = []
        for cname, files in per_class.items():
            ids.extend(files)
            labels.extend([index[cname]] * len(files))
        order = sorted(range(len(ids)), key=ids.__getitem__)
        splits[split] = RawSplit([ids[i] for i in order], [labels[i] for i in order])
    notes = [mode_note]
    missing_in_train = sorted(set(class_names) - set(listing["train"]))
    if missing_in_train:
        notes.append(f"classes with no training folder: {missing_in_train}")
    return SourceData("folder", str(root.resolve()), FileImages(root), splits, class_names, notes)
