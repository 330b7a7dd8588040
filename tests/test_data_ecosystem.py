"""Data from where users keep it: the JPEG-bytes npz layout, Hugging Face
``datasets`` (``hf:``), ``torchvision.datasets`` (``tv:``), the class-set
checks every reader shares, and the demo's choice of data.

Everything runs offline. Images are real CIFAR-10 JPEGs taken from
``../shared/data/cifar10`` when it is present (generated JPEGs otherwise), and
every pixel test compares an item with an independent PIL decode of the very
bytes it should come from, so a row/label/file mix-up fails.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, SHARED
from PIL import Image

from vistune.data import DataError, load_data
from vistune.data.__main__ import main as data_main

CIFAR_NPZ = SHARED / "data" / "cifar10" / "cifar10_jpeg.npz"
TINY_NPZ = SHARED / "data" / "tinyimagenet" / "tinyimagenet200_val_train20_jpeg.npz"
IDENTITY = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # items = pixels / 255
CLASSES = ["airplane", "automobile", "bird", "cat"]


# ----------------------------------------------------------------- helpers


def _generated_jpegs(per_class: int) -> dict[int, list[bytes]]:
    rng = np.random.default_rng(0)
    out: dict[int, list[bytes]] = {}
    for c in range(len(CLASSES)):
        out[c] = []
        for _ in range(per_class):
            arr = np.clip(rng.normal(60 * c + 40, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=75)
            out[c].append(buf.getvalue())
    return out


@pytest.fixture(scope="module")
def jpegs() -> dict[int, list[bytes]]:
    """class -> 24 JPEG files (32x32 RGB): real CIFAR-10 test images when available."""
    per_class = 24
    if not CIFAR_NPZ.is_file():
        return _generated_jpegs(per_class)
    with np.load(CIFAR_NPZ) as d:
        data, offsets, labels = d["test_jpeg"], d["test_offsets"], d["test_labels"]
    out: dict[int, list[bytes]] = {}
    for c in range(len(CLASSES)):
        rows = np.flatnonzero(labels == c)[:per_class]
        out[c] = [data[offsets[r] : offsets[r + 1]].tobytes() for r in rows]
    return out


def decode(b: bytes) -> np.ndarray:
    """Reference decode: (3, H, W) uint8, independent of vistune."""
    return np.asarray(Image.open(io.BytesIO(b)).convert("RGB")).transpose(2, 0, 1)


def pack(files: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(files) + 1, np.int64)
    offsets[1:] = np.cumsum([len(f) for f in files])
    return np.frombuffer(b"".join(files), np.uint8).copy(), offsets


def write_jpeg_npz(path: Path, splits: dict[str, list[tuple[bytes, int]]], **extra) -> dict[str, list[bytes]]:
    """The README layout: {split}_jpeg / _offsets (N+1) / _labels / _names, plus extra keys."""
    arrays: dict[str, np.ndarray] = {}
    files_of: dict[str, list[bytes]] = {}
    for split, items in splits.items():
        files = [b for b, _ in items]
        arrays[f"{split}_jpeg"], arrays[f"{split}_offsets"] = pack(files)
        arrays[f"{split}_labels"] = np.array([lab for _, lab in items], np.uint8)
        arrays[f"{split}_names"] = np.array([f"c{lab}/{i:04d}.jpg".encode() for i, (_, lab) in enumerate(items)])
        files_of[split] = files
    np.savez(path, **arrays, **extra)
    return files_of


def items(jpegs, per_class: int, start: int = 0) -> list[tuple[bytes, int]]:
    return [(jpegs[c][i], c) for i in range(start, start + per_class) for c in range(len(CLASSES))]


def row_of(sample_id: str) -> tuple[str, int]:
    split, _, row = sample_id.rpartition(":")
    return split, int(row)


def assert_pixels_match(ds, files_of: dict[str, list[bytes]]) -> None:
    for i in range(len(ds)):
        split, row = row_of(ds.ids[i])
        x, _ = ds[i]
        assert np.array_equal((x * 255).round().numpy().astype(np.uint8), decode(files_of[split][row])), ds.ids[i]


# ----------------------------------------------------------------- npz: JPEG bytes with offsets


def test_npz_jpeg_layout_classes_pixels_and_carving(tmp_path: Path, jpegs):
    path = tmp_path / "c.npz"
    files = write_jpeg_npz(path, {"train": items(jpegs, 20), "test": items(jpegs, 4, start=20)},
                           classes=np.array(CLASSES))  # fmt: skip
    d = load_data(f"npz:{path}", img_size=32, **IDENTITY)
    assert d.class_names == CLASSES and d.num_classes == 4
    # train+test given: val is 10% of train per class, test kept whole
    assert (len(d.train), len(d.val), len(d.test)) == (72, 8, 16)
    assert Counter(d.labels("val")) == {c: 2 for c in range(4)}
    assert all(i.startswith("train:") for i in d.val.ids) and all(i.startswith("test:") for i in d.test.ids)
    for ds in (d.train, d.val, d.test):
        assert_pixels_match(ds, files)  # every item is the decode of its own row's bytes
        split = ds.ids[0].split(":")[0]
        assert all(ds.targets[k] == items_label(files, split, ds.ids[k], jpegs) for k in range(len(ds)))
    assert d.manifest()["notes"][0].startswith("npz JPEG-bytes layout")


def items_label(files_of, split, sample_id, jpegs) -> int:
    """The class whose JPEG list holds this row's bytes (labels checked against the source files)."""
    b = files_of[split][row_of(sample_id)[1]]
    return next(c for c, lst in jpegs.items() if b in lst)


