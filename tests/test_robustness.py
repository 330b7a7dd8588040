"""``vistune robustness``: corruptions, attacks, OOD sets, resumable cells and the report.

One tiny run (a linear probe of the test ViT on generated images whose class is their dominant
colour, as tests/test_engine.py's ``make_folder`` draws them) is trained once per module and
stressed by every test that needs a real model.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_engine import make_folder
from vistune.cli import main

if importlib.util.find_spec("imagecorruptions") is None or importlib.util.find_spec("art") is None:
    pytest.skip("the robustness extra is not installed (pip install 'vistune[robustness]')", allow_module_level=True)

from vistune.robustness import corruptions as C
from vistune.robustness.attacks import PixelModel, parse_eps
from vistune.robustness.ood import check_map_sources, read_class_map, select_ood
from vistune.workflows import robustness as W

pytestmark = pytest.mark.usefixtures("one_thread")


def make_images(root: Path, classes=("class0", "class1", "class2"), train=8, test=10, size=32, seed=0) -> Path:
    """Class = dominant colour channel (learnable by a linear probe), noise elsewhere."""
    return make_folder(root, classes=classes, per_class=train, size=size, seed=seed, test=test)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rob")
    data = make_images(root / "data")
    out = root / "run"
    assert main(["train", "--backbone", "test_vit", "--img-size", "32", "--method", "linear", "--data",
                 f"folder:{data}", "--epochs", "4", "--batch-size", "8", "--lr", "0.1", "--optimizer", "sgd",
                 "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "metrics.json").read_text())["test_top1"] == 100.0  # the class is learnable
    return out


def robustness(run: Path, out: Path, *extra: str) -> dict:
    assert main(["robustness", "--tuned", str(run), "--out", str(out), "--workers", "0", "--no-progress",
                 *extra]) == 0
    return json.loads((out / "robustness.json").read_text())


# ------------------------------------------------------------------------------------- corruptions


def _image(size=32, seed=3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (3, size, size), dtype=np.uint8)


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_corruption_changes_the_image_and_reruns_identically(name):
    img = _image()
    a = C.corrupt(img, name, 3, seed=11)
    assert a.dtype == np.uint8 and a.shape == img.shape
    assert not np.array_equal(a, img)
    assert np.array_equal(a, C.corrupt(img, name, 3, seed=11)), "same seed must give identical bytes"


def test_random_corruptions_depend_on_the_seed_and_leave_numpys_state_alone():
    img = _image()
    state = np.random.get_state()[1].copy()
    for name in ("gaussian_noise", "impulse_noise", "glass_blur", "fog", "frost", "spatter"):
        assert not np.array_equal(C.corrupt(img, name, 3, seed=1), C.corrupt(img, name, 3, seed=2)), name
    assert np.array_equal(np.random.get_state()[1], state)


def test_compat_layer_reproduces_the_reference_and_patches_nothing_global():
    """gaussian_blur is the reference formula with scikit-image's current keyword; the repairs stay
    inside imagecorruptions' module (NumPy has no float_ again; no pkg_resources left behind)."""
    from skimage.filters import gaussian

    img = _image()
    for sev, sigma in zip(C.SEVERITIES, (1, 2, 3, 4, 6)):
        want = np.uint8(np.clip(gaussian(img.transpose(1, 2, 0) / 255.0, sigma=sigma, channel_axis=-1), 0, 1) * 255)
        assert np.array_equal(C.corrupt(img, "gaussian_blur", sev, 0), want.transpose(2, 0, 1))
    assert not hasattr(np, "float_")
    assert "pkg_resources" not in sys.modules or hasattr(sys.modules["pkg_resources"], "working_set")


#: Mean |corrupted - clean| (grey levels) at severity 3 on ``_image()`` with seed 0, measured with
#: imagecorruptions 1.1.2 (through the layer), scikit-image 0.26, OpenCV 5.1, NumPy 2.4. A change
#: in the layer or in a library's behaviour moves these numbers.
PINNED = {
    "gaussian_noise": 31.38, "shot_noise": 34.73, "impulse_noise": 11.61, "defocus_blur": 63.28,
    "glass_blur": 62.39, "motion_blur": 59.43, "zoom_blur": 49.98, "snow": 76.58, "frost": 37.43,
    "fog": 51.24, "brightness": 31.7, "contrast": 51.02, "elastic_transform": 71.7, "pixelate": 57.65,
    "jpeg_compression": 59.38, "speckle_noise": 29.25, "gaussian_blur": 62.55, "spatter": 5.09, "saturate": 24.22,
}


