"""CLI wiring of the sub-commands that live outside the classification engine."""

from __future__ import annotations

import json

from tests.test_dense import make_camvid
from tests.test_engine import make_folder
from vistune.cli import main


def test_info_counts_vit_b_on_meta(capsys):
    assert main(["info", "--backbone", "vit_base_patch16_224", "--method", "lora", "--num-classes", "100", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["tuned_params"] == 294_912 and r["head_params"] == 76_900 and r["backbone_params"] == 85_798_656


def test_sensitivity_cli_writes_scores_allocation_and_plot(tmp_path, capsys):
    data = make_folder(tmp_path / "d")
    scores, plot = tmp_path / "s.safetensors", tmp_path / "alloc.png"
    args = ["sensitivity", "--backbone", "test_vit", "--img-size", "32", "--data", f"folder:{data}",
            "--scores", str(scores), "--sens-batch-size", "8", "--batches", "2", "--budget", "5k",
            "--plot", str(plot)]
    assert main(args) == 0
    out = capsys.readouterr().out
    summary = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert summary["target"] == 5000 and abs(summary["realised"] - 5000) <= 0.2 * 5000
    assert scores.stat().st_size > 0 and plot.stat().st_size > 1000
    # a second call reuses the scores file instead of recomputing
    assert main(args) == 0 and "existing" in capsys.readouterr().out


def test_dense_train_eval_predict_cli(tmp_path, capsys):
    data = make_camvid(tmp_path / "cv")
    out = tmp_path / "run"
    assert main(["train", "--task", "segment", "--backbone", "test_vit", "--img-size", "32", "--method", "linear",
                 "--data", f"camvid:{data}", "--epochs", "2", "--batch-size", "4", "--lr", "0.01",
                 "--out", str(out), "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--tuned", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["test_miou"] == m["test_miou"]
    img = next((data / "test").glob("*"))
    assert main(["predict", "--tuned", str(out), "--image", str(img), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000