def test_npz_jpeg_decodes_only_what_is_selected(tmp_path: Path, jpegs, monkeypatch):
    from vistune.data.npz import JpegBytesImages

    path = tmp_path / "c.npz"
    write_jpeg_npz(path, {"train": items(jpegs, 20), "test": items(jpegs, 4, start=20)}, classes=np.array(CLASSES))
    calls = {"load": 0, "verify": 0}
    real_load, real_verify = JpegBytesImages.load, JpegBytesImages.verify

    def load(self, sid, size):
        calls["load"] += 1
        return real_load(self, sid, size)

    def verify(self, sid, size):
        calls["verify"] += 1
        return real_verify(self, sid, size)

    monkeypatch.setattr(JpegBytesImages, "load", load)
    monkeypatch.setattr(JpegBytesImages, "verify", verify)
    d = load_data(f"npz:{path}", img_size=32, shots=3, max_per_split=4)
    assert (len(d.train), len(d.val), len(d.test)) == (12, 4, 4)
    assert calls == {"load": 20, "verify": 0}  # 96 rows in the file, 20 chosen, 20 decoded
    calls.update(load=0, verify=0)
    lazy = load_data(f"npz:{path}", img_size=32, shots=3, max_per_split=4, cache_mb=0)
    assert not lazy.train.cached and lazy.train.ids == d.train.ids
    assert calls == {"load": 0, "verify": 20}  # lazy mode: checked cheaply, decoded only on access
    assert torch.equal(lazy.train[5][0], d.train[5][0])


def test_npz_jpeg_corrupt_row_is_skipped_named_and_replaced(tmp_path: Path, jpegs, caplog):
    path = tmp_path / "c.npz"
    train = items(jpegs, 6)
    train[0] = (b"\xff\xd8\xff garbage", train[0][1])  # class 0, row 0
    write_jpeg_npz(path, {"train": train}, classes=np.array(CLASSES))
    # every row of class 0 chosen (6 of 6 minus the carve): the bad one must be skipped, not crash
    d = load_data(f"npz:{path}", img_size=16)
    assert len(d.skipped) == 1 and "[train:0] (c0/0000.jpg)" in d.skipped[0][0]
    assert "train:0" not in d.train.ids + d.val.ids + d.test.ids
    # class 0 keeps 3 readable training rows after the carve: 3-shot takes all of them for class 0
    k = load_data(f"npz:{path}", img_size=16, shots=3, seed=3)
    assert Counter(k.labels("train")) == {c: 3 for c in range(4)} and "train:0" not in k.train.ids


def test_npz_jpeg_source_pickles_without_its_bytes(tmp_path: Path, jpegs):
    path = tmp_path / "c.npz"
    files = write_jpeg_npz(path, {"train": items(jpegs, 20)}, classes=np.array(CLASSES))
    d = load_data(f"npz:{path}", img_size=32, cache_mb=0, **IDENTITY)
    blob = pickle.dumps(d.train)  # what a DataLoader worker receives in lazy mode
    assert len(blob) < sum(len(f) for f in files["train"]) / 4
    clone = pickle.loads(blob)
    assert_pixels_match(clone, files)


