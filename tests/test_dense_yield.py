"""The dense readers yield exactly what they yielded before they joined :mod:`vistune.data`.

``tests/fixtures/dense_yield.json`` was written by ``tests/fixtures/make_dense_yield.py`` from the
code *before* the move (commit 6a7188b: ``vistune.dense.datasets.load_dense_data`` plus the
train+val merge that ``tasks.dense.load_dense_for`` did for ``trainval``). For every case below it
holds the class names, the load options recorded in ``info``, and per split the sample ids in
order, the flip flag and, per sample, the letterbox geometry and a hash of every target array
(canvas mask and original mask, canvas and original boxes, labels, difficult flags). Image
pixels are not hashed: the decode path (``_open_image`` + ``letterbox_image``) did not move, and
a JPEG's decoded bytes may differ between libjpeg builds, which would make the fixture
machine-specific. The cases cover each kind on tiny generated folders (every option that
changes the selection: caps, split seed, flip, trainval, missing val, void values, zero-area
and difficult boxes) and on the real data in ../shared (skipped with the reason when absent).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED
from tests.test_dense import H, W, make_camvid, make_pennfudan, make_voc
from vistune.dense import load_dense_data

FIXTURE = Path(__file__).parent / "fixtures" / "dense_yield.json"
ZERO = "<object><name>red</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>5</xmax><ymax>9</ymax></bndbox></object>"
HARD = ("<object><name>green</name><difficult>1</difficult><bndbox><xmin>3</xmin><ymin>4</ymin><xmax>20</xmax>"
        "<ymax>30</ymax></bndbox></object>")
#: info keys compared as they are (spec and root hold paths, compared separately; notes: see the test)
INFO_KEYS = ("kind", "img_size", "mean", "std", "augment", "max_per_split", "split_seed",
             "dropped_zero_area_boxes", "letterbox", "ignore_index")


def _camvid(root: Path) -> Path:
    return make_camvid(root)


def _camvid_noval(root: Path) -> Path:
    return make_camvid(root, splits=("train", "test"), classes=None)  # the 11 CamVid names apply


def _camvid_void(root: Path) -> Path:
    make_camvid(root)
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[:, :10] = 3  # == len(classes): the void value
    mask[:5, 20:] = 255
    mask[30:, 40:] = 2
    Image.fromarray(mask, mode="L").save(root / "testannot" / "s0.png")
    return root


def _voc(root: Path) -> Path:
    return make_voc(root, extra_objects=ZERO + HARD)


def _voc_noval(root: Path) -> Path:
    make_voc(root, extra_objects=HARD)
    (root / "ImageSets" / "Main" / "val.txt").unlink()
    (root / "ImageSets" / "Main" / "train.txt").write_text("s3\ns1\ns0\n")  # listing order, not sorted
    return root


def _pennfudan(root: Path) -> Path:
    return make_pennfudan(root, n=11)


#: name -> (builder or real folder under ../shared/data, kind, task, load options)
CASES: dict[str, tuple[Any, str, str, dict[str, Any]]] = {
    "camvid": (_camvid, "camvid", "segment", {}),
    "camvid_flip_cap": (_camvid, "camvid", "segment", {"augment": "flip", "max_per_split": 2, "split_seed": 5}),
    "camvid_trainval": (_camvid, "camvid", "segment", {"trainval": True, "augment": "flip"}),
    "camvid_noval": (_camvid_noval, "camvid", "segment", {}),
    "camvid_void": (_camvid_void, "camvid", "segment", {"img_size": 40}),
    "voc": (_voc, "voc", "detect", {}),
    "voc_noval_cap": (_voc_noval, "voc", "detect", {"max_per_split": 2}),
    "voc_trainval": (_voc, "voc", "detect", {"trainval": True}),
    "pennfudan_detect": (_pennfudan, "pennfudan", "detect", {}),
    "pennfudan_segment_seed": (_pennfudan, "pennfudan", "segment", {"split_seed": 3, "max_per_split": 2}),
    "pennfudan_trainval": (_pennfudan, "pennfudan", "detect", {"trainval": True, "augment": "flip"}),
    "real_camvid": ("camvid", "camvid", "segment", {}),
    "real_camvid_cap": ("camvid", "camvid", "segment", {"max_per_split": 20, "augment": "flip"}),
    "real_pennfudan_detect": ("pennfudan", "pennfudan", "detect", {}),
    "real_pennfudan_segment": ("pennfudan", "pennfudan", "segment", {"max_per_split": 30}),
    "real_bccd": ("bccd", "voc", "detect", {}),
    "real_bccd_trainval": ("bccd", "voc", "detect", {"trainval": True, "max_per_split": 50}),
}


def _digest(*arrays: np.ndarray | None) -> str:
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none;")
            continue
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:20]


def summarise(d: Any) -> dict[str, Any]:
    """What a load yields, in a JSON-able form that does not depend on where the folder lives."""
    splits: dict[str, Any] = {}
    for name in ("train", "val", "test"):
        ds = getattr(d, name)
        splits[name] = None if ds is None else {
            "ids": list(ds.ids), "flip": bool(ds.flip),
            "samples": [[s.lb.width, s.lb.height, s.lb.new_w, s.lb.new_h, s.lb.size, list(s.image.shape),
                         _digest(s.mask, s.orig_mask), _digest(s.boxes, s.orig_boxes, s.labels, s.difficult)]
                        for s in ds.samples],
        }  # fmt: skip
    return {
        "task": d.task, "num_classes": d.num_classes, "class_names": list(d.class_names),
        "info": {k: d.info.get(k) for k in INFO_KEYS}, "notes": list(d.info.get("notes", [])),
        "splits": splits,
    }  # fmt: skip


def case_spec(name: str, tmp: Path) -> tuple[str, str, dict[str, Any]]:
    """``(spec, task, options)`` of a case, building its folder under ``tmp`` (or skipping)."""
    where, kind, task, opts = CASES[name]
    if isinstance(where, str):
        root = SHARED / "data" / where
        if not root.is_dir():
            pytest.skip(f"{root} is absent (real data lives in ../shared on the project's machines)")
    else:
        root = where(tmp / name)
    return f"{kind}:{root}", task, {"img_size": 32, **opts}


@pytest.fixture(scope="module")
def expected() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text())


def test_fixture_covers_every_case(expected):
    assert sorted(expected["cases"]) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_dense_load_yields_what_it_did_before(name, expected, tmp_path):
    spec, task, opts = case_spec(name, tmp_path)
    got = summarise(load_dense_data(spec, task, **opts))
    want = expected["cases"][name]
    assert got["class_names"] == want["class_names"] and got["num_classes"] == want["num_classes"]
    assert got["info"] == want["info"]
    for split in ("train", "val", "test"):
        assert got["splits"][split] == want["splits"][split], f"{name}: {split} split differs"
    # the old notes are all kept, in order; the shared loader may only add to them (e.g. trainval)
    assert got["notes"][: len(want["notes"])] == want["notes"]
