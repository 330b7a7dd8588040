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
