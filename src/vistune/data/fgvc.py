"""``fgvc:DIR`` — the VPT FGVC layout (CUB, NABirds, Flowers, Dogs, Cars).

``DIR/{train,val,test}.json``, each one flat ``{relative_image_path:
class_id}`` map. As in VPT's ``JSONDataset``, labels are remapped to
contiguous ids with ``sorted(set(values))`` — here over *all three* splits, so
the mapping is the same for every split even if one lacks a class.

Image root: the first of ``DIR/images``, ``DIR/Images``, ``DIR`` under which
the listed paths exist (CUB/NABirds use ``images/``, Dogs ``Images/``, Flowers
and Cars ``DIR`` itself). It is decided from a sample of train paths so a
wrong ``DIR`` fails loudly instead of skipping every image.

Class names are the parent-folder names when every class's files share one
folder (e.g. ``001.Black_footed_Albatross``), else the original class ids.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from .errors import DataError
from .sources import FileImages, RawSplit, SourceData, as_label

_ROOT_PROBE = 20


def _read_json(path: Path) -> dict[str, int]:
    if not path.is_file():
        raise DataError(f"fgvc: split file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"fgvc: cannot parse {path}: {e}") from None
    if not isinstance(data, dict):
        raise DataError(f"fgvc: {path} must hold one JSON object {{relative_path: class_id}}, got {type(data).__name__}")
    if not data:
        raise DataError(f"fgvc: {path} lists no images")
    return {str(k): as_label(v, f"fgvc: {path}: entry {k!r}") for k, v in data.items()}


def _image_root(base: Path, sample: list[str]) -> Path:
    candidates = [base / "images", base / "Images", base]
    hits = [sum((c / p).is_file() for p in sample) for c in candidates]
    best = max(range(len(candidates)), key=lambda i: (hits[i], -i))
    if hits[best] == 0:
        raise DataError(
            f"fgvc: none of the first {len(sample)} train.json paths (e.g. {sample[0]!r}) exist under "
            + ", ".join(str(c) for c in candidates)
        )
    return candidates[best]


def read_fgvc(arg: str) -> SourceData:
    base = Path(arg).expanduser()
    if not base.is_dir():
        raise DataError(f"fgvc: {base} is not a directory")
    raw = {split: _read_json(base / f"{split}.json") for split in ("train", "val", "test")}
    originals = sorted({v for m in raw.values() for v in m.values()})
    remap = {orig: i for i, orig in enumerate(originals)}
    root = _image_root(base, sorted(raw["train"])[:_ROOT_PROBE])
    splits = {}
    for split, mapping in raw.items():
        ids = sorted(mapping)
        splits[split] = RawSplit(ids, [remap[mapping[i]] for i in ids])

    parents: dict[int, set[str]] = {}
    for mapping in raw.values():
        for rel, orig in mapping.items():
            parents.setdefault(orig, set()).add(PurePosixPath(rel).parent.name)
    names = [next(iter(parents[o])) if len(parents[o]) == 1 else "" for o in originals]
    if any(not n for n in names) or len(set(names)) != len(names):
        names = [str(o) for o in originals]
    notes = [f"image root {root}", f"{len(originals)} classes remapped from original ids {originals[0]}..{originals[-1]}"]
    return SourceData(
        "fgvc", str(root.resolve()), FileImages(root), splits, names, notes, fixed_splits=True,
        origins={split: str(base / f"{split}.json") for split in raw},
    )
