"""Tests for vistune.data: every reader on tiny generated trees, the split and
few-shot rules, and each bad-input path.

Images are solid colours chosen per class, so a test can check from the
pixels that an item carries the right label (catching label/file mix-ups,
not only sizes).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vistune.data import (
    FASHION_MNIST_ENV_VAR,
    KNOWN_KINDS,
    VTAB_NUM_CLASSES,
    DataError,
    DataSplits,
    fewshot_indices,
    load_data,
    parse_spec,
    proportional_quota,
    stratified_split,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PNEUMONIA = Path(os.environ.get("VISTUNE_TEST_PNEUMONIA", SHARED / "pneumoniamnist.npz"))
FMNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

# Solid class colours far apart in every channel so JPEG error can't confuse them.
COLOURS = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20)]
IDENTITY = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # items = pixels / 255


# ----------------------------------------------------------------- helpers


def write_image(path: Path, colour=(200, 40, 40), mode: str = "RGB", size=(20, 14)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "L":
        Image.new("L", size, colour if isinstance(colour, int) else colour[0]).save(path)
    elif mode == "RGBA":
        Image.new("RGBA", size, (*colour, 128)).save(path)
    elif mode == "P":
        Image.new("RGB", size, colour).convert("P").save(path)
    else:
        Image.new("RGB", size, colour).save(path, quality=95)


def make_class_tree(root: Path, counts: dict[str, int], ext: str = "jpg") -> None:
    """root/<class>/<i>.jpg, class k coloured COLOURS[k] (classes in sorted order)."""
    for k, cname in enumerate(sorted(counts)):
        for i in range(counts[cname]):
            write_image(root / cname / f"img{i:03d}.{ext}", COLOURS[k])


def mean_rgb(x: torch.Tensor) -> np.ndarray:
    return x.mean(dim=(1, 2)).numpy() * 255


def assert_items_match_colour(ds, class_colours) -> None:
    """Each item's mean colour is its label's colour (label <-> file mapping is right)."""
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape[0] == 3
        assert np.allclose(mean_rgb(x), class_colours[y], atol=12), (i, y, mean_rgb(x))


def split_ids(d: DataSplits, name: str) -> list[str]:
    m = d.manifest()["splits"][name]
    return [] if m is None else m["ids"]


def write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


# ----------------------------------------------------------------- spec


def test_parse_spec_keeps_colons_in_paths_and_ignores_case():
    assert parse_spec("folder:/a/b:c") == ("folder", "/a/b:c")
    assert parse_spec("FGVC:/x") == ("fgvc", "/x")
    assert parse_spec("fashion-mnist") == ("fashion-mnist", None)
    assert parse_spec("fashion-mnist:/d") == ("fashion-mnist", "/d")


def test_unknown_kind_lists_all_known_kinds():
    with pytest.raises(DataError) as e:
        parse_spec("imagenet:/data")
    msg = str(e.value)
    assert "'imagenet'" in msg
    for kind in KNOWN_KINDS:
        assert kind in msg
    with pytest.raises(DataError, match="needs a path"):
        parse_spec("npz")
    with pytest.raises(DataError, match="unknown data spec kind"):
        load_data("/just/a/path", img_size=8)


# ----------------------------------------------------------------- few-shot / splitting


def test_fewshot_exact_k_sorted_deterministic():
    labels = [i % 3 for i in range(60)]  # 20 per class
    a = fewshot_indices(labels, 4, seed=1)
    assert a == sorted(a) and len(set(a)) == len(a)
    assert Counter(labels[i] for i in a) == {0: 4, 1: 4, 2: 4}
    assert fewshot_indices(labels, 4, seed=1) == a
    assert fewshot_indices(labels, 4, seed=2) != a
    # growing k extends the same per-class order, so K=2 picks are inside K=4 picks
    assert set(fewshot_indices(labels, 2, seed=1)) <= set(a)


def test_fewshot_class_choice_is_independent_of_other_classes():
    # class 0 (visited first) grows; class 1's picks, as ranks within class 1, must not move
    labels = [0] * 10 + [1] * 10
    more = [0] * 40 + [1] * 10
    pick1 = [i - 10 for i in fewshot_indices(labels, 3, 7) if labels[i] == 1]
    pick1_more = [i - 40 for i in fewshot_indices(more, 3, 7) if more[i] == 1]
    assert pick1 == pick1_more


def test_fewshot_too_small_class_names_the_class():
    labels = [0] * 5 + [1] * 2
    with pytest.raises(DataError, match="label 1 has only 2"):
        fewshot_indices(labels, 3, 0)
    with pytest.raises(DataError, match="'bees' \\(label 2\\) has only 0"):
        fewshot_indices([0, 0, 1, 1], 1, 0, num_classes=3, class_names=["a", "b", "bees"])
    with pytest.raises(DataError, match="positive"):
        fewshot_indices(labels, 0, 0)


def test_stratified_split_partitions_per_class():
    labels = [0] * 50 + [1] * 30 + [2] * 1
    train, val, test = stratified_split(labels, (0.1, 0.2), seed=3)
    assert sorted(train + val + test) == list(range(len(labels)))
    for part, frac in ((val, 0.1), (test, 0.2)):
        got = Counter(labels[i] for i in part)
        assert got[0] == round(50 * frac) and got[1] == round(30 * frac)
    assert 80 in train  # a singleton class stays in train
    assert stratified_split(labels, (0.1, 0.2), seed=3) == [train, val, test]
    assert stratified_split(labels, (0.1, 0.2), seed=4) != [train, val, test]


def test_proportional_quota_keeps_balance_and_total():
    q = proportional_quota({0: 600, 1: 300, 2: 100}, 100)
    assert q == {0: 60, 1: 30, 2: 10}
    assert sum(proportional_quota({0: 7, 1: 5, 2: 1}, 6).values()) == 6


# ----------------------------------------------------------------- folder


@pytest.fixture
def flat_tree(tmp_path: Path) -> Path:
    root = tmp_path / "flowers"
    make_class_tree(root, {"a": 20, "b": 10, "c": 30})
    return root


def test_folder_flat_carves_70_10_20_stratified_and_labels_match_pixels(flat_tree: Path):
    d = load_data(f"folder:{flat_tree}", img_size=8, **IDENTITY)
    assert d.class_names == ["a", "b", "c"] and d.num_classes == 3
    per = {s: Counter(d.labels(s)) for s in ("train", "val", "test")}
    assert per["val"] == {0: 2, 1: 1, 2: 3}
    assert per["test"] == {0: 4, 1: 2, 2: 6}
    assert per["train"] == {0: 14, 1: 7, 2: 21}
    ids = [set(split_ids(d, s)) for s in ("train", "val", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert len(ids[0] | ids[1] | ids[2]) == 60
    for split in (d.train, d.val, d.test):
        assert_items_match_colour(split, COLOURS)
    # id -> label agreement: the class folder in the id is the label's class name
    for s in ("train", "val", "test"):
        m = d.manifest()["splits"][s]
        assert all(i.split("/")[0] == d.class_names[y] for i, y in zip(m["ids"], m["labels"]))


def test_folder_split_is_reproducible_per_split_seed(flat_tree: Path):
    a = load_data(f"folder:{flat_tree}", img_size=8).manifest()
    b = load_data(f"folder:{flat_tree}", img_size=8).manifest()
    c = load_data(f"folder:{flat_tree}", img_size=8, split_seed=1).manifest()
    assert a == b
    assert a["splits"]["test"]["ids"] != c["splits"]["test"]["ids"]
    # the few-shot seed must not move the test set (runs over seeds share one test set)
    e = load_data(f"folder:{flat_tree}", img_size=8, shots=2, seed=5).manifest()
    assert e["splits"]["test"] == a["splits"]["test"] and e["splits"]["val"] == a["splits"]["val"]


def test_folder_listing_order_does_not_change_selection(flat_tree: Path, monkeypatch):
    ref = load_data(f"folder:{flat_tree}", img_size=8, shots=3, seed=4).manifest()
    original = Path.rglob
    monkeypatch.setattr(Path, "rglob", lambda self, pat: reversed(list(original(self, pat))))
    again = load_data(f"folder:{flat_tree}", img_size=8, shots=3, seed=4).manifest()
    assert again == ref


def test_folder_uses_split_subfolders(tmp_path: Path):
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        make_class_tree(tmp_path / split, {"x": n, "y": n})
    d = load_data(f"folder:{tmp_path}", img_size=8, **IDENTITY)
    assert (len(d.train), len(d.val), len(d.test)) == (12, 4, 6)
    for s in ("train", "val", "test"):
        assert all(i.startswith(f"{s}/") for i in split_ids(d, s))
    assert_items_match_colour(d.test, COLOURS)


def test_folder_train_val_only_uses_val_as_test_and_carves_val_from_train(tmp_path: Path):
    make_class_tree(tmp_path / "train", {"ants": 20, "bees": 20})
    make_class_tree(tmp_path / "val", {"ants": 5, "bees": 5})
    d = load_data(f"folder:{tmp_path}", img_size=8)
    assert all(i.startswith("val/") for i in split_ids(d, "test")) and len(d.test) == 10
    assert all(i.startswith("train/") for i in split_ids(d, "val")) and Counter(d.labels("val")) == {0: 2, 1: 2}
    assert len(d.train) == 36
    assert any("used as test" in n for n in d.manifest()["notes"])


def test_folder_grey_rgba_palette_become_three_channels(tmp_path: Path):
    for i in range(3):  # 5 per class: carving keeps one per class in val and test
        write_image(tmp_path / "g" / f"grey{i}.png", 100, mode="L")
        write_image(tmp_path / "r" / f"rgba{i}.png", (10, 200, 30), mode="RGBA")
    for i in range(2):
        write_image(tmp_path / "g" / f"grey{i}.jpg", 100, mode="L")
        write_image(tmp_path / "r" / f"pal{i}.gif", (10, 200, 30), mode="P")
    d = load_data(f"folder:{tmp_path}", img_size=6, trainval=True, **IDENTITY)
    seen = {}
    for ds in (d.train, d.test):
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (3, 6, 6) and x.dtype == torch.float32
            seen[ds.ids[i]] = mean_rgb(x)
    assert len(seen) == 10
    for name, rgb in seen.items():
        want = (100, 100, 100) if name.startswith("g/") else (10, 200, 30)
        assert np.allclose(rgb, want, atol=6), (name, rgb)


def test_folder_trainval_merges_val_into_train(flat_tree: Path):
    plain = load_data(f"folder:{flat_tree}", img_size=8)
    merged = load_data(f"folder:{flat_tree}", img_size=8, trainval=True)
    assert merged.val is None and merged.labels("val") == []
    assert set(split_ids(merged, "train")) == set(split_ids(plain, "train")) | set(split_ids(plain, "val"))
    assert split_ids(merged, "test") == split_ids(plain, "test")


def test_folder_fewshot_picks_k_per_class_and_leaves_test_whole(flat_tree: Path):
    full = load_data(f"folder:{flat_tree}", img_size=8)
    d = load_data(f"folder:{flat_tree}", img_size=8, shots=5, seed=3)
    assert Counter(d.labels("train")) == {0: 5, 1: 5, 2: 5}
    assert split_ids(d, "test") == split_ids(full, "test")
    # the train ids are exactly fewshot_indices over the full train split
    full_train = full.manifest()["splits"]["train"]
    want = [full_train["ids"][i] for i in fewshot_indices(full_train["labels"], 5, 3)]
    assert split_ids(d, "train") == want
    assert d.manifest()["fewshot"] == {"shots": 5, "seed": 3}
    other = load_data(f"folder:{flat_tree}", img_size=8, shots=5, seed=4)
    assert split_ids(other, "train") != split_ids(d, "train")
    with pytest.raises(DataError, match="class 'b'"):
        load_data(f"folder:{flat_tree}", img_size=8, shots=8)  # b has 7 training images


def test_folder_lazy_mode_gives_identical_items(flat_tree: Path):
    cached = load_data(f"folder:{flat_tree}", img_size=10)
    lazy = load_data(f"folder:{flat_tree}", img_size=10, cache_mb=0)
    assert cached.train.cached and not lazy.train.cached
    assert cached.manifest()["splits"] == lazy.manifest()["splits"]
    for i in (0, 7, len(lazy.test) - 1):
        assert torch.equal(cached.test[i][0], lazy.test[i][0])


def test_augment_flip_only_on_train(flat_tree: Path):
    # a left/right gradient so a horizontal flip is visible
    grad = np.tile(np.linspace(0, 255, 16, dtype=np.uint8), (16, 1))
    for p in flat_tree.rglob("*.jpg"):
        Image.fromarray(np.stack([grad] * 3, -1)).save(p)
    d = load_data(f"folder:{flat_tree}", img_size=16, augment="flip", **IDENTITY)
    torch.manual_seed(0)
    outs = [d.train[0][0] for _ in range(12)]
    assert all(o.shape == (3, 16, 16) for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    left_minus_right = [float(o[0, :, :4].mean() - o[0, :, -4:].mean()) for o in outs]
    assert min(left_minus_right) < 0 < max(left_minus_right)  # both orientations occur
    assert torch.equal(d.test[0][0], d.test[0][0])
    with pytest.raises(DataError, match="unknown augment"):
        load_data(f"folder:{flat_tree}", img_size=8, augment="mixup")


def test_max_per_split_caps_proportionally(flat_tree: Path):
    d = load_data(f"folder:{flat_tree}", img_size=8, max_per_split=6)
    assert len(d.train) == 6 and Counter(d.labels("train")) == {0: 2, 1: 1, 2: 3}
    assert len(d.test) == 6 and len(d.val) == 6
    assert d.manifest()["max_per_split"] == 6


def test_normalisation_and_dataloader_batches(flat_tree: Path):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    d = load_data(f"folder:{flat_tree}", img_size=12, mean=mean, std=std)
    x, y = next(iter(torch.utils.data.DataLoader(d.test, batch_size=4)))
    assert x.shape == (4, 3, 12, 12) and x.dtype == torch.float32 and y.dtype == torch.int64
    raw = torch.stack([d.test.uint8(i) for i in range(4)]).float() / 255
    want = (raw - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(x, want, atol=1e-5)
    assert y.tolist() == d.labels("test")[:4]
    # the batched path (__getitems__) and the per-item path agree, for RGB and grey data
    assert torch.equal(x[2], d.test[2][0])
    lazy = load_data(f"folder:{flat_tree}", img_size=12, mean=mean, std=std, cache_mb=0)
    xl, _ = next(iter(torch.utils.data.DataLoader(lazy.test, batch_size=4)))
    assert torch.allclose(xl, x)


def test_folder_wrong_path_and_empty_class_are_errors(tmp_path: Path):
    with pytest.raises(DataError, match="is not a directory"):
        load_data(f"folder:{tmp_path / 'nope'}", img_size=8)
    make_class_tree(tmp_path / "ds", {"a": 3})
    (tmp_path / "ds" / "empty").mkdir()
    (tmp_path / "ds" / "empty" / "notes.txt").write_text("no images")
    with pytest.raises(DataError, match=r"class folder .*empty contains no image files"):
        load_data(f"folder:{tmp_path / 'ds'}", img_size=8)
    (tmp_path / "flat").mkdir()
    write_image(tmp_path / "flat" / "loose.jpg")
    with pytest.raises(DataError, match="no class sub-folders"):
        load_data(f"folder:{tmp_path / 'flat'}", img_size=8)


def test_corrupt_images_are_skipped_counted_and_warned(tmp_path: Path, caplog):
    for split in ("train", "val", "test"):
        make_class_tree(tmp_path / split, {"a": 6, "b": 6})
    (tmp_path / "train" / "a" / "img000.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    good = (tmp_path / "test" / "b" / "img001.jpg").read_bytes()
    (tmp_path / "test" / "b" / "img001.jpg").write_bytes(good[: len(good) // 2])  # truncated
    with caplog.at_level(logging.WARNING, logger="vistune.data"):
        d = load_data(f"folder:{tmp_path}", img_size=8)
    bad = {str(tmp_path / "train" / "a" / "img000.jpg"), str(tmp_path / "test" / "b" / "img001.jpg")}
    assert {f for f, _ in d.skipped} == bad and len(d.skipped) == 2
    assert all(reason for _, reason in d.skipped)
    warned = [r for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert len(warned) == 2
    assert (len(d.train), len(d.test)) == (11, 11)
    assert d.manifest()["skipped"] == [[f, r] for f, r in d.skipped]
    for ds in (d.train, d.val, d.test):  # a full pass never raises
        for i in range(len(ds)):
            ds[i]
    # few-shot replaces an unreadable pick with the next in the seeded order: K stays exact
    for seed in range(4):
        fs = load_data(f"folder:{tmp_path}", img_size=8, shots=6 - 1, seed=seed)
        assert Counter(fs.labels("train")) == {0: 5, 1: 5}
    with pytest.raises(DataError, match="class 'a' .* only 5 readable"):
        load_data(f"folder:{tmp_path}", img_size=8, shots=6)


def test_split_with_only_unreadable_files_is_an_error(tmp_path: Path):
    make_class_tree(tmp_path / "train", {"a": 3, "b": 3})
    make_class_tree(tmp_path / "val", {"a": 1, "b": 1})
    for c in "ab":
        (tmp_path / "test" / c).mkdir(parents=True)
        (tmp_path / "test" / c / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match="test split .* no readable images"):
        load_data(f"folder:{tmp_path}", img_size=8)


def test_carving_an_empty_split_is_an_error(tmp_path: Path):
    make_class_tree(tmp_path, {"a": 2, "b": 2})  # 10% / 20% of 2 round to 0
    with pytest.raises(DataError, match="val split .* is empty .* too small to carve"):
        load_data(f"folder:{tmp_path}", img_size=8)


# ----------------------------------------------------------------- VTAB


def make_vtab(task_dir: Path, labels: dict[str, list[int]]) -> None:
    """Lists + images; split file stem -> labels; image colour = COLOURS[label]."""
    for split, labs in labels.items():
        lines = []
        for i, lab in enumerate(labs):
            rel = f"images/{split}/{i:06d}.jpg"
            write_image(task_dir / rel, COLOURS[lab])
            lines.append(f"{rel} {lab}")
        (task_dir / f"{split}.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def vtab_task(tmp_path: Path) -> Path:
    task = tmp_path / "vtab-1k" / "dtd"
    make_vtab(task, {"train800": [0, 1, 2, 0, 1, 2], "val200": [2, 1], "train800val200": [0, 1, 2, 0, 1, 2, 2, 1],
                     "test": [0, 1, 2]})  # fmt: skip
    return task


def test_vtab_protocol_splits_and_table_class_count(vtab_task: Path):
    d = load_data(f"vtab:{vtab_task}", img_size=8, **IDENTITY)
    assert d.num_classes == VTAB_NUM_CLASSES["dtd"] == 47 and len(d.class_names) == 47
    assert split_ids(d, "train") == [f"images/train800/{i:06d}.jpg" for i in range(6)]
    assert d.labels("train") == [0, 1, 2, 0, 1, 2]
    assert d.labels("val") == [2, 1] and d.labels("test") == [0, 1, 2]
    assert_items_match_colour(d.val, COLOURS)


def test_vtab_trainval_uses_train800val200_and_no_val(vtab_task: Path):
    d = load_data(f"vtab:{vtab_task}", img_size=8, trainval=True)
    assert d.val is None
    assert len(d.train) == 8 and all("train800val200" in i for i in split_ids(d, "train"))
    assert d.labels("test") == [0, 1, 2]


def test_vtab_unknown_task_counts_max_label_plus_one(tmp_path: Path):
    task = tmp_path / "mytask"
    make_vtab(task, {"train800": [0, 3], "val200": [1], "test": [2]})
    d = load_data(f"vtab:{task}", img_size=8)
    assert d.num_classes == 4 and d.class_names == ["0", "1", "2", "3"]


def test_vtab_bad_inputs(vtab_task: Path, tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        load_data(f"vtab:{tmp_path / 'missing_task'}", img_size=8)
    (vtab_task / "val200.txt").write_text("images/val200/000000.jpg 2\nimages/val200/000001.jpg one\n")
    with pytest.raises(DataError, match=r"val200\.txt:2: label 'one' is not an integer"):
        load_data(f"vtab:{vtab_task}", img_size=8)
    (vtab_task / "val200.txt").write_text("images/val200/000000.jpg\n")
    with pytest.raises(DataError, match=r"val200\.txt:1: expected '<image path> <label>'"):
        load_data(f"vtab:{vtab_task}", img_size=8)
    (vtab_task / "val200.txt").write_text("images/val200/000000.jpg 47\n")
    with pytest.raises(DataError, match="label 47 .* >= 47"):
        load_data(f"vtab:{vtab_task}", img_size=8)
    (vtab_task / "val200.txt").unlink()
    with pytest.raises(DataError, match=r"val200\.txt does not exist"):
        load_data(f"vtab:{vtab_task}", img_size=8)


# ----------------------------------------------------------------- FGVC


def make_fgvc(base: Path, image_dir: str, splits: dict[str, dict[str, int]], colour_of) -> None:
    for split, mapping in splits.items():
        for rel, cid in mapping.items():
            write_image(base / image_dir / rel, colour_of[cid])
        (base / f"{split}.json").write_text(json.dumps(mapping))


def test_fgvc_remaps_labels_over_all_splits_and_finds_image_root(tmp_path: Path):
    colour_of = {5: COLOURS[0], 9: COLOURS[1], 12: COLOURS[2]}
    splits = {
        "train": {"005.Auk/a1.jpg": 5, "005.Auk/a2.jpg": 5, "009.Bee/b1.jpg": 9},
        "val": {"009.Bee/b2.jpg": 9},
        "test": {"005.Auk/a3.jpg": 5, "012.Cat/c1.jpg": 12},  # class 12 only in test
    }
    for image_dir in ("images", "Images", ""):
        base = tmp_path / (image_dir or "flat")
        make_fgvc(base, image_dir, splits, colour_of)
        d = load_data(f"fgvc:{base}", img_size=8, **IDENTITY)
        assert d.num_classes == 3
        assert d.class_names == ["005.Auk", "009.Bee", "012.Cat"]
        assert d.labels("train") == [0, 0, 1] and d.labels("val") == [1] and d.labels("test") == [0, 2]
        assert_items_match_colour(d.test, {0: COLOURS[0], 1: COLOURS[1], 2: COLOURS[2]})
        assert Path(d.manifest()["root"]) == (base / image_dir).resolve()


def test_fgvc_class_names_fall_back_to_original_ids(tmp_path: Path):
    splits = {"train": {"x/1.jpg": 3, "y/2.jpg": 7, "y/3.jpg": 3}, "val": {"x/4.jpg": 7}, "test": {"x/5.jpg": 3}}
    make_fgvc(tmp_path, "", splits, {3: COLOURS[0], 7: COLOURS[1]})
    d = load_data(f"fgvc:{tmp_path}", img_size=8)
    assert d.class_names == ["3", "7"] and d.labels("train") == [0, 1, 0]


def test_fgvc_bad_inputs(tmp_path: Path):
    splits = {"train": {"a/1.jpg": 0, "b/2.jpg": 1}, "val": {"a/3.jpg": 0}, "test": {"b/4.jpg": 1}}
    make_fgvc(tmp_path, "images", splits, {0: COLOURS[0], 1: COLOURS[1]})
    (tmp_path / "images").rename(tmp_path / "pics")
    with pytest.raises(DataError, match="none of the first 2 train.json paths"):
        load_data(f"fgvc:{tmp_path}", img_size=8)
    (tmp_path / "pics").rename(tmp_path / "images")
    (tmp_path / "val.json").write_text(json.dumps({"a/3.jpg": "zero"}))
    with pytest.raises(DataError, match=r"val\.json: entry 'a/3.jpg': label 'zero'"):
        load_data(f"fgvc:{tmp_path}", img_size=8)
    (tmp_path / "val.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="one JSON object"):
        load_data(f"fgvc:{tmp_path}", img_size=8)
    (tmp_path / "val.json").unlink()
    with pytest.raises(DataError, match=r"val\.json does not exist"):
        load_data(f"fgvc:{tmp_path}", img_size=8)


# ----------------------------------------------------------------- npz


def test_npz_grey_and_rgb_with_both_label_shapes(tmp_path: Path):
    rng = np.random.default_rng(0)
    grey_labels = np.array([0, 1, 2, 1, 0, 2, 0, 1, 2, 0] * 3)
    grey = (grey_labels * 100)[:, None, None] * np.ones((1, 9, 7), dtype=np.int64)
    path = tmp_path / "g.npz"
    np.savez(path, train_images=grey.astype(np.uint8), train_labels=grey_labels[:, None],
             val_images=grey[:6].astype(np.uint8), val_labels=grey_labels[:6, None],
             test_images=grey[:9].astype(np.uint8), test_labels=grey_labels[:9, None])  # fmt: skip
    d = load_data(f"npz:{path}", img_size=16, **IDENTITY)
    assert (len(d.train), len(d.val), len(d.test)) == (30, 6, 9) and d.num_classes == 3
    assert split_ids(d, "val") == [f"val:{i}" for i in range(6)]
    xb, yb = next(iter(torch.utils.data.DataLoader(d.train, batch_size=30)))
    assert xb.shape == (30, 3, 16, 16) and torch.equal(xb[5], d.train[5][0])
    for i in range(len(d.train)):
        x, y = d.train[i]
        assert x.shape == (3, 16, 16) and int(yb[i]) == y
        assert torch.allclose(x * 255, torch.full_like(x, 100.0 * y), atol=0.5)  # constant image stays constant

    rgb = rng.integers(0, 256, (12, 5, 5, 3), dtype=np.uint8)
    path2 = tmp_path / "c.npz"
    np.savez(path2, train_images=rgb, train_labels=np.arange(12) % 2)  # no val/test: carved
    d2 = load_data(f"npz:{path2}", img_size=5, **IDENTITY)
    assert len(d2.train) + len(d2.val) + len(d2.test) == 12 and len(d2.test) >= 2
    i = split_ids(d2, "test")[0]
    row = int(i.split(":")[1])
    assert np.allclose(d2.test[0][0].numpy() * 255, rgb[row].transpose(2, 0, 1), atol=0.5)  # same size: exact


def test_npz_bad_inputs(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        load_data(f"npz:{tmp_path / 'none.npz'}", img_size=8)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read"):
        load_data(f"npz:{tmp_path / 'junk.npz'}", img_size=8)
    p = tmp_path / "multi.npz"
    np.savez(p, train_images=np.zeros((4, 3, 3), np.uint8), train_labels=np.zeros((4, 2), np.int64))
    with pytest.raises(DataError, match="single-label"):
        load_data(f"npz:{p}", img_size=8)
    p = tmp_path / "len.npz"
    np.savez(p, train_images=np.zeros((4, 3, 3), np.uint8), train_labels=np.zeros(3, np.int64))
    with pytest.raises(DataError, match="4 train_images but 3 train_labels"):
        load_data(f"npz:{p}", img_size=8)


@pytest.mark.skipif(not PNEUMONIA.is_file(), reason=f"real data set not present at {PNEUMONIA}")
def test_npz_real_pneumoniamnist():
    d = load_data(f"npz:{PNEUMONIA}", img_size=28)
    assert (len(d.train), len(d.val), len(d.test)) == (2428, 270, 468)
    assert d.num_classes == 2
    assert set(Counter(d.labels("test")).values()) == {234}  # the class-balanced subset
    x, _ = d.train[0]
    assert x.shape == (3, 28, 28)
    raw = d.train.uint8(0)
    assert raw.shape == (1, 28, 28)  # grey kept 1-channel in memory...
    assert torch.allclose(x[0] * 0.229 + 0.485, x[1] * 0.224 + 0.456, atol=1e-5)  # ...and replicated on access


# ----------------------------------------------------------------- Fashion-MNIST


@pytest.fixture
def fake_fmnist(tmp_path: Path, monkeypatch) -> Path:
    rng = np.random.default_rng(1)
    for prefix, n in (("train", 200), ("t10k", 40)):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        images = np.repeat((labels * 25)[:, None, None], 28, 1).repeat(28, 2)  # pixel value = 25 * label
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    monkeypatch.setenv(FASHION_MNIST_ENV_VAR, str(tmp_path))
    return tmp_path


def test_fashion_mnist_idx_fixture_and_val_carve(fake_fmnist: Path):
    d = load_data("fashion-mnist", img_size=14, **IDENTITY)
    assert d.class_names[0] == "T-shirt/top" and d.num_classes == 10
    assert (len(d.train), len(d.val), len(d.test)) == (180, 20, 40)
    assert Counter(d.labels("val")) == {c: 2 for c in range(10)}
    assert all(i.startswith("train:") for i in split_ids(d, "val"))
    assert all(i.startswith("test:") for i in split_ids(d, "test"))
    for ds in (d.train, d.test):
        for i in range(0, len(ds), 7):
            x, y = ds[i]
            assert torch.allclose(x * 255, torch.full_like(x, 25.0 * y), atol=0.5)
    lazy = load_data("fashion-mnist", img_size=14, cache_mb=0, **IDENTITY)
    assert not lazy.train.cached and torch.equal(lazy.train[3][0], d.train[3][0])
    assert load_data(f"fashion-mnist:{fake_fmnist}", img_size=8).manifest()["splits"]["val"] == d.manifest()["splits"]["val"]


def test_fashion_mnist_missing_files_say_how_to_install(tmp_path: Path, monkeypatch):
    monkeypatch.setenv(FASHION_MNIST_ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(DataError) as e:
        load_data("fashion-mnist", img_size=8)
    assert "apt-get install dataset-fashion-mnist" in str(e.value)
    assert "train-images-idx3-ubyte.gz" in str(e.value)


def test_fashion_mnist_bad_idx_is_an_error(fake_fmnist: Path):
    with gzip.open(fake_fmnist / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x03" + (40).to_bytes(4, "big"))  # claims 3 dims for a label file
    with pytest.raises(DataError, match="t10k-labels.*expected unsigned-byte IDX with 1 dims"):
        load_data("fashion-mnist", img_size=8)


@pytest.mark.skipif(
    not (FMNIST_SYSTEM_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_real_files(monkeypatch):
    monkeypatch.delenv(FASHION_MNIST_ENV_VAR, raising=False)
    d = load_data("fashion-mnist", img_size=8, max_per_split=1000)
    assert d.manifest()["root"] == str(FMNIST_SYSTEM_DIR.resolve())
    assert (len(d.train), len(d.val), len(d.test)) == (1000, 1000, 1000)
    assert Counter(d.labels("test")) == {c: 100 for c in range(10)}  # official test is balanced


# ----------------------------------------------------------------- manifest / API


def test_manifest_is_json_and_consistent(flat_tree: Path):
    d = load_data(f"folder:{flat_tree}", img_size=8, shots=2, seed=1, trainval=True)
    m = json.loads(json.dumps(d.manifest()))
    assert m["spec"] == f"folder:{flat_tree}" and m["img_size"] == 8 and m["trainval"] is True
    assert m["splits"]["val"] is None
    for s in ("train", "test"):
        ds = getattr(d, s)
        assert m["splits"][s]["size"] == len(ds)
        assert m["splits"][s]["ids"] == ds.ids and m["splits"][s]["labels"] == d.labels(s)
    assert m["class_names"] == d.class_names and m["num_classes"] == 3
    with pytest.raises(DataError, match="unknown split"):
        d.labels("holdout")


def test_option_validation(flat_tree: Path):
    for kw, msg in (({"img_size": 0}, "img_size"), ({"shots": -1}, "shots"), ({"seed": -2}, "seed"),
                    ({"std": (0.1, 0.0, 0.1)}, "std"), ({"mean": (0.5,)}, "mean")):  # fmt: skip
        kw = {"img_size": 8, **kw}
        with pytest.raises(DataError, match=msg):
            load_data(f"folder:{flat_tree}", **kw)