def test_npz_jpeg_tinyimagenet_style_val_becomes_test_and_names_preferred(tmp_path: Path, jpegs):
    path = tmp_path / "t.npz"
    write_jpeg_npz(
        path, {"train": items(jpegs, 10), "val": items(jpegs, 5, start=10)},
        classes=np.array(["n01", "n02", "n03", "n04"]), class_names=np.array(["plane, aeroplane", "car", "bird", "cat"]),
    )  # fmt: skip
    d = load_data(f"npz:{path}", img_size=8, shots=2, seed=1)
    assert d.class_names == ["plane, aeroplane", "car", "bird", "cat"]
    assert len(d.test) == 20 and all(i.startswith("val:") for i in d.test.ids)  # the given val is the test split
    assert len(d.val) == 4 and all(i.startswith("train:") for i in d.val.ids)  # a fresh val carved from train
    assert Counter(d.labels("train")) == {c: 2 for c in range(4)}
    assert not set(d.train.ids) & set(d.val.ids)


def test_npz_jpeg_bad_layouts_name_the_key(tmp_path: Path, jpegs):
    files = [b for b, _ in items(jpegs, 2)]
    data, offsets = pack(files)
    labels = np.array([0, 1] * 4, np.uint8)
    cases = [
        (dict(train_jpeg=data, train_offsets=offsets[:-1], train_labels=labels), r"train_offsets has 8 entries, expected N\+1 = 9"),
        (dict(train_jpeg=data, train_offsets=offsets[::-1].copy(), train_labels=labels), r"train_offsets: offsets must increase"),
        (dict(train_jpeg=data[:100], train_offsets=offsets, train_labels=labels), r"train_offsets: offsets must increase.* <= 100"),
        (dict(train_jpeg=data, train_labels=labels), r"no train_offsets"),
        (dict(train_jpeg=data, train_offsets=offsets, train_labels=labels, test_images=np.zeros((2, 4, 4), np.uint8),
              test_labels=np.zeros(2)), "mixes layouts"),
        (dict(train_jpeg=data, train_offsets=offsets, train_labels=labels, classes=np.array(["a", "a"])),
         "class name 'a' appears more than once"),
        (dict(train_jpeg=data.astype(np.int32), train_offsets=offsets, train_labels=labels), "train_jpeg: expected 1-D uint8"),
    ]  # fmt: skip
    for i, (arrays, msg) in enumerate(cases):
        p = tmp_path / f"bad{i}.npz"
        np.savez(p, **arrays)
        with pytest.raises(DataError, match=msg):
            load_data(f"npz:{p}", img_size=8)


@pytest.mark.skipif(not CIFAR_NPZ.is_file(), reason=f"real CIFAR-10 JPEG npz not present at {CIFAR_NPZ}")
def test_npz_jpeg_real_cifar10():
    d = load_data(f"npz:{CIFAR_NPZ}", img_size=32, shots=5, seed=2, max_per_split=500)
    assert d.class_names[:3] == ["airplane", "automobile", "bird"] and d.num_classes == 10
    assert Counter(d.labels("train")) == {c: 5 for c in range(10)}
    assert (len(d.val), len(d.test)) == (500, 500) and Counter(d.labels("test")) == {c: 50 for c in range(10)}
    assert all(i.startswith("test:") for i in d.test.ids) and all(i.startswith("train:") for i in d.val.ids)
    x, _ = d.train[0]
    assert x.shape == (3, 32, 32) and x.std() > 0.1  # real image content, not a constant


@pytest.mark.skipif(not TINY_NPZ.is_file(), reason=f"real Tiny-ImageNet npz not present at {TINY_NPZ}")
def test_npz_jpeg_real_tinyimagenet():
    d = load_data(f"npz:{TINY_NPZ}", img_size=16, shots=1, max_per_split=400)
    assert d.num_classes == 200 and d.class_names[0].startswith("goldfish")
    assert len(d.train) == 200 and len(d.test) == 400 and all(i.startswith("val:") for i in d.test.ids)
    assert d.train.uint8(0).shape == (3, 16, 16)  # greyscale JPEGs become RGB like the rest


# ----------------------------------------------------------------- class-set checks (every reader)


def make_tree(root: Path, counts: dict[str, int]) -> None:
    for k, cname in enumerate(sorted(counts)):
        (root / cname).mkdir(parents=True, exist_ok=True)
        for i in range(counts[cname]):
            Image.new("RGB", (8, 8), (60 * k, 100, 40)).save(root / cname / f"{i}.png")