def test_outputs_are_pinned():
    img = _image()
    got = {n: round(float(np.abs(C.corrupt(img, n, 3, 0).astype(int) - img).mean()), 2) for n in C.CORRUPTIONS}
    off = {n: (got[n], PINNED[n]) for n in C.CORRUPTIONS if abs(got[n] - PINNED[n]) > 0.05}
    assert not off, f"corruption outputs moved (got, pinned): {off}"


def test_dataloader_workers_give_the_same_bytes(run):
    """Seeds come from image ids, so workers/batching never change a corrupted image."""
    loaded = W.load_run(str(run), None, torch.device("cpu"), None, "fp32")
    images = W.Images(loaded.test, range(len(loaded.test)), corruption=("glass_blur", 2), seed=5)
    serial = torch.cat([x for x, _ in torch.utils.data.DataLoader(images, batch_size=7)])
    parallel = torch.cat([x for x, _ in torch.utils.data.DataLoader(images, batch_size=4, num_workers=2)])
    assert torch.equal(serial, parallel)
    clean = torch.stack([loaded.test.uint8(i) for i in range(len(loaded.test))])
    assert not torch.equal(serial, clean)


SEVERE = "gaussian_noise,shot_noise,defocus_blur,contrast,fog,pixelate,saturate"


def test_severity_5_hurts_more_than_severity_1(run, tmp_path):
    rep = robustness(run, tmp_path / "r", "--corruptions", SEVERE, "--severities", "1,5")
    acc = rep["corruptions"]["accuracy"]
    s1 = np.mean([acc[n]["1"]["top1"] for n in acc])
    s5 = np.mean([acc[n]["5"]["top1"] for n in acc])
    assert s5 < s1, (s1, s5)
    cells = [c["top1"] for n in acc for c in acc[n].values()]
    assert rep["summary"]["mca"] == pytest.approx(np.mean(cells))
    assert (tmp_path / "r" / "corruptions.png").stat().st_size > 1000


def test_baseline_gives_corruption_errors(run, tmp_path):
    """The run against itself: CE = 1 wherever the baseline errs, relative mCE = 1."""
    rep = robustness(run, tmp_path / "r", "--corruptions", SEVERE, "--severities", "5", "--baseline", str(run))
    summ = rep["corruptions"]["summary"]
    assert any(v is not None for v in summ["ce"].values())
    assert all(v == pytest.approx(1.0) for v in summ["ce"].values() if v is not None)
    assert summ["relative_mce"] == pytest.approx(1.0)
    assert rep["summary"]["relative_mce"] == pytest.approx(1.0)


def test_corruption_error_formula():
    part = {"accuracy": {"fog": {"1": {"top1": 90.0}, "5": {"top1": 50.0}}}}
    base = {"accuracy": {"fog": {"1": {"top1": 80.0}, "5": {"top1": 20.0}}}}
    summ = __import__("vistune.robustness.report", fromlist=["x"]).corruption_summary(part, base)
    assert summ["ce"]["fog"] == pytest.approx((10 + 50) / (20 + 80))
    assert summ["mca"] == 70.0 and summ["baseline_mca"] == 50.0


# ----------------------------------------------------------------------------------------- attacks


def test_pixel_model_normalises_inside(run):
    loaded = W.load_run(str(run), None, torch.device("cpu"), None, "fp32")
    x = torch.stack([loaded.test.uint8(i) for i in range(4)])
    wrapped = PixelModel(loaded.model, loaded.mean, loaded.std)
    with torch.no_grad():
        assert torch.allclose(wrapped(x.float() / 255), loaded.model(loaded.test.normalize(x)), atol=1e-5)


def test_pgd_below_fgsm_below_clean_and_falling_with_eps(run, tmp_path):
    rep = robustness(run, tmp_path / "r", "--attack", "fgsm,pgd", "--eps", "1/255,16/255,0.25,0.5",
                     "--pgd-steps", "5")
    att = rep["attacks"]
    clean = att["clean"]["top1"]
    fgsm, pgd = att["accuracy"]["fgsm"], att["accuracy"]["pgd"]
    labels = ["1/255", "16/255", "0.25", "0.5"]
    for k in labels:
        assert pgd[k]["top1"] <= fgsm[k]["top1"] <= clean, k
        assert pgd[k]["n"] == fgsm[k]["n"] == att["clean"]["n"]
    for name in (fgsm, pgd):
        accs = [name[k]["top1"] for k in labels]
        assert accs == sorted(accs, reverse=True), accs
    assert pgd["0.5"]["top1"] < clean, "a strong attack must change some predictions"
    assert pgd["0.5"]["alpha"] == pytest.approx(2.5 * 0.5 / 5)
    assert att["precision"]["precision"] == "fp32"
    assert (tmp_path / "r" / "attacks.png").is_file()


