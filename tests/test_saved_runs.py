"""Run folders written by an earlier vistune (``tests/fixtures/saved``, made by
``tests/fixtures/make_runs.py`` before task kinds owned their life after training) still load, and
``vistune eval`` reproduces the test metrics they recorded — classification and dense alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vistune.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

RUNS = Path(__file__).resolve().parent / "fixtures" / "saved"
CASES = {"classify": f"folder:{RUNS / 'folder'}", "segment": f"camvid:{RUNS / 'camvid'}"}


def _eval(target: Path, data: str, capsys) -> dict:
    capsys.readouterr()
    assert main(["eval", "--tuned", str(target), "--data", data, "--json", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("run", sorted(CASES))
@pytest.mark.parametrize("target", ["folder", "tuned file"])
def test_saved_run_eval_reproduces_recorded_metrics(run, target, capsys):
    folder = RUNS / run
    recorded = json.loads((folder / "metrics.json").read_text())
    path = folder if target == "folder" else folder / "tuned.safetensors"
    res = _eval(path, CASES[run], capsys)
    assert res["task"] == run
    keys = [k for k in recorded if k.startswith("test_") and k in res]
    assert any(k.startswith(("test_top1", "test_miou")) for k in keys), keys
    # exact but for float summation order (eval batches 64 images, training batched fewer)
    for k in keys:
        want = recorded[k]
        assert res[k] == (pytest.approx(want, rel=1e-6) if want is not None else None), k


def test_task_registry_lists_names_without_torch_and_drives_validation():
    """One task list: the registry's names are the CLI's ``--task`` choices and what the config
    accepts; listing them imports no torch, and a registered kind is accepted by both."""
    import subprocess
    import sys

    code = ("import sys, vistune.cli, vistune.config as c; from vistune.tasks import task_names; "
            "print(task_names(), c.TASKS, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['classify', 'segment', 'detect'] ('classify', 'segment', 'detect') False"

    from vistune.cli import build_parser
    from vistune.config import ConfigError, make_config
    from vistune.tasks import _REGISTERED, register_task, task_names
    from vistune.tasks.classify import ClassifyTask

    class Probe(ClassifyTask):
        name = "probe-task"

    with pytest.raises(ConfigError, match="task must be one of classify, segment, detect, got 'probe-task'"):
        make_config(backbone="b", data="d", task="probe-task")
    register_task(Probe)
    try:
        assert task_names()[-1] == "probe-task"
        assert make_config(backbone="b", data="d", task="probe-task").task == "probe-task"
        args = build_parser().parse_args(["train", "--backbone", "b", "--data", "d", "--task", "probe-task"])
        assert args.task == "probe-task"
        with pytest.raises(ConfigError, match="built into vistune"):
            register_task(Probe, name="segment")
    finally:
        _REGISTERED.pop("probe-task")
    with pytest.raises(ConfigError, match="imbalance is for classification runs only, not task 'segment'"):
        make_config(backbone="b", data="d", task="segment", imbalance=2)


def test_report_and_train_summary_columns_come_from_the_task_kind(tmp_path, capsys):
    """`vistune report` of a classification and a dense run shows each kind's own metric columns in
    its own format (declared on the task class); an old dense sweep.json without a ``task`` key gives
    its mIoU row, not an empty top-1 one."""
    import shutil

    from vistune.workflows.sweep import _primary, sweep_row

    capsys.readouterr()
    assert main(["report", str(RUNS / "classify"), str(RUNS / "segment")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[:6] == ["method", "options", "test top-1", "val top-1", "test mIoU", "val mIoU"]
    seg = json.loads((RUNS / "segment" / "metrics.json").read_text())
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert cells[4] == f"{seg['test_miou']:.4f}" and cells[2] == "-"
    assert _primary(seg) == "miou" and _primary({"method": "lora"}) == "top1"

    sweep = tmp_path / "sweep"
    shutil.copytree(RUNS / "segment", sweep / "final" / "seed0")
    (sweep / "sweep.json").write_text(json.dumps({
        "method": "lora", "options": {}, "trials": [], "best": {"val": 0.25, "params": {"lr": 0.01}},
        "final": {"metric": "test_miou", "mean": 0.2, "std": 0.0, "runs": [{"seed": 0, "dir": "final/seed0"}]}}))
    row = sweep_row(sweep)
    assert row["task"] == "segment" and row["test_miou"] == 0.2 and row["val_miou"] == 0.25
    assert "test_top1" not in row


def test_saved_runs_serve_through_their_task_kind(tmp_path):
    """The server asks the run's files which task kind they are and lets that kind build the head and
    the JSON: both saved runs serve in one mixed batch, and a registered kind's serving hooks are the
    ones used (no 'classify'/'segment' branch left in serve/)."""
    from PIL import Image

    from vistune.serve.multitask import MultiTaskModel
    from vistune.serve.predict import predict
    from vistune.tasks import _REGISTERED, kind_of_run, register_task
    from vistune.tasks.classify import ClassifyTask

    assert kind_of_run(RUNS / "segment").name == "segment"
    assert kind_of_run(RUNS / "segment" / "tuned.safetensors").name == "segment"
    assert kind_of_run(RUNS / "classify").name == "classify"
    model = MultiTaskModel.for_file(RUNS / "classify", device="cpu")
    model.add_task("cls", RUNS / "classify")
    model.add_task("seg", RUNS / "segment")
    img = next((RUNS / "camvid" / "test").glob("*.jpg")).read_bytes()
    res = predict(model, img, top=2)
    assert res["cls"]["kind"] == "classify" and len(res["cls"]["top"]) == 2
    assert res["seg"]["kind"] == "segment" and {"overlay_png", "fractions", "mask_png"} <= set(res["seg"])
    assert (res["seg"]["width"], res["seg"]["height"]) == Image.open(next((RUNS / "camvid" / "test").glob("*.jpg"))).size

    class Tagged(ClassifyTask):
        name = "tagged"

        @classmethod
        def run_kind(cls, path):
            return cls.name if (path / "TAGGED").exists() else None

        @classmethod
        def serve_result(cls, output, context, loaded, *, top, score_threshold):
            return {"tagged": True, **super().serve_result(output, context, loaded, top=top,
                                                           score_threshold=score_threshold)}

    import shutil

    shutil.copytree(RUNS / "classify", tmp_path / "tagged")
    (tmp_path / "tagged" / "TAGGED").touch()
    register_task(Tagged)
    try:
        model.add_task("tag", tmp_path / "tagged")
        res = predict(model, img, ["tag", "cls"], top=1)
        assert res["tag"] == {**res["cls"], "task": "tag", "kind": "tagged", "tagged": True}
    finally:
        _REGISTERED.pop("tagged")


def test_saved_runs_load_for_export_through_their_task_kind():
    """Export rebuilds a saved run through its task class: the dense run's graph is the segment
    kind's (per-pixel logits), the classification run's is its tuned model, and only ONNX carries
    a dense head (timm refuses it in one line naming the carriers)."""
    import torch

    from vistune.export import ExportError, export, load_run
    from vistune.export.onnx_format import graph_module

    seg, cls = load_run(RUNS / "segment"), load_run(RUNS / "classify" / "tuned.safetensors")
    assert (seg.task, cls.task) == ("segment", "classify")
    assert seg.class_names == ["floor", "red", "green"] and cls.dense is None
    module, outputs, _ = graph_module(seg)
    assert outputs == ("logits",)
    with torch.no_grad():
        assert tuple(module(torch.zeros(1, 3, 32, 32)).shape) == (1, 3, 32, 32)
    assert graph_module(cls)[0] is cls.tuned
    with pytest.raises(ExportError, match="dense \\(segment\\) run .* formats that carry it: onnx"):
        export(RUNS / "segment", "timm", "/nonexistent/out")
