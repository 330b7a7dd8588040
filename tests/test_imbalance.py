"""Long-tailed (class-imbalanced) training: ``--imbalance R`` and the per-class / balanced /
many-medium-few metrics.

The counts are checked against numbers published for CIFAR-10-LT / CIFAR-100-LT (Cao et al. 2019),
not against a second copy of the formula; the data tests use a tiny in-memory npz so they run in
well under a second each.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_engine import make_folder
from vistune.cli import main
from vistune.config import ConfigError, make_config
from vistune.data import DataError, load_data, longtail_counts
from vistune.tasks.classify import balanced_top1, classification_metrics, group_top1

pytestmark = pytest.mark.usefixtures("one_thread")


def make_npz(path: Path, train_counts: list[int], val: int = 3, test: int = 4) -> Path:
    """Grey 4x4 images whose pixel value encodes (label, index), so ids can be told apart."""
    arrays = {}
    for split, counts in (("train", train_counts), ("val", [val] * len(train_counts)),
                          ("test", [test] * len(train_counts))):
        labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
        arrays[f"{split}_images"] = (labels[:, None, None] * 20 + np.arange(len(labels))[:, None, None] % 7
                                     ).astype(np.uint8) * np.ones((1, 4, 4), dtype=np.uint8)
        arrays[f"{split}_labels"] = labels
    np.savez(path, **arrays)
    return path


def train_counts(d) -> list[int]:
    counts = Counter(d.train.targets)
    return [counts.get(c, 0) for c in range(d.num_classes)]


# ----------------------------------------------------------------- the counts


def test_longtail_counts_are_the_published_cifar_lt_numbers():
    """CIFAR-10-LT / CIFAR-100-LT as released with LDAM (truncation, not rounding: 2997 not 2998)."""
    assert longtail_counts(5000, 100, 10) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(longtail_counts(5000, 100, 10)) == 12406
    assert sum(longtail_counts(5000, 50, 10)) == 13996
    assert sum(longtail_counts(5000, 10, 10)) == 20431
    assert sum(longtail_counts(500, 100, 100)) == 10847
    assert longtail_counts(40, 1, 5) == [40] * 5


def test_train_split_is_long_tailed_exactly_and_val_test_are_untouched(tmp_path):
    path = make_npz(tmp_path / "d.npz", [40, 40, 40, 40, 40])
    plain = load_data(f"npz:{path}", img_size=4)
    lt = load_data(f"npz:{path}", img_size=4, imbalance=10, seed=3)
    rec = lt.manifest()["imbalance"]
    order = rec["head_to_tail"]
    assert sorted(order) == list(range(5)) and rec["n_max"] == 40
    want = {lab: int(40 * (0.1 ** (i / 4))) for i, lab in enumerate(order)}  # 40, 22, 12, 7, 4
    assert sorted(want.values()) == [4, 7, 12, 22, 40]
    assert train_counts(lt) == [want[c] for c in range(5)] == rec["counts"]
    assert lt.manifest()["splits"]["train"]["class_counts"] == rec["counts"]
    assert set(lt.train.ids) <= set(plain.train.ids)
    for split in ("val", "test"):
        assert lt.manifest()["splits"][split] == plain.manifest()["splits"][split]


def test_class_order_is_a_seeded_permutation(tmp_path):
    path = make_npz(tmp_path / "d.npz", [30] * 6)
    a = load_data(f"npz:{path}", img_size=4, imbalance=5, seed=0)
    again = load_data(f"npz:{path}", img_size=4, imbalance=5, seed=0)
    b = load_data(f"npz:{path}", img_size=4, imbalance=5, seed=1)
    assert train_counts(a) == train_counts(again) and a.train.ids == again.train.ids
    assert train_counts(a) != train_counts(b)  # another seed: another head-to-tail order
    assert sorted(train_counts(a)) == sorted(train_counts(b))  # ... of the same counts


def test_imbalance_one_is_no_imbalance_even_on_an_unbalanced_pool(tmp_path):
    """R = 1 keeps the data as it is (the formula alone would cut every class to the smallest)."""
    path = make_npz(tmp_path / "d.npz", [30, 12, 20])
    assert load_data(f"npz:{path}", img_size=4, imbalance=1).manifest() == \
        load_data(f"npz:{path}", img_size=4).manifest()


def test_n_max_is_the_smallest_class_and_larger_r_keeps_a_subset(tmp_path):
    path = make_npz(tmp_path / "d.npz", [30, 12, 20])
    r2 = load_data(f"npz:{path}", img_size=4, imbalance=2)
    r4 = load_data(f"npz:{path}", img_size=4, imbalance=4)
    assert r2.manifest()["imbalance"]["n_max"] == 12 and max(train_counts(r2)) == 12
    assert sorted(train_counts(r4)) == sorted(longtail_counts(12, 4, 3)) == [3, 6, 12]
    assert set(r4.train.ids) <= set(r2.train.ids)


def test_composition_with_shots_subset_cap_and_trainval(tmp_path):
    path = make_npz(tmp_path / "d.npz", [30, 30, 30])
    # shots then imbalance: n_max = K, a subset of the K-shot set of the same seed
    shots = load_data(f"npz:{path}", img_size=4, shots=8, seed=2)
    lt = load_data(f"npz:{path}", img_size=4, shots=8, seed=2, imbalance=4)
    assert sorted(train_counts(lt)) == [2, 4, 8] and set(lt.train.ids) <= set(shots.train.ids)
    with pytest.raises(DataError, match="0 training images"):
        load_data(f"npz:{path}", img_size=4, shots=2, imbalance=4)  # int(2 / 4) = 0: refused
    # subset carves train/val first; the long tail is cut from the subset's train part
    sub = load_data(f"npz:{path}", img_size=4, subset=(45, 9))
    sub_lt = load_data(f"npz:{path}", img_size=4, subset=(45, 9), imbalance=3)
    assert sub_lt.manifest()["splits"]["val"] == sub.manifest()["splits"]["val"]
    assert set(sub_lt.train.ids) <= set(sub.train.ids)
    assert sub_lt.manifest()["imbalance"]["n_max"] == min(train_counts(sub))
    # the cap sets the pool, then the tail is cut: n_max is the capped smallest class
    cap = load_data(f"npz:{path}", img_size=4, max_per_split=30, imbalance=2)
    assert cap.manifest()["imbalance"]["n_max"] == 10 and sorted(train_counts(cap)) == [5, 7, 10]
    # trainval: the merged train+val pool is what trains, so it is the one made long-tailed
    tv = load_data(f"npz:{path}", img_size=4, trainval=True, imbalance=3)
    assert tv.val is None and tv.manifest()["imbalance"]["n_max"] == 33


def test_bad_imbalance_values_are_refused():
    with pytest.raises(DataError, match="imbalance must be"):
        load_data("npz:/nonexistent.npz", img_size=4, imbalance=0.5)
    for bad in (0.5, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="imbalance"):
            make_config(backbone="b", data="d", imbalance=bad)
    with pytest.raises(ConfigError, match="classification"):
        make_config(backbone="b", data="d", imbalance=2, task="segment")
    assert make_config(backbone="b", data="d", group_thresholds="50,10").group_thresholds == (50, 10)
    for bad in ("20,100", "100", "-1,-2"):
        with pytest.raises(ConfigError, match="group_thresholds"):
            make_config(backbone="b", data="d", group_thresholds=bad)


# ----------------------------------------------------------------- the metrics


def test_balanced_top1_on_a_hand_made_confusion_reduced_over_two_ranks():
    """Class 0: 90/100 right, class 1: 1/10, class 2 absent. Balanced = (90 + 10) / 2 = 50 while
    top-1 = 91/110. The counts are split over two 'ranks' unevenly: the per-class sums must be
    reduced first (averaging each rank's balanced accuracy would give (47.4 + 10) / 2)."""
    rank0 = (torch.tensor([90, 0, 0]), torch.tensor([95, 5, 0]), 10.0)
    rank1 = (torch.tensor([0, 1, 0]), torch.tensor([5, 5, 0]), 1.0)
    m = classification_metrics([rank0, rank1])
    assert m["per_class_top1"] == [90.0, 10.0, None]
    assert m["balanced_top1"] == pytest.approx(50.0)
    assert m["top1"] == pytest.approx(100 * 91 / 110)
    assert balanced_top1([None, None]) is None


def test_group_top1_uses_training_counts_and_configurable_thresholds():
    per_class = [80.0, 60.0, 40.0, None, 20.0]
    counts = [150, 100, 20, 5, 19]
    # Liu et al.: many > 100, few < 20, medium 20..100 (both bounds medium)
    assert group_top1(per_class, counts, (100, 20)) == {"many": 80.0, "medium": 50.0, "few": 20.0}
    assert group_top1(per_class, counts, (50, 10)) == {"many": 70.0, "medium": 30.0, "few": None}


def test_tiny_imbalanced_run_writes_balanced_and_group_metrics(tmp_path, capsys):
    data = make_folder(tmp_path / "data", classes=3, per_class=8)
    out = tmp_path / "run"
    assert main(["train", "--backbone", "test_vit", "--img-size", "32", "--method", "linear", "--data",
                 f"folder:{data}", "--epochs", "1", "--batch-size", "8", "--imbalance", "4",
                 "--group-thresholds", "6,3", "--out", str(out), "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    counts = m["train_class_counts"]
    assert sorted(counts) == [2, 4, 8] and m["num_train"] == 14 and m["imbalance"] == 4.0
    per_class = m["test_per_class_top1"]
    assert m["test_balanced_top1"] == pytest.approx(sum(per_class) / 3)
    assert "val_balanced_top1" in m and len(m["val_per_class_top1"]) == 3
    by_count = dict(zip(counts, per_class))
    assert (m["test_many_top1"], m["test_medium_top1"], m["test_few_top1"]) == (by_count[8], by_count[4], by_count[2])
    assert m["group_thresholds"] == [6, 3]
    splits = json.loads((out / "splits.json").read_text())
    assert splits["imbalance"]["counts"] == counts == splits["splits"]["train"]["class_counts"]
    capsys.readouterr()
    # eval takes the run's training counts from the tuned file, so it reproduces the groups
    assert main(["eval", "--tuned", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    for key in ("test_balanced_top1", "test_many_top1", "test_medium_top1", "test_few_top1"):
        assert res[key] == pytest.approx(m[key]), key


def test_bad_imbalance_on_the_command_line_writes_nothing(tmp_path, capsys):
    data = make_folder(tmp_path / "data", classes=3, per_class=2)
    for value in ("0.5", "abc", "-1"):
        out = tmp_path / f"o{value}"
        with pytest.raises(SystemExit) as stop:
            main(["train", "--backbone", "test_vit", "--img-size", "32", "--method", "linear", "--data",
                  f"folder:{data}", "--imbalance", value, "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(err) == 1 and "--imbalance" in err[0], err
        assert not out.exists()


def test_fewshot_passes_imbalance_to_each_run_and_refuses_an_empty_tail(tmp_path, capsys):
    data = make_folder(tmp_path / "data", classes=3, per_class=8)
    base = ["fewshot", "--backbone", "test_vit", "--img-size", "32", "--method", "linear", "--data",
            f"folder:{data}", "--epochs", "1", "--batch-size", "8", "--seeds", "1", "--no-progress"]
    out = tmp_path / "fs"
    assert main([*base, "--shots", "4", "--imbalance", "2", "--out", str(out)]) == 0
    m = json.loads((out / "linear" / "4shot" / "seed0" / "metrics.json").read_text())
    assert sorted(m["train_class_counts"]) == [2, 2, 4] and m["imbalance"] == 2.0  # int(4 * 0.5**(i/2))
    capsys.readouterr()
    bad = tmp_path / "fs_bad"
    assert main([*base, "--shots", "4,1", "--imbalance", "2", "--out", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--shots 1" in err[0] and not bad.exists(), err


def test_sweep_trials_get_the_imbalance_and_a_study_refuses_another(tmp_path, capsys):
    pytest.importorskip("optuna", reason="optuna (the sweep's search library) is not installed")
    data = make_folder(tmp_path / "data", classes=3, per_class=8)
    out = tmp_path / "sw"

    def argv(r: str) -> list[str]:
        return ["sweep", "--backbone", "test_vit", "--img-size", "32", "--method", "linear", "--data",
                f"folder:{data}", "--epochs", "1", "--batch-size", "8", "--out", str(out), "--no-progress",
                "--pruner", "none", "--grid", "lr=0.05", "--grid", "wd=0", "--stage", "search", "--imbalance", r]

    assert main(argv("4")) == 0
    (trial,) = [p for p in (out / "trials").iterdir() if (p / "metrics.json").is_file()]
    m = json.loads((trial / "metrics.json").read_text())
    assert m["imbalance"] == 4.0 and sorted(m["train_class_counts"]) == [2, 4, 8]
    capsys.readouterr()
    assert main(argv("2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "imbalance: 4.0 there, 2.0 now" in err[0], err