def test_eps_parsing():
    assert parse_eps("8/255, 0.5,1") == [8 / 255, 0.5, 1.0]
    for bad in ("0", "-1/255", "1.5", "abc", "1/0"):
        with pytest.raises(C.RobustnessError):
            parse_eps(bad)


# --------------------------------------------------------------------------------------------- OOD


def test_ood_selection_keeps_mapped_and_equal_names_and_counts_the_rest():
    src = ["cat", "tabby", "zebra", "dog"]
    labels = [0, 1, 1, 2, 2, 2, 3]
    sel = select_ood(labels, src, ["cat", "dog", "ship"], {"tabby": "cat"})
    assert sel.positions == [0, 1, 2, 6]
    assert sel.labels == [0, 0, 0, 1]
    assert sel.kept_classes == {"cat": "cat", "tabby": "cat", "dog": "dog"}
    assert sel.dropped_classes == ["zebra"] and sel.dropped_images == 3
    plain = select_ood(labels, src, ["cat", "dog", "ship"], None)
    assert plain.positions == [0, 6] and plain.dropped_images == 5


def test_class_map_refuses_unknown_classes(tmp_path):
    f = tmp_path / "map.yaml"
    f.write_text("tabby: cat\nzebra: horse\n")
    with pytest.raises(C.RobustnessError, match="'horse', which is not a class of the run"):
        read_class_map(f, ["cat", "dog"])
    f.write_text("tabby: cat\ntypo: dog\n")
    with pytest.raises(C.RobustnessError, match="'typo' is in none of the --ood"):
        check_map_sources(read_class_map(f, ["cat", "dog"]), [["tabby", "zebra"]], str(f))
    f.write_text("- a\n- b\n")
    with pytest.raises(C.RobustnessError, match="expected a mapping"):
        read_class_map(f, ["cat"])


def test_ood_end_to_end(run, tmp_path):
    ood = make_images(tmp_path / "ood", classes=("class0", "zebra", "blue"), test=6, seed=9)  # colours: red, green, blue
    cmap = tmp_path / "map.yaml"
    cmap.write_text("blue: class2\n")
    rep = robustness(run, tmp_path / "r", "--ood", f"folder:{ood}", "--class-map", str(cmap))
    o = rep["ood"][0]
    assert o["n"] == 12 and o["dropped_images"] == 6 and o["dropped_classes"] == ["zebra"]
    assert o["kept_classes"] == {"class0": "class0", "blue": "class2"}
    assert o["top1"] > 90  # class0 is red as in training, "blue" is class2's colour
    assert rep["summary"]["ood_top1"] == o["top1"]


# ---------------------------------------------------------------------------- cells, selection, files


def test_selection_is_seeded_class_proportional_and_run_independent(run, tmp_path):
    labels = [0] * 10 + [1] * 20 + [2] * 30
    a = W.select_images(labels, 12)
    assert a == W.select_images(labels, 12) and len(a) == 12
    assert [sum(labels[p] == c for p in a) for c in range(3)] == [2, 4, 6]
    assert W.select_images(labels, None) == list(range(60))


