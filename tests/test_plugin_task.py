"""A task kind from outside vistune: ``examples/multilabel.py`` (``register_task`` + ``register_reader``).

Every test reaches the example the way a user would (``--plugin examples/multilabel.py``, or the
import that ``--plugin`` does), never through an edit to ``src/vistune``, and checks that the kind
goes through train, eval, sweep, the multi-task server (one mixed batch beside a built-in
classification task), ``vistune predict`` and ONNX export like a built-in kind. The metrics are
checked by hand on small cases first: a task kind whose mAP is wrong would still "run".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_path
from PIL import Image

import vistune.tasks as task_registry
from vistune import attach
from vistune.backbones import seeded_backbone
from vistune.cli import main
from vistune.data import (
    KNOWN_KINDS,
    READERS,
    DataError,
    Reader,
    read_source,
    register_reader,
)
from vistune.plugins import load_plugin
from vistune.tuning import read_tuned_file

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "multilabel.py"
SIZE = 32
COLOURS = ("red", "green", "blue")


@pytest.fixture(scope="module")
def ml():
    """The example imported as ``--plugin`` imports it (registering ``multilabel`` and ``mlcamvid:``);
    gone again afterwards, so no other test module sees a kind it did not load."""
    module = load_plugin(str(EXAMPLE))
    yield module
    task_registry._REGISTERED.pop("multilabel", None)
    READERS.pop("mlcamvid", None)
    KNOWN_KINDS.pop("mlcamvid", None)
    sys.modules.pop("multilabel", None)


def present_of(i: int) -> list[int]:
    """Image ``i``'s labels: the bits of ``i % 8`` (every subset of the three colours, in turn)."""
    return [k for k in range(3) if (i % 8) >> k & 1]