def test_one_class_is_refused(tmp_path: Path):
    make_tree(tmp_path / "flat", {"ants": 10})
    with pytest.raises(DataError, match=r"has 1 class \('ants'\); a classifier needs at least 2"):
        load_data(f"folder:{tmp_path / 'flat'}", img_size=8)
    make_tree(tmp_path / "split" / "train", {"ants": 6})
    make_tree(tmp_path / "split" / "test", {"ants": 2, "bees": 2})
    with pytest.raises(DataError, match=r"train split has samples of only one class \('ants'\)"):
        load_data(f"folder:{tmp_path / 'split'}", img_size=8)


def _npz(path: Path, train_labels, test_labels=None, **extra) -> Path:
    arrays = dict(train_images=np.zeros((len(train_labels), 4, 4), np.uint8), train_labels=np.array(train_labels))
    if test_labels is not None:
        arrays.update(test_images=np.zeros((len(test_labels), 4, 4), np.uint8), test_labels=np.array(test_labels))
    np.savez(path, **arrays, **extra)
    return path


def test_stray_npz_label_is_refused_not_a_new_class(tmp_path: Path):
    # a label 7 among {0, 1} in the test file: used to make an 8-class problem silently
    p = _npz(tmp_path / "a.npz", [0, 1] * 10, [0, 1, 7, 1])
    with pytest.raises(DataError, match=r"a\.npz:test_labels: label 7 \(row 2\) is outside the training labels' range 0\.\.1"):
        load_data(f"npz:{p}", img_size=8)
    # ... and in the training file: the ids 2..6 would be classes without a single sample
    p = _npz(tmp_path / "b.npz", [0, 1] * 10 + [7], [0, 1])
    with pytest.raises(DataError, match=r"b\.npz:train_labels: labels \{0, 1, 7\} leave class id\(s\) \{2, 3, 4, 5, 6\}"):
        load_data(f"npz:{p}", img_size=8)
    # a declared class list bounds every split; declaring 8 classes makes gaps legitimate
    p = _npz(tmp_path / "c.npz", [0, 1] * 10, [0, 1, 7], classes=np.array(["normal", "pneumonia"]))
    with pytest.raises(DataError, match=r"c\.npz:test_labels: label 7 \(row 2\) is outside the 2 declared classes 0\.\.1"):
        load_data(f"npz:{p}", img_size=8)
    p = _npz(tmp_path / "d.npz", [0, 1] * 10 + [7] * 2, [0, 1, 7], classes=np.array([f"c{i}" for i in range(8)]))
    d = load_data(f"npz:{p}", img_size=8)
    assert d.num_classes == 8 and d.class_names[7] == "c7"


