"""The dense layouts: ``camvid:DIR`` (segment), ``voc:DIR`` (detect), ``pennfudan:DIR`` (both).

Like every reader, these list what is on disk and decode no pixels: per split the image ids
(paths relative to the root) and, in :attr:`RawSplit.targets`, one :class:`RawItem` per id
(its mask file, or its boxes already parsed). Splitting, caps, ``trainval`` and the decode
threads are the shared loader's (:func:`vistune.data.loader.select_dense`); decoding masks and
letterboxing images, boxes and masks together is :mod:`vistune.dense.datasets`'s.

Coordinates are continuous (pixel ``i`` covers ``[i, i+1)``): VOC's 1-based inclusive
``xmin..xmax`` becomes ``(xmin-1, ..., xmax)``. Every annotation is parsed here, so a
malformed XML or a missing mask names its file before anything is decoded. Boxes of zero area
are dropped and counted (BCCD has two), not errors: they carry no extent to learn from and COCO
evaluation cannot score them.

All three layouts fix their own splits (``fixed_splits``): CamVid's folders and VOC's lists are
used as given (a missing ``val`` stays missing, a missing ``test`` is an error), and Penn-Fudan,
which has no official split, is cut by its documented seeded 60/20/20 rule below.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError
from .sources import SPLITS, FileImages, RawSplit, SourceData

CAMVID_CLASSES = (
    "sky", "building", "pole", "road", "pavement", "tree",
    "sign", "fence", "car", "pedestrian", "bicyclist",
)  # fmt: skip
#: Penn-Fudan carving (train/val/test fractions of the sorted, seeded image list).
PENNFUDAN_FRACTIONS = (0.6, 0.2, 0.2)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")


@dataclass
class RawItem:
    """One annotated image as found on disk, before decoding."""

    id: str  # path relative to the data root
    image: Path
    mask: Path | None = None  # index-PNG (semantic) or instance PNG (Penn-Fudan)
    boxes: np.ndarray | None = None  # (N, 4) xyxy, original pixels, continuous coordinates
    labels: np.ndarray | None = None  # (N,)
    difficult: np.ndarray | None = None  # (N,) bool


def _root(kind: str, arg: str) -> Path:
    root = Path(arg).expanduser()
    if not root.is_dir():
        raise DataError(f"{kind}: data folder {root} does not exist")
    return root


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def _source(kind: str, root: Path, class_names: list[str], items: dict[str, list[RawItem]],
            notes: list[str], **target_info: object) -> SourceData:
    splits = {name: RawSplit([it.id for it in split], [0] * len(split), list(split)) for name, split in items.items()}
    return SourceData(kind, str(root), FileImages(root), splits, class_names, notes, fixed_splits=True,
                      target_info=target_info)


def read_camvid(arg: str) -> SourceData:
    """``{train,val,test}/<name>.jpg`` + ``{split}annot/<name>.png`` (mode-L class indices).

    A ``classes.txt`` (one name per line) in the root makes this any index-PNG data set; without
    it the 11 CamVid classes apply. The value ``len(classes)`` (CamVid's void, 11) and 255 are
    ignored; any other value outside the class range is an error naming the file (at decode).
    """
    root = _root("camvid", arg)
    names_file = root / "classes.txt"
    if names_file.is_file():
        names = [ln.strip() for ln in names_file.read_text().splitlines() if ln.strip()]
        if not names:
            raise DataError(f"camvid: {names_file} lists no class names")
    else:
        names = list(CAMVID_CLASSES)
    splits: dict[str, list[RawItem]] = {}
    for split in SPLITS:
        img_dir, ann_dir = root / split, root / f"{split}annot"
        if not img_dir.is_dir():
            if split == "val":
                continue
            raise DataError(f"camvid: {img_dir} is missing (expected {{train,val,test}}/ and {{split}}annot/)")
        if not ann_dir.is_dir():
            raise DataError(f"camvid: annotation folder {ann_dir} is missing for {img_dir}")
        items = []
        for img in _images_in(img_dir):
            mask = ann_dir / (img.stem + ".png")
            if not mask.is_file():
                raise DataError(f"camvid: no mask {mask} for image {img}")
            items.append(RawItem(id=f"{split}/{img.name}", image=img, mask=mask))
        if not items:
            raise DataError(f"camvid: {img_dir} holds no images")
        splits[split] = items
    return _source("camvid", root, names, splits, [], mask_kind="index", void_value=len(names), dropped_boxes=0)


def _voc_float(obj: ET.Element, key: str, path: Path) -> float:
    node = obj.find(f"bndbox/{key}")
    if node is None or node.text is None:
        raise DataError(f"voc: {path}: an <object> has no bndbox/{key}")
    try:
        return float(node.text)
    except ValueError:
        raise DataError(f"voc: {path}: bndbox/{key} = {node.text!r} is not a number") from None


def parse_voc_xml(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, int, tuple[int, int] | None]:
    """Names, boxes (continuous coordinates), difficult flags, zero-area count, (W, H) if given."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as err:
        raise DataError(f"voc: annotation {path} is not readable XML ({err})") from None
    size = None
    w, h = root.find("size/width"), root.find("size/height")
    if w is not None and h is not None and w.text and h.text:
        try:
            size = (int(float(w.text)), int(float(h.text)))
        except ValueError:
            raise DataError(f"voc: {path}: size {w.text!r}x{h.text!r} is not numeric") from None
    names, boxes, difficult, dropped = [], [], [], 0
    for obj in root.iter("object"):
        name_node = obj.find("name")
        if name_node is None or not (name_node.text or "").strip():
            raise DataError(f"voc: {path}: an <object> has no <name>")
        x1, y1, x2, y2 = (_voc_float(obj, k, path) for k in ("xmin", "ymin", "xmax", "ymax"))
        if x2 <= x1 or y2 <= y1:
            dropped += 1  # zero (or negative) extent in the file's own coordinates
            continue
        diff = obj.find("difficult")
        names.append(name_node.text.strip())
        boxes.append((x1 - 1.0, y1 - 1.0, x2, y2))  # 1-based inclusive -> continuous
        difficult.append(diff is not None and (diff.text or "0").strip() == "1")
    arr = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return names, arr, np.asarray(difficult, dtype=bool), dropped, size


def read_voc(arg: str) -> SourceData:
    """PASCAL VOC: ``JPEGImages/``, ``Annotations/*.xml``, ``ImageSets/Main/{train,val,test}.txt``.

    Class names are the sorted set of object names over every listed annotation (so every split
    and every capped run agrees on the label numbering). Ids keep each list's order.
    """
    root = _root("voc", arg)
    sets = root / "ImageSets" / "Main"
    if not (root / "Annotations").is_dir() or not (root / "JPEGImages").is_dir():
        raise DataError(f"voc: {root} needs JPEGImages/ and Annotations/ folders")
    parsed: dict[str, list[tuple[str, Path, list[str], np.ndarray, np.ndarray]]] = {}
    dropped = 0
    for split in SPLITS:
        listing = sets / f"{split}.txt"
        if not listing.is_file():
            if split == "val":
                continue
            raise DataError(f"voc: split file {listing} is missing")
        ids = [ln.split()[0] for ln in listing.read_text().splitlines() if ln.strip()]
        if not ids:
            raise DataError(f"voc: split file {listing} lists no images")
        rows = []
        for stem in ids:
            xml = root / "Annotations" / f"{stem}.xml"
            if not xml.is_file():
                raise DataError(f"voc: {listing} lists {stem!r} but {xml} does not exist")
            img = next((root / "JPEGImages" / (stem + e) for e in IMAGE_EXTS
                        if (root / "JPEGImages" / (stem + e)).is_file()), None)
            if img is None:
                raise DataError(f"voc: {listing} lists {stem!r} but JPEGImages/ has no image for it")
            names, boxes, diff, n_drop, _ = parse_voc_xml(xml)
            dropped += n_drop
            rows.append((stem, img, names, boxes, diff))
        parsed[split] = rows
    class_names = sorted({n for rows in parsed.values() for r in rows for n in r[2]})
    if not class_names:
        raise DataError(f"voc: no objects in any annotation under {root}")
    index = {n: i for i, n in enumerate(class_names)}
    splits = {
        split: [RawItem(id=f"JPEGImages/{img.name}", image=img, boxes=boxes,
                        labels=np.asarray([index[n] for n in names], dtype=np.int64), difficult=diff)
                for stem, img, names, boxes, diff in rows]
        for split, rows in parsed.items()
    }  # fmt: skip
    notes = [f"dropped {dropped} zero-area boxes"] if dropped else []
    return _source("voc", root, class_names, splits, notes, mask_kind=None, void_value=None, dropped_boxes=dropped)


def read_pennfudan(arg: str, split_seed: int = 0) -> SourceData:
    """``images/<name>.png`` + ``masks/<name>_mask.png`` (0 background, k = pedestrian k).

    There is no official split: the sorted image list is permuted with ``split_seed`` and cut
    60/20/20 into train/val/test; the run's ``splits.json`` records the ids. (Not the loader's
    70/10/20 per-class carve: this is the layout's documented split, which earlier runs used.)
    """
    root = _root("pennfudan", arg)
    img_dir, mask_dir = root / "images", root / "masks"
    if not img_dir.is_dir() or not mask_dir.is_dir():
        raise DataError(f"pennfudan: {root} needs images/ and masks/ folders")
    items = []
    for img in _images_in(img_dir):
        mask = mask_dir / f"{img.stem}_mask.png"
        if not mask.is_file():
            raise DataError(f"pennfudan: no instance mask {mask} for image {img}")
        items.append(RawItem(id=f"images/{img.name}", image=img, mask=mask))
    if len(items) < 3:
        raise DataError(f"pennfudan: {img_dir} holds {len(items)} images, need at least 3 to split")
    order = np.random.default_rng(split_seed).permutation(len(items))
    n_val = max(1, int(round(PENNFUDAN_FRACTIONS[1] * len(items))))
    n_test = max(1, int(round(PENNFUDAN_FRACTIONS[2] * len(items))))
    parts = {
        "test": sorted(order[:n_test]),
        "val": sorted(order[n_test:n_test + n_val]),
        "train": sorted(order[n_test + n_val:]),
    }
    splits = {k: [items[i] for i in v] for k, v in parts.items()}
    notes = [f"no official split: seeded {PENNFUDAN_FRACTIONS} train/val/test carve, split_seed={split_seed}"]
    return _source("pennfudan", root, ["person"], splits, notes, mask_kind="instance", void_value=None,
                   dropped_boxes=0)
