"""Experiment tracking (``--log tensorboard``, ``--log mlflow``): read back with TensorBoard's own
event reader and MLflow's client on a local file store, so no server is needed."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

# find_spec, not importorskip: importing mlflow costs ~2 s, which every pytest-xdist worker would
# pay at collection; the tests import it when they run
for _extra, _dist in (("tensorboard", "tensorboard"), ("mlflow", "mlflow-skinny")):
    if importlib.util.find_spec(_extra) is None:
        pytest.skip(f"{_dist} (the tracking extra) is not installed", allow_module_level=True)

from tests.test_engine import cfg_for, make_folder  # noqa: E402
from vistune.cli import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

#: 3 classes x 4 train images, batch 4, accum 2: 3 micro-batches = 2 optimizer steps per epoch.
EPOCHS, STEPS_PER_EPOCH = 2, 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("trackdata") / "data", classes=3, per_class=4)


def _tiny(folder: Path, out: Path, *extra: str) -> list[str]:
    return ["--backbone", "test_vit", "--img-size", "32", "--method", "lora", "-o", "rank=2",
            "--data", f"folder:{folder}", "--epochs", str(EPOCHS), "--batch-size", "4", "--out", str(out),
            "--no-progress", *extra]


def events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return acc


def hparams(acc) -> dict[str, object]:
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}


def client(uri: str):
    from vistune.engine.tracking import mlflow_client

    return mlflow_client(uri)


def runs_of(uri: str, experiment: str = "vistune") -> list:
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} in {uri}"
    return c.search_runs([exp.experiment_id])


@pytest.fixture(scope="module")
def tracked_run(folder, tmp_path_factory):
    """One tiny train logged to both backends (TensorBoard to a --log-dir, MLflow to a file: URI)."""
    root = tmp_path_factory.mktemp("tracked")
    out, tb, uri = root / "run", root / "tb", (root / "ml").as_uri()
    assert main(["train", *_tiny(folder, out, "--accum-steps", "2", "--log", "tensorboard", "--log", "mlflow",
                                "--log-dir", str(tb), "--mlflow-uri", uri, "--mlflow-experiment", "exp1")]) == 0
    return out, tb, uri


def test_tensorboard_has_steps_epochs_final_once_and_hparams(tracked_run):
    out, tb, _ = tracked_run
    metrics = json.loads((out / "metrics.json").read_text())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    acc = events(tb)
    steps = list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    # one point per optimizer step (not per micro-batch, no step 0): the accumulation is seen
    assert [e.step for e in acc.Scalars("train/loss")] == steps
    assert [e.step for e in acc.Scalars("train/lr")] == steps
    assert acc.Scalars("train/lr")[-1].value == pytest.approx(log[-1]["lr"], rel=1e-5, abs=1e-12)
    val = acc.Scalars("epoch/val_top1")
    assert [e.step for e in val] == [STEPS_PER_EPOCH * (i + 1) for i in range(EPOCHS)]
    assert [e.value for e in val] == pytest.approx([r["val_top1"] for r in log], rel=1e-5)
    test = acc.Scalars("final/test_top1")
    assert len(test) == 1 and test[0].value == pytest.approx(metrics["test_top1"], rel=1e-5)
    assert "final/lr" not in acc.Tags()["scalars"]  # config values are hyper-parameters, not results
    hp = hparams(acc)
    assert hp["method"] == "lora" and float(hp["options.rank"]) == 2 and hp["accum_steps"] == 2
    assert float(hp["lr"]) == metrics["lr"]
    assert not (out / "tb").exists()  # --log-dir was given: nothing in OUT/tb


def test_mlflow_run_has_params_history_final_and_artefacts(tracked_run, tmp_path):
    out, _, uri = tracked_run
    metrics = json.loads((out / "metrics.json").read_text())
    (run,) = runs_of(uri, "exp1")
    c = client(uri)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["method"] == "lora" and float(run.data.params["lr"]) == metrics["lr"]
    history = c.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    assert len(c.get_metric_history(run.info.run_id, "epoch/val_top1")) == EPOCHS
    final = c.get_metric_history(run.info.run_id, "final/test_top1")
    assert len(final) == 1 and final[0].value == pytest.approx(metrics["test_top1"])
    assert {a.path for a in c.list_artifacts(run.info.run_id)} >= {"tuned.safetensors", "metrics.json"}
    got = Path(c.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path)))
    assert got.read_bytes() == (out / "metrics.json").read_bytes()


def test_sweep_logs_each_trial_nested_with_its_searched_values(folder, tmp_path):
    out = tmp_path / "sw"
    grid = [0.1, 0.01]
    assert main(["sweep", *_tiny(folder, out, "--pruner", "none", "--grid", "lr=" + ",".join(map(str, grid)),
                                 "--grid", "wd=0", "--seeds", "1", "--log", "tensorboard", "--log", "mlflow")]) == 0
    result = json.loads((out / "sweep.json").read_text())
    # TensorBoard (default place OUT/tb): one folder per trial with its searched values, one per final seed
    for trial in result["trials"]:
        acc = events(out / "tb" / trial["run_dir"])
        assert float(hparams(acc)["searched.lr"]) == trial["params"]["lr"]
        assert len(acc.Scalars("final/val_top1")) == 1
        assert "final/test_top1" not in acc.Tags()["scalars"]  # a trial never sees the test split
    final = events(out / "tb" / "final" / "seed0")
    assert len(final.Scalars("final/test_top1")) == 1
    # MLflow (default URI file:OUT/mlruns): trial and final runs nested under the sweep's run
    uri = (out / "mlruns").as_uri()
    runs = runs_of(uri)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1 == len(grid) + 1
    trials = [r for r in children if r.info.run_name.startswith("trials/")]
    assert sorted(float(r.data.params["searched.lr"]) for r in trials) == sorted(grid)
    assert {r.data.tags["optuna.trial"] for r in trials} == {str(t["number"]) for t in result["trials"]}
    c = client(uri)
    assert {a.path for a in c.list_artifacts(parent.info.run_id)} >= {"sweep.json", "sweep.md"}
    assert parent.data.metrics["final_mean"] == pytest.approx(result["final"]["mean"])


def test_a_pruned_run_ends_killed_and_writes_no_artefact(folder, tmp_path):
    optuna = pytest.importorskip("optuna")
    from vistune.engine.tracking import build_tracking
    from vistune.workflows.sweep import OptunaPruning
    from vistune.workflows.train import train

    class Prune:
        def report(self, value, step):
            pass

        def should_prune(self):
            return True

    cfg = cfg_for(folder, tmp_path / "p", method="linear", epochs=3)
    tracking = build_tracking(["mlflow", "tensorboard"], cfg.out)
    with pytest.raises(optuna.TrialPruned):
        train(cfg, callbacks=[*tracking.callbacks(cfg.to_dict()), OptunaPruning(Prune())], evaluate_test=False)
    (run,) = runs_of(tracking.mlflow_uri)
    assert run.info.status == "KILLED"
    assert client(tracking.mlflow_uri).list_artifacts(run.info.run_id) == []
    assert len(events(tmp_path / "p" / "tb").Scalars("epoch/val_top1")) == 1  # epoch 1, then pruned


def test_a_resumed_run_keeps_whole_curves(folder, tmp_path):
    """TensorBoard: one point per step although the run was stopped and resumed; MLflow: the
    resumed run (a new one) carries the epochs before the checkpoint too."""
    from vistune.engine.tracking import build_tracking
    from vistune.workflows.train import train

    cfg = cfg_for(folder, tmp_path / "r", method="linear", epochs=2)
    tracking = build_tracking(["mlflow", "tensorboard"], cfg.out)
    train(cfg, callbacks=tracking.callbacks(cfg.to_dict()), stop_after_epoch=1)
    train(cfg, callbacks=tracking.callbacks(cfg.to_dict()), resume=True)
    per_epoch = 2  # 12 images, batch 8
    steps = [e.step for e in events(tmp_path / "r" / "tb").Scalars("train/loss")]
    assert steps == list(range(1, 2 * per_epoch + 1))
    runs = runs_of(tracking.mlflow_uri)
    resumed = [r for r in runs if r.data.tags.get("vistune.resumed_after_epoch") == "1"]
    assert len(runs) == 2 and len(resumed) == 1
    val = client(tracking.mlflow_uri).get_metric_history(resumed[0].info.run_id, "epoch/val_top1")
    assert sorted(m.step for m in val) == [per_epoch, 2 * per_epoch]


def _one_line_exit_2(capsys, argv: list[str]) -> str:
    rc = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_missing_package_is_one_line_naming_the_extra_and_nothing_is_written(folder, tmp_path, capsys,
                                                                                monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now raises ImportError
    line = _one_line_exit_2(capsys, ["train", *_tiny(folder, tmp_path / "o", "--log", "mlflow")])
    assert "vistune[tracking]" in line and "mlflow" in line
    assert not (tmp_path / "o").exists()


def test_unreachable_mlflow_uri_refuses_before_the_run_starts(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for command in ("train", "sweep"):
        out = tmp_path / command
        line = _one_line_exit_2(capsys, [command, *_tiny(folder, out, "--log", "mlflow",
                                                         "--mlflow-uri", "http://127.0.0.1:9")])
        assert "127.0.0.1:9" in line and "cannot reach" in line
        assert not out.exists()
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ  # the check's short timeout is not left behind


def test_a_server_failing_mid_run_warns_once_and_training_goes_on(tmp_path, capsys):
    from vistune.engine.callbacks import FitState
    from vistune.engine.tracking import MLflowLog

    log = MLflowLog((tmp_path / "ml").as_uri(), "vistune", "r", {"lr": 0.1})
    state = FitState(epochs=3, steps_per_epoch=1, primary="top1")
    log.on_fit_start(state)

    def down(*args, **kwargs):
        raise ConnectionError("[Errno 111] Connection refused")

    log.client.log_batch = down
    for epoch in (1, 2):
        state.epoch, state.step = epoch, 1
        log.on_epoch_end(state, {"epoch": epoch, "train_loss": 1.0})  # must not raise
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "warning" in err[0] and "Connection refused" in err[0]