def test_killed_run_resumes_without_redoing_finished_cells(run, tmp_path, monkeypatch):
    out = tmp_path / "r"
    args = ["--corruptions", "contrast,fog", "--severities", "1,2", "--max-images", "9"]
    real, calls = W.accuracy, []

    def dies_on_the_fourth(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # a kill mid-run
        return real(*a, **k)

    monkeypatch.setattr(W, "accuracy", dies_on_the_fourth)
    # Ctrl-C is one line and exit 130 (the CLI's contract), not a traceback
    assert main(["robustness", "--tuned", str(run), "--out", str(out), "--workers", "0", "--no-progress", *args]) == 130
    assert not (out / "robustness.json").exists() and len(list((out / "cells").glob("*.json"))) == 3
    calls.clear()
    first = robustness(run, out, *args)
    assert len(calls) == 2  # clean + 4 cells = 5; 3 were finished
    assert first["num_images"] == 9 and not list(out.glob("*.tmp"))
    calls.clear()
    robustness(run, out, *args)
    assert calls == []  # everything reused
    robustness(run, out, *args[:3], "1,2,3", *args[4:])
    assert len(calls) == 2  # only severity 3 of each corruption is new


def test_a_changed_setting_recomputes_the_cell(run, tmp_path):
    out = tmp_path / "r"
    robustness(run, out, "--corruptions", "fog", "--severities", "1", "--max-images", "7")
    cell = out / "cells" / "corruption-fog-1.json"
    before = json.loads(cell.read_text())
    robustness(run, out, "--corruptions", "fog", "--severities", "1", "--max-images", "7", "--seed", "3")
    after = json.loads(cell.read_text())
    assert after["stamp_sha256"] != before["stamp_sha256"]
    assert after["stamp"]["images_sha256"] == before["stamp"]["images_sha256"]  # --seed draws noise, not images


def test_robustness_json_records_settings_and_fingerprint(run, tmp_path):
    rep = robustness(run, tmp_path / "r", "--corruptions", "pixelate", "--severities", "2", "--max-images", "6")
    assert rep["format"] == "vistune.robustness/1"
    assert len(rep["run"]["tuned_sha256"]) == 64 and rep["run"]["backbone_fingerprint"]
    assert rep["settings"]["severities"] == [2] and rep["settings"]["max_images"] == 6
    assert rep["precision"]["precision"] == "fp32"
    md = (tmp_path / "r" / "robustness.md").read_text()
    assert "pixelate" in md and "mCA" in md


@pytest.mark.parametrize("bad", [
    ["--corruptions", "fogg"], ["--attack", "cw"], ["--eps", "0"], ["--eps", "2"], ["--severities", "0,6"],
    [], ["--class-map", "x.yaml"], ["--corruptions", "fog", "--device", "banana"],
])
def test_bad_input_is_one_line_and_writes_nothing(run, tmp_path, capsys, bad):
    out = tmp_path / "r"
    assert main(["robustness", "--tuned", str(run), "--out", str(out), *bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vistune robustness: error")
    assert not out.exists()


def test_unknown_names_list_the_valid_ones(run, tmp_path, capsys):
    main(["robustness", "--tuned", str(run), "--out", str(tmp_path / "r"), "--corruptions", "fog,nope"])
    assert "gaussian_noise" in capsys.readouterr().err
    main(["robustness", "--tuned", str(run), "--out", str(tmp_path / "r"), "--attack", "nope"])
    assert "fgsm, pgd" in capsys.readouterr().err


def test_report_gains_robustness_columns(run, tmp_path, capsys):
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    robustness(folder, folder / "robustness", "--corruptions", "fog", "--severities", "1", "--attack", "fgsm",
               "--eps", "8/255")
    capsys.readouterr()
    assert main(["report", str(folder), str(run)]) == 0
    table = capsys.readouterr().out
    assert "mCA" in table and "robust top-1" in table and "OOD top-1" not in table
    rows = [line for line in table.splitlines() if line.startswith("| linear")]
    assert len(rows) == 2 and rows[1].rstrip(" |").endswith("-")


def test_spatter_without_drops_returns_the_clean_image_not_nan_garbage():
    """Seed 35 at severity 1 leaves no drop on this 32 px image; the reference divides 0 by 0."""
    img = _image().transpose(1, 2, 0)
    ic = C.load_imagecorruptions()
    np.random.seed(35)
    with np.errstate(invalid="ignore", divide="ignore"):
        raw = np.asarray(ic.spatter(Image.fromarray(np.ascontiguousarray(img)), 1), float)
    assert np.isnan(raw).all()  # the reference's behaviour this repair exists for
    assert np.array_equal(C.corrupt(_image(), "spatter", 1, 35), _image())


def test_image_cache_makes_corruptions_once_for_every_run(run, tmp_path, monkeypatch):
    """A second run (another out folder) reads the cached images: same numbers, no corruption made."""
    args = ["--corruptions", SEVERE, "--severities", "1,5", "--max-images", "9",
            "--image-cache", str(tmp_path / "cache")]

    def counts(rep: dict) -> dict:
        return {(n, sev): c["correct"] for n, cells in rep["corruptions"]["accuracy"].items() for sev, c in cells.items()}

    plain = counts(robustness(run, tmp_path / "plain", *args[:-2]))
    assert min(plain.values()) < 9, "harsh corruptions must cost accuracy, or equal counts prove nothing"
    assert counts(robustness(run, tmp_path / "a", *args)) == plain
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2 * len(SEVERE.split(","))
    assert not list((tmp_path / "cache").glob(".*"))

    def no_more(*a, **k):
        raise AssertionError("the corruption was made again")

    monkeypatch.setattr(W, "corrupt", no_more)
    assert counts(robustness(run, tmp_path / "b", *args)) == plain
    # another seed is other noise: not served from the cache
    with pytest.raises(AssertionError, match="made again"):
        W.run_robustness(W.RobustnessSettings(tuned=str(run), out=str(tmp_path / "c"), corruptions=["gaussian_noise"],
                                              severities=[1], max_images=9, seed=1, workers=0, verbose=False,
                                              image_cache=str(tmp_path / "cache")))