def test_vtab_unknown_task_test_label_above_training_range_is_refused(tmp_path: Path):
    task = tmp_path / "mytask"
    for split, labs in {"train800": [0, 1, 0, 1], "val200": [1], "test": [0, 5]}.items():
        lines = []
        for i, lab in enumerate(labs):
            rel = f"images/{split}/{i}.png"
            (task / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (4, 4)).save(task / rel)
            lines.append(f"{rel} {lab}")
        (task / f"{split}.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"mytask/test\.txt: label 5 \(row 1\) is outside the training labels' range 0\.\.1"):
        load_data(f"vtab:{task}", img_size=8)


# ----------------------------------------------------------------- hf: Hugging Face datasets


@pytest.fixture
def hf(tmp_path: Path, monkeypatch):
    """The `datasets` module with its cache in tmp and the hub offline (no network in tests)."""
    datasets = pytest.importorskip("datasets", reason="Hugging Face `datasets` not installed (pip install 'vistune[hf]')")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return datasets


def hf_split(datasets, pairs: list[tuple[bytes, int]], label_feature=None, extra: dict | None = None):
    feats = {"img": datasets.Image(), "label": label_feature or datasets.ClassLabel(names=CLASSES)}
    data = {"img": [{"bytes": b, "path": None} for b, _ in pairs], "label": [lab for _, lab in pairs]}
    for name, (feature, values) in (extra or {}).items():
        feats[name], data[name] = feature, values
    return datasets.Dataset.from_dict(data, features=datasets.Features(feats))


def test_hf_save_to_disk_splits_classes_pixels_and_fewshot(tmp_path: Path, hf, jpegs):
    train, val, test = items(jpegs, 12), items(jpegs, 3, start=12), items(jpegs, 5, start=15)
    dd = hf.DatasetDict(train=hf_split(hf, train), validation=hf_split(hf, val), test=hf_split(hf, test),
                        unlabeled=hf_split(hf, test))  # fmt: skip
    dd.save_to_disk(tmp_path / "disk")
    d = load_data(f"hf:{tmp_path / 'disk'}", img_size=32, **IDENTITY)
    assert d.class_names == CLASSES
    assert (len(d.train), len(d.val), len(d.test)) == (48, 12, 20)  # the data set's own splits, as given
    files = {"train": [b for b, _ in train], "val": [b for b, _ in val], "test": [b for b, _ in test]}
    for ds, pairs in ((d.train, train), (d.val, val), (d.test, test)):
        assert_pixels_match(ds, files)
        assert ds.targets == [pairs[row_of(i)[1]][1] for i in ds.ids]
    notes = " | ".join(d.info["notes"])
    assert "val=validation" in notes and "splits ignored: unlabeled" in notes
    k = load_data(f"hf:{tmp_path / 'disk'}", img_size=32, shots=3, seed=5, **IDENTITY)
    assert Counter(k.labels("train")) == {c: 3 for c in range(4)}
    assert k.train.ids == load_data(f"hf:{tmp_path / 'disk'}", img_size=8, shots=3, seed=5).train.ids
    assert k.train.ids != load_data(f"hf:{tmp_path / 'disk'}", img_size=8, shots=3, seed=6).train.ids
    assert_pixels_match(k.train, files)


def test_hf_parquet_and_imagefolder_and_carving(tmp_path: Path, hf, jpegs):
    ds = hf_split(hf, items(jpegs, 10))
    ds.to_parquet(str(tmp_path / "one.parquet"))
    d = load_data(f"hf:{tmp_path / 'one.parquet'}", img_size=8)
    assert d.class_names == CLASSES  # ClassLabel survives parquet
    assert (len(d.train), len(d.val), len(d.test)) == (28, 4, 8)  # one split: 70/10/20 carved per class

    for split, start, n in (("train", 0, 8), ("test", 8, 3)):
        for b, lab in items(jpegs, n, start=start):
            folder = tmp_path / "imgs" / split / CLASSES[lab]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{hashlib.md5(b).hexdigest()}.jpg").write_bytes(b)
    f = load_data(f"hf:{tmp_path / 'imgs'}", img_size=32, **IDENTITY)
    assert f.class_names == sorted(CLASSES)  # imagefolder: ClassLabel from folder names
    assert len(f.test) == 12 and len(f.train) + len(f.val) == 32
    for k in range(0, len(f.test), 3):
        x, y = f.test[k]
        # the label names the folder the decoded file came from
        matches = [c for c in range(4) for b in jpegs[c] if np.array_equal(decode(b), (x * 255).round().numpy())]
        assert matches and CLASSES[matches[0]] == f.class_names[y]


def test_hf_columns_found_overridden_and_checked(tmp_path: Path, hf, jpegs):
    pairs = items(jpegs, 6)
    ds = hf_split(hf, pairs, label_feature=hf.Value("int64"),
                  extra={"thumb": (hf.Image(), [{"bytes": jpegs[0][0], "path": None}] * len(pairs)),
                         "target": (hf.ClassLabel(names=["x", "y"]), [i % 2 for i in range(len(pairs))])})  # fmt: skip
    ds.save_to_disk(tmp_path / "d")
    spec = f"hf:{tmp_path / 'd'}"
    auto = load_data(spec, img_size=8)  # first Image ('img') and first ClassLabel ('target')
    assert auto.class_names == ["x", "y"]
    notes = " | ".join(auto.info["notes"])
    assert "image column 'img'" in notes
    chosen = load_data(spec, img_size=8, label_column="label")  # plain ints: classes from the training labels
    assert chosen.class_names == ["0", "1", "2", "3"]
    assert sorted(Counter(chosen.labels("train") + chosen.labels("val") + chosen.labels("test")).values()) == [6] * 4
    other = load_data(spec, img_size=32, image_column="thumb", label_column="label", **IDENTITY)
    assert np.array_equal((other.train[0][0] * 255).round().numpy().astype(np.uint8), decode(jpegs[0][0]))
    with pytest.raises(DataError, match=r"no column 'nope' \(columns: img: Image"):
        load_data(spec, img_size=8, image_column="nope")
    with pytest.raises(DataError, match="column 'label' is Value, not an Image feature"):
        load_data(spec, img_size=8, image_column="label")
    with pytest.raises(DataError, match="apply to hf: data specs only"):
        load_data(f"npz:{tmp_path / 'x.npz'}", img_size=8, label_column="label")

    # integer labels: a test label outside the training range is refused, naming split and column
    bad = hf.DatasetDict(train=hf_split(hf, pairs, label_feature=hf.Value("int64")),
                         test=hf_split(hf, [(jpegs[0][0], 9)], label_feature=hf.Value("int64")))  # fmt: skip
    bad.save_to_disk(tmp_path / "bad")
    with pytest.raises(DataError, match=r"\[test\]:label: label 9 \(row 0\) is outside the training labels' range 0\.\.3"):
        load_data(f"hf:{tmp_path / 'bad'}", img_size=8)
    nolabel = hf.Dataset.from_dict({"img": [{"bytes": jpegs[0][0], "path": None}] * 4, "caption": ["a"] * 4},
                                   features=hf.Features({"img": hf.Image(), "caption": hf.Value("string")}))  # fmt: skip
    nolabel.save_to_disk(tmp_path / "nolabel")
    with pytest.raises(DataError, match="no ClassLabel column and no 'label' column .*--label-column"):
        load_data(f"hf:{tmp_path / 'nolabel'}", img_size=8)


def test_hf_string_labels_and_unlabelled_test_split(tmp_path: Path, hf, jpegs):
    def strings(pairs, names):
        return hf.Dataset.from_dict({"img": [{"bytes": b, "path": None} for b, _ in pairs],
                                     "label": [names[lab] for _, lab in pairs]},
                                    features=hf.Features({"img": hf.Image(), "label": hf.Value("string")}))  # fmt: skip

    train, test = items(jpegs, 8), items(jpegs, 2, start=8)
    hf.DatasetDict(train=strings(train, CLASSES), test=strings(test, CLASSES)).save_to_disk(tmp_path / "s")
    d = load_data(f"hf:{tmp_path / 's'}", img_size=8)
    assert d.class_names == sorted(CLASSES)  # classes: the sorted training values
    assert [d.class_names[y] for y in d.labels("train")] == [CLASSES[train[row_of(i)[1]][1]] for i in d.train.ids]
    assert [d.class_names[y] for y in d.labels("test")] == [CLASSES[test[row_of(i)[1]][1]] for i in d.test.ids]
    hf.DatasetDict(train=strings(train, CLASSES), test=strings(test, ["airplane", "automobile", "bird", "Cat"])
                   ).save_to_disk(tmp_path / "s2")  # fmt: skip
    with pytest.raises(DataError, match=r"\[test\]:label: label 'Cat' \(row 3\) is not one of the training split's 4"):
        load_data(f"hf:{tmp_path / 's2'}", img_size=8)

    # the hub's convention for an unlabelled test split: ClassLabel -1 everywhere
    unlabelled = hf_split(hf, [(b, -1) for b, _ in test])
    hf.DatasetDict(train=hf_split(hf, train), test=unlabelled).save_to_disk(tmp_path / "u")
    u = load_data(f"hf:{tmp_path / 'u'}", img_size=8)
    assert all(i.startswith("train:") for i in u.test.ids)  # dropped; test carved from train instead
    assert "split 'test' is unlabelled" in " | ".join(u.info["notes"])
    partly = hf_split(hf, [(test[0][0], -1), (test[1][0], 1)])
    hf.DatasetDict(train=hf_split(hf, train), test=partly).save_to_disk(tmp_path / "p")
    with pytest.raises(DataError, match=r"\[test\]:label \(row 0\): label -1 is negative"):
        load_data(f"hf:{tmp_path / 'p'}", img_size=8)


def test_hf_hub_name_offline_and_missing_library_give_one_line(hf, monkeypatch):
    with pytest.raises(DataError) as e:
        load_data("hf:someone/not-cached-anywhere", img_size=8)
    msg = str(e.value)
    assert "\n" not in msg and "needs the network" in msg and str(hf.config.HF_DATASETS_CACHE) in msg
    with pytest.raises(DataError, match="local path .* does not exist"):
        load_data("hf:./no/such/dir", img_size=8)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(DataError, match=r"pip install 'vistune\[hf\]'"):
        load_data("hf:whatever", img_size=8)


# ----------------------------------------------------------------- tv: torchvision.datasets


@pytest.fixture
def cifar_root(tmp_path: Path, jpegs, monkeypatch) -> tuple[Path, dict[str, np.ndarray], dict[str, list[int]]]:
    """CIFAR-10's python batches as torchvision expects them, written from real images.

    torchvision checks each batch's md5 against its own table; the table is
    pointed at the files written here (the layout and the reader are real).
    """
    from torchvision.datasets import CIFAR10

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir(parents=True)
    names = CLASSES + ["deer", "dog", "frog", "horse", "ship", "truck"]
    batches = {f"data_batch_{i}": items(jpegs, 2, start=2 * (i - 1)) for i in range(1, 6)}
    batches["test_batch"] = items(jpegs, 3, start=10)
    pixels: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    labels: dict[str, list[int]] = {"train": [], "test": []}
    md5 = {}
    for name, pairs in batches.items():
        data = np.stack([decode(b).reshape(-1) for b, _ in pairs])  # (N, 3072): R plane, G plane, B plane
        with open(base / name, "wb") as f:
            pickle.dump({"data": data, "labels": [lab for _, lab in pairs]}, f, protocol=2)
        split = "test" if name == "test_batch" else "train"
        pixels[split].append(data.reshape(-1, 3, 32, 32))
        labels[split] += [lab for _, lab in pairs]
        md5[name] = hashlib.md5((base / name).read_bytes()).hexdigest()
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f, protocol=2)
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": hashlib.md5((base / "batches.meta").read_bytes()).hexdigest()})
    return tmp_path, {s: np.concatenate(p) for s, p in pixels.items()}, labels