def stripes(root: Path, counts=(("train", 24), ("val", 8), ("test", 8)), size: int = 24) -> Path:
    """A tiny ``mlcamvid:`` folder (camvid layout + classes.txt): label k is a bright band of
    colour channel k across the k-th third of the image; its mask marks the band, void elsewhere."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(COLOURS) + "\n")
    band = size // 3
    for split, n in counts:
        (root / split).mkdir(exist_ok=True)
        (root / f"{split}annot").mkdir(exist_ok=True)
        for i in range(n):
            img = rng.integers(0, 50, (size, size, 3), dtype=np.uint8)
            mask = np.full((size, size), len(COLOURS), dtype=np.uint8)  # void
            for k in present_of(i):
                img[k * band:(k + 1) * band, :, k] += 180
                mask[k * band:(k + 1) * band] = k
            Image.fromarray(img).save(root / split / f"{i:02d}.png")
            Image.fromarray(mask, mode="L").save(root / f"{split}annot" / f"{i:02d}.png")
    return root


def png_bytes(path: Path) -> bytes:
    return path.read_bytes()


# ------------------------------------------------------------------------------------ metrics

def test_average_precision_by_hand(ml):
    ap = ml.average_precision
    y = np.array([1, 0, 1, 0, 0, 1])
    assert ap(y.astype(float), y) == 1.0  # a perfect scorer
    assert ap(-y.astype(float), y) < 0.6  # the reversed one ranks every negative first
    # ranks 1..4: +, -, +, -: precision at the two positives 1/1 and 2/3
    assert ap(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])) == pytest.approx((1 + 2 / 3) / 2)
    # a tie is one threshold: {0.9: +}, {0.5: +, -} -> 1/2 * 1 + 1/2 * 2/3, whatever the order inside the tie
    for y_tie in ([1, 1, 0], [1, 0, 1]):
        assert ap(np.array([0.9, 0.5, 0.5]), np.array(y_tie)) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert ap(np.array([0.3, 0.2]), np.array([0, 0])) is None  # undefined, not 0


def test_average_precision_equals_scikit_learn(ml):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    for _ in range(5):
        y = rng.integers(0, 2, 40)
        y[0] = 1
        s = np.round(rng.random(40), 1)  # rounded: many ties
        assert ml.average_precision(s, y) == pytest.approx(sklearn_metrics.average_precision_score(y, s))


def test_f1_and_the_split_metrics_by_hand(ml):
    probs = np.array([[0.9, 0.2, 0.1], [0.6, 0.7, 0.2], [0.4, 0.8, 0.3], [0.1, 0.1, 0.2]])
    targets = np.array([[1, 0, 0], [1, 1, 0], [1, 0, 0], [0, 1, 0]])
    # label 0: TP 2, FN 1 -> 4/5; label 1: TP 1, FP 1, FN 1 -> 1/2; label 2: nothing anywhere -> None
    assert ml.f1_scores(probs, targets) == [pytest.approx(0.8), pytest.approx(0.5), None]
    logits = torch.logit(torch.tensor(probs, dtype=torch.float64)).float()
    res = ml.multilabel_metrics(logits, torch.tensor(targets, dtype=torch.float32))
    assert res["labels_without_positives"] == 1 and res["ap"][2] is None  # skipped and counted
    assert res["map"] == pytest.approx((res["ap"][0] + res["ap"][1]) / 2)
    assert res["ap"][0] == 1.0  # label 0 ranks +, +, +, -
    assert res["ap"][1] == pytest.approx(0.5)  # label 1 ranks -, +, -, +: precision 1/2 and 2/4
    assert res["macro_f1"] == pytest.approx((0.8 + 0.5) / 2) and res["num"] == 4
    want_loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor(targets).float())
    assert res["loss"] == pytest.approx(float(want_loss), rel=1e-6)  # the per-element mean, as training's
    with pytest.raises(ValueError, match=r"logits \(4, 3\) and targets \(4, 2\)"):
        ml.multilabel_metrics(logits, torch.zeros(4, 2))


def test_map_ranks_saturated_scores_by_logit(ml):
    """Logits 40, 30, 20 are all probability 1.0 in float32: ranked by probability they would be one
    tie (AP 2/3); their order is real, so AP is that of the ranking +, -, +."""
    logits, targets = torch.tensor([[40.0], [30.0], [20.0]]), torch.tensor([[1.0], [0.0], [1.0]])
    assert torch.sigmoid(logits).unique().tolist() == [1.0]
    assert ml.multilabel_metrics(logits, targets)["map"] == pytest.approx((1 + 2 / 3) / 2)


# --------------------------------------------------------------------------------------- data

def test_the_reader_derives_labels_from_masks(ml, tmp_path):
    root = stripes(tmp_path / "d", counts=(("train", 8), ("test", 3)))
    Image.fromarray(np.full((24, 24), 3, np.uint8), mode="L").save(root / "testannot" / "00.png")
    src = read_source(f"mlcamvid:{root}", task="multilabel")
    assert src.kind == "mlcamvid" and src.class_names == list(COLOURS) and set(src.splits) == {"train", "test"}
    assert src.splits["train"].targets == [present_of(i) for i in range(8)]
    assert src.splits["test"].ids == ["test/00.png", "test/01.png", "test/02.png"]
    # a class below MIN_FRACTION of the pixels is no label: 2 of 576 pixels (0.35 %) vs 3 (0.52 %)
    for pixels, want in ((2, []), (3, [1])):
        mask = np.full((24, 24), 3, np.uint8)
        mask.reshape(-1)[:pixels] = 1
        Image.fromarray(mask, mode="L").save(root / "testannot" / "01.png")
        assert read_source(f"mlcamvid:{root}", task="multilabel").splits["test"].targets[1] == want
    mask[0, 0] = 7  # neither a class, void (3) nor 255
    Image.fromarray(mask, mode="L").save(root / "testannot" / "01.png")
    with pytest.raises(DataError, match=r"mask .*01\.png holds value 7, outside the 3 classes"):
        read_source(f"mlcamvid:{root}")
    with pytest.raises(DataError, match=r"mlcamvid: data serves multilabel, not 'classify'"):
        read_source(f"mlcamvid:{root}", task="classify")


def test_register_reader_rules(ml):
    reader = READERS["mlcamvid"]
    assert register_reader("mlcamvid", reader) is reader  # the same reader again: a no-op
    other = Reader(reader.read, "other usage", tasks=("multilabel",))
    with pytest.raises(DataError, match="'mlcamvid' is registered twice"):
        register_reader("mlcamvid", other)
    for kind in ("camvid", "huggingface"):  # a built-in kind, a built-in alias
        with pytest.raises(DataError, match=f"'{kind}' is built into vistune"):
            register_reader(kind, other)
    with pytest.raises(DataError, match="is invalid"):
        register_reader("a:b", other)
    with pytest.raises(DataError, match="not a vistune.data.Reader"):
        register_reader("fine", reader.read)
    assert "fine" not in READERS and "mlcamvid:DIR" in KNOWN_KINDS["mlcamvid"]


def test_the_real_camvid_masks_give_varied_label_sets(ml):
    root = shared_path("data", "camvid")
    src = read_source(f"mlcamvid:{root}", task="multilabel")
    assert {k: len(v) for k, v in src.splits.items()} == {"train": 367, "val": 101, "test": 233}
    test = src.splits["test"].targets
    counts = np.bincount([c for t in test for c in t], minlength=11)
    names = dict(zip(src.class_names, counts.tolist()))
    assert names["road"] == 233  # every street scene has road ...
    assert 0 < names["pedestrian"] < 233 and 0 < names["bicyclist"] < 233  # ... people only in some
    assert len({tuple(t) for t in test}) > 10  # many distinct label sets: a real multi-label target


# ------------------------------------------------------------------------ through every command

@pytest.fixture(scope="module")
def run(ml, tmp_path_factory):
    """One multi-label run trained by ``vistune --plugin examples/multilabel.py train``."""
    root = tmp_path_factory.mktemp("mlrun")
    data = stripes(root / "data")
    out = root / "run"
    argv = ["--plugin", str(EXAMPLE), "train", "--task", "multilabel", "--backbone", "test_vit",
            "--img-size", str(SIZE), "--method", "lora", "--data", f"mlcamvid:{data}", "--epochs", "4",
            "--batch-size", "8", "--lr", "0.05", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    return {"data": data, "out": out, "metrics": json.loads((out / "metrics.json").read_text())}


def test_training_learns_the_labels(run, ml):
    m = run["metrics"]
    log = [json.loads(line) for line in (run["out"] / "log.jsonl").read_text().splitlines()]
    assert m["task"] == "multilabel" and m["num_train"] == 24 and m["num_classes"] == 3
    assert log[-1]["train_loss"] < 0.7 * log[0]["first_loss"]  # BCE falls on a learnable set
    assert m["test_map"] > 0.9 and m["test_labels_without_positives"] == 0
    assert set(m["test_ap_per_label"]) == set(COLOURS) and m["test_macro_f1"] > 0.5
    assert m["train_label_counts"] == {"red": 12, "green": 12, "blue": 12}  # bits of 0..7, three times
    meta, _ = read_tuned_file(run["out"] / "tuned.safetensors")
    assert meta["extra"]["config"]["task"] == "multilabel" and meta["num_classes"] == 3  # a K-logit head
    manifest = json.loads((run["out"] / "splits.json").read_text())
    assert manifest["splits"]["test"]["labels"] == [present_of(i) for i in range(8)]


def test_the_loss_is_bce_on_multi_hot_targets(ml, run, tmp_path):
    """The batch the loss sees: (N, K) float multi-hot, and the loss equals BCE on it."""
    from vistune.config import make_config
    from vistune.engine.distributed import init_distributed

    cfg = make_config({"task": "multilabel", "backbone": "test_vit", "img_size": SIZE, "method": "lora",
                       "data": f"mlcamvid:{run['data']}", "batch_size": 8, "progress": False})
    task = task_registry.make_task("multilabel")
    task.setup(cfg, init_distributed("cpu"), None)
    x, y = next(iter(task.train_batches(0)))[0]
    assert y.shape == (8, 3) and y.dtype == torch.float32 and set(y.unique().tolist()) <= {0.0, 1.0}
    loss, n, _ = task.loss((x, y))
    with torch.no_grad():
        want = torch.nn.functional.binary_cross_entropy_with_logits(task.tuned(x), y)
    assert n == 8 and float(loss.detach()) == pytest.approx(float(want), rel=1e-5)
    with pytest.raises(ValueError, match=r"logits \(8, 3\) do not match targets \(8, 2\)"):
        task.loss((x, y[:, :2]))


def test_eval_reproduces_the_recorded_map(run, capsys):
    capsys.readouterr()
    assert main(["--plugin", str(EXAMPLE), "eval", "--tuned", str(run["out"]), "--json", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["task"] == "multilabel"
    for key in ("test_map", "test_macro_f1", "test_loss"):
        assert res[key] == pytest.approx(run["metrics"][key], abs=1e-6)
    assert main(["--plugin", str(EXAMPLE), "eval", "--tuned", str(run["out"]), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert f"test_map  {run['metrics']['test_map']:.4f}  (n=8, 0 labels without positives skipped)" in text


def test_a_run_whose_plugin_is_absent_is_one_line(run, monkeypatch, capsys):
    monkeypatch.setattr(task_registry, "_REGISTERED", {})  # a process that never loaded the example
    assert main(["eval", "--tuned", str(run["out"]), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown task 'multilabel'" in err and "--plugin" in err
    # and the server does not take its head for a softmax classifier either
    from vistune.serve.multitask import MultiTaskModel

    with pytest.raises(Exception, match="unknown task 'multilabel'"):
        MultiTaskModel(seeded_backbone("test_vit", None, SIZE)).add_task("tags", run["out"])


def test_sweep_selects_on_val_map(run, tmp_path):
    pytest.importorskip("optuna")
    config = tmp_path / "ml.yaml"
    config.write_text("task: multilabel\n")
    out = tmp_path / "sweep"
    assert main(["--plugin", str(EXAMPLE), "sweep", "--config", str(config), "--backbone", "test_vit",
                 "--img-size", str(SIZE), "--method", "lora", "--data", f"mlcamvid:{run['data']}", "--epochs", "2",
                 "--batch-size", "8", "--grid", "lr=0.05,0.0001", "--grid", "wd=0", "--seeds", "1",
                 "--pruner", "none", "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "sweep.json").read_text())
    trials = {p.name: json.loads((p / "metrics.json").read_text())
              for p in (out / "trials").iterdir() if (p / "metrics.json").is_file()}
    assert sorted(trials) == ["lr=0.0001,wd=0", "lr=0.05,wd=0"]
    assert all(t["task"] == "multilabel" and "test_map" not in t for t in trials.values())  # trials see no test
    vals = {name: t["val_map"] for name, t in trials.items()}
    assert vals["lr=0.05,wd=0"] != vals["lr=0.0001,wd=0"]  # the choice is not a tie-break
    best = max(vals, key=vals.get)
    assert result["best"]["params"]["lr"] == trials[best]["lr"]
    final = json.loads((out / result["final"]["runs"][0]["dir"] / "metrics.json").read_text())
    assert final["task"] == "multilabel" and final["lr"] == trials[best]["lr"] and "test_map" in final


def test_serves_in_one_mixed_batch_beside_a_builtin_classifier(run, tmp_path):
    from vistune.backbones import backbone_for_file
    from vistune.serve.multitask import MultiTaskModel
    from vistune.serve.predict import predict
    from vistune.tuning import load_tuned

    base = seeded_backbone("test_vit", None, SIZE)
    clf = attach(seeded_backbone("test_vit", None, SIZE), "lora", num_classes=4, rank=2)
    with torch.no_grad():
        for p in clf.tuned_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.2)
    clf_path = clf.save_tuned(tmp_path / "clf.safetensors")
    mt = MultiTaskModel(base)
    mt.add_task("tags", run["out"])
    mt.add_task("clf", clf_path)
    assert mt.tasks["tags"].kind == "multilabel" and mt.tasks["clf"].kind == "classify"
    tasks = ["tags", "clf", "tags", "clf"]
    assert len(mt.passes(tasks)) == 1  # both kinds in one backbone pass

    image = run["data"] / "test" / "05.png"  # red + blue
    answer = predict(mt, png_bytes(image))
    tags, top = answer["tags"], answer["clf"]
    from vistune.backbones import backbone_info
    from vistune.serve.predict import classify_input

    info = backbone_info(base)
    x = classify_input(png_bytes(image), SIZE, tuple(info.mean), tuple(info.std))[None]  # what eval feeds
    with torch.no_grad():
        meta, _ = read_tuned_file(run["out"] / "tuned.safetensors")
        own = load_tuned(run["out"] / "tuned.safetensors", backbone_for_file(meta["backbone"], run["out"])).eval()
        want = torch.sigmoid(own(x))[0].tolist()
        want_clf = torch.softmax(clf.eval()(x), 1)[0]
    assert tags["kind"] == "multilabel" and tags["threshold"] == 0.5
    assert [tags["probabilities"][c] for c in COLOURS] == pytest.approx(want, abs=1e-5)
    assert [t["label"] for t in tags["labels"]] == sorted([c for c, p in zip(COLOURS, want) if p >= 0.5],
                                                          key=lambda c: -want[COLOURS.index(c)])
    assert {t["label"] for t in tags["labels"]} == {"red", "blue"}  # it learnt the picture
    assert top["kind"] == "classify" and top["top"][0]["prob"] == pytest.approx(float(want_clf.max()), abs=1e-5)


def test_predict_answers_with_each_kind(run, tmp_path, capsys):
    image = run["data"] / "test" / "03.png"  # red + green
    capsys.readouterr()
    assert main(["--plugin", str(EXAMPLE), "predict", "--tuned", str(run["out"]), "--image", str(image)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["task"] == "multilabel" and {t["label"] for t in res["labels"]} == {"red", "green"}
    out = tmp_path / "p.json"
    assert main(["--plugin", str(EXAMPLE), "predict", "--tuned", str(run["out"]), "--image", str(image),
                 "--out", str(out), "--score-threshold", "0.0"]) == 0
    assert len(json.loads(out.read_text())["labels"]) == 3  # every label clears threshold 0
    assert capsys.readouterr().out.strip() == f"written {out}"
    clf = attach(seeded_backbone("test_vit", None, SIZE), "linear", num_classes=4)
    clf = clf.save_tuned(tmp_path / "c.safetensors")
    assert main(["predict", "--tuned", str(clf), "--image", str(image), "--top", "2"]) == 0
    top = json.loads(capsys.readouterr().out)["top"]
    assert len(top) == 2 and top[0]["prob"] >= top[1]["prob"]
    assert main(["predict", "--tuned", str(clf), "--image", str(image), "--out", str(tmp_path / "x.png")]) == 2
    assert "must end in .json" in capsys.readouterr().err


def test_onnx_export_gives_the_probabilities(run, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from vistune.export import export, load_run

    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = torch.sigmoid(load_run(run["out"]).model(x))
    info = export(run["out"], "onnx", tmp_path / "onnx")
    assert info["task"] == "multilabel" and list(info["outputs"]) == ["probabilities"]
    assert info["class_names"] == list(COLOURS) and info["check"]["checked"]
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    (probs,) = session.run(None, {"image": x.numpy()})
    assert probs.shape == (3, 3) and float((torch.from_numpy(probs) - want).abs().max()) < 1e-4
    assert 0 < probs.min() and probs.max() < 1 and float(want.std()) > 1e-3  # probabilities, not constant


def test_task_help_lists_the_plugin_kind(ml, capsys):
    with pytest.raises(SystemExit):
        main(["--plugin", str(EXAMPLE), "train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "{classify,segment,detect,multilabel}" in text
    assert "multilabel: several labels per image: sigmoid head, BCE" in text
    assert "segment: a class per pixel" in text


def test_an_installed_package_needs_no_flag(run, tmp_path, monkeypatch, capsys):
    """A package's ``vistune.tasks`` entry point: ``eval`` finds the kind from the run's tuned file,
    imports the module (which registers its ``mlcamvid:`` reader as it loads) and reproduces the run."""
    monkeypatch.setattr(task_registry, "_REGISTERED", {})
    monkeypatch.delitem(sys.modules, "multilabel")
    monkeypatch.delitem(READERS, "mlcamvid")
    monkeypatch.delitem(KNOWN_KINDS, "mlcamvid")
    info = tmp_path / "vistune_multilabel-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vistune_multilabel\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[vistune.tasks]\nmultilabel = multilabel:MultiLabelTask\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLE.parent))
    assert "multilabel" in task_registry.task_names() and "multilabel" not in sys.modules  # listing imports nothing
    capsys.readouterr()
    assert main(["eval", "--tuned", str(run["out"]), "--json", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["task"] == "multilabel" and res["test_map"] == pytest.approx(run["metrics"]["test_map"], abs=1e-6)


@pytest.mark.parametrize("flags, key", [(["--shots", "2"], "shots"), (["--imbalance", "10"], "imbalance"),
                                        (["--head-init", "prototypes"], "head_init=prototypes")])
def test_class_per_image_settings_are_refused_in_one_line(ml, tmp_path, capsys, flags, key):
    argv = ["--plugin", str(EXAMPLE), "train", "--task", "multilabel", "--backbone", "test_vit", "--img-size",
            str(SIZE), "--method", "linear", "--data", f"mlcamvid:{tmp_path}", "--out", str(tmp_path / "o"), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{key} needs one class per image; task 'multilabel' has several" in err
    assert not (tmp_path / "o").exists()  # refused before anything was created