def test_tv_cifar10_from_its_python_batches(cifar_root):
    root, pixels, labels = cifar_root
    d = load_data("tv:cifar10", img_size=32, data_root=root, **IDENTITY)
    assert d.class_names[:4] == CLASSES and d.num_classes == 10
    # CIFAR-10 has only 4 classes in this copy: the declared 10 bound the labels, and few-shot
    # refuses the empty classes by name instead of silently training a 4-way problem
    assert len(d.test) == 12 and len(d.train) + len(d.val) == 40
    for ds in (d.train, d.val, d.test):
        for k in range(len(ds)):
            split, row = row_of(ds.ids[k])
            x, y = ds[k]
            assert y == labels[split][row]
            assert np.array_equal((x * 255).round().numpy().astype(np.uint8), pixels[split][row])
    with pytest.raises(DataError, match="class 'deer' .* has only 0"):
        load_data("tv:CIFAR10", img_size=8, data_root=root, shots=2)


def test_tv_fewshot_and_env_root_on_fashion_mnist_layout(tmp_path: Path, monkeypatch):
    """torchvision's own MNIST-family layout (root/FashionMNIST/raw/*-ubyte), root from $VISTUNE_DATA_ROOT."""
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 120), ("t10k", 30)):
        labs = np.arange(n) % 10
        rng.shuffle(labs)
        imgs = np.repeat((labs * 25).astype(np.uint8)[:, None, None], 28, 1).repeat(28, 2)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + b"".join(
            int(v).to_bytes(4, "big") for v in imgs.shape) + imgs.tobytes())  # fmt: skip
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + labs.astype(np.uint8).tobytes())
    monkeypatch.setenv("VISTUNE_DATA_ROOT", str(tmp_path))
    d = load_data("tv:FashionMNIST", img_size=14, shots=4, seed=1, **IDENTITY)
    assert d.class_names[0] == "T-shirt/top" and Counter(d.labels("train")) == {c: 4 for c in range(10)}
    assert len(d.test) == 30
    for ds in (d.train, d.test):
        for k in range(len(ds)):
            x, y = ds[k]
            assert torch.allclose(x * 255, torch.full_like(x, 25.0 * y), atol=0.5)  # pixel value encodes the label
    assert d.manifest()["root"] == str(tmp_path.resolve())
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + (30).to_bytes(4, "big") + b"\x01")  # truncated
    with pytest.raises(DataError, match=r"tv: FashionMNIST: cannot read its files in .*delete them to download again"):
        load_data("tv:FashionMNIST", img_size=8)


def test_tv_file_backed_dtd_with_its_own_splits(tmp_path: Path, jpegs):
    data = tmp_path / "dtd" / "dtd"
    lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for split, start, n in (("train", 0, 6), ("val", 6, 2), ("test", 8, 3)):
        for b, lab in items(jpegs, n, start=start):
            rel = f"{CLASSES[lab]}/{hashlib.md5(b).hexdigest()[:8]}.jpg"
            (data / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
            (data / "images" / rel).write_bytes(b)
            lines[split].append(rel)
    (data / "labels").mkdir()
    for split, rels in lines.items():
        (data / "labels" / f"{split}1.txt").write_text("\n".join(rels) + "\n")
    d = load_data("tv:DTD", img_size=32, data_root=tmp_path, **IDENTITY)
    assert d.class_names == sorted(CLASSES)
    assert (len(d.train), len(d.val), len(d.test)) == (24, 8, 12)  # DTD's own train/val/test
    assert d.test.ids[0].startswith("dtd/dtd/images/")  # ids: files relative to the data root
    for k in range(len(d.test)):
        x, y = d.test[k]
        b = (tmp_path / d.test.ids[k]).read_bytes()
        assert np.array_equal((x * 255).round().numpy().astype(np.uint8), decode(b))
        assert d.test.ids[k].split("/")[3] == d.class_names[y]


def test_tv_absent_files_without_network_give_one_line_naming_the_folder(tmp_path: Path, monkeypatch):
    import urllib.error

    import torchvision.datasets.cifar as tv_cifar

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", no_network)
    root = tmp_path / "empty-root"
    with pytest.raises(DataError) as e:
        load_data("tv:CIFAR100", img_size=8, data_root=root)
    msg = str(e.value)
    assert "\n" not in msg and f"not in {root}" in msg and "downloading it failed" in msg and "Name or service" in msg
    monkeypatch.setenv("VISTUNE_OFFLINE", "1")
    with pytest.raises(DataError, match=r"VISTUNE_OFFLINE forbids downloading"):
        load_data("tv:CIFAR100", img_size=8, data_root=root)
    with pytest.raises(DataError, match="not a torchvision classification data set vistune knows; known: CIFAR10"):
        load_data("tv:CocoDetection", img_size=8, data_root=root)


# ----------------------------------------------------------------- fetch helper and the demo's data choice


def test_fetch_command_prints_one_line(tmp_path: Path, capsys, jpegs):
    path = tmp_path / "c.npz"
    write_jpeg_npz(path, {"train": items(jpegs, 5)}, classes=np.array(CLASSES))
    assert data_main(["fetch", f"npz:{path}"]) == 0
    assert capsys.readouterr().out.strip() == f"npz:{path}: 20 train images, 4 classes, at {path.resolve()}"
    assert data_main(["fetch", "npz:/nope.npz"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: npz: file /nope.npz does not exist" in err


def _demo(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISTUNE_")}
    env.update(VISTUNE_PYTHON=sys.executable, PYTHONPATH=str(REPO / "src"), **env_extra)
    return subprocess.run(["bash", str(REPO / "scripts" / "demo.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_demo_chooses_data_it_can_get_or_says_what_to_install(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    base = dict(VISTUNE_SHARED=str(empty), VISTUNE_DATA_ROOT=str(empty / "root"), VISTUNE_OFFLINE="1")
    flowers = tmp_path / "shared" / "data" / "flowers5"
    make_tree(flowers, {"daisy": 2, "rose": 2})
    r = _demo({**base, "VISTUNE_SHARED": str(tmp_path / "shared"), "VISTUNE_FASHION_MNIST_DIR": str(empty)})
    assert r.returncode == 0 and f"--data folder:{flowers}" in r.stdout and "demo: data: flowers-5" in r.stdout

    fm = tmp_path / "fm"
    fm.mkdir()
    for prefix, n in (("train", 20), ("t10k", 10)):
        for kind, arr in (("images-idx3", np.zeros((n, 28, 28), np.uint8)), ("labels-idx1", np.arange(n) % 10)):
            import gzip

            with gzip.open(fm / f"{prefix}-{kind}-ubyte.gz", "wb") as f:
                f.write(bytes([0, 0, 8, arr.ndim]) + b"".join(int(v).to_bytes(4, "big") for v in arr.shape)
                        + arr.astype(np.uint8).tobytes())  # fmt: skip
    r = _demo({**base, "VISTUNE_FASHION_MNIST_DIR": str(fm)})
    assert r.returncode == 0, r.stderr
    assert f"--data fashion-mnist:{fm} --subset 800/200" in r.stdout and "Debian package" in r.stdout

    r = _demo({**base, "VISTUNE_FASHION_MNIST_DIR": str(empty)})
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "apt-get install dataset-fashion-mnist" in r.stderr
    assert "connect to the network" in r.stderr
