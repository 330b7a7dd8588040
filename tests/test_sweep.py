"""vistune sweep: Optuna search on val only, resume after a kill, several workers, the retrain stage."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna", reason="optuna (the sweep's search library) is not installed")

from tests.test_engine import make_folder  # noqa: E402
from vistune.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("sweepdata") / "data", classes=3, per_class=8)


def sweep_argv(folder: Path, out: Path, *extra: str) -> list[str]:
    return ["sweep", "--backbone", "test_vit", "--img-size", "32", "--method", "lora", "-o", "rank=2",
            "--data", f"folder:{folder}", "--epochs", "2", "--batch-size", "8", "--out", str(out),
            "--no-progress", "--pruner", "none", *extra]


def _progress(line: str) -> bool:
    """A sweep's per-run progress line (every trial and final run prints one)."""
    return line.startswith("vistune sweep: ") and line.endswith(" elapsed")


def _trial_metrics(out: Path) -> dict[str, dict]:
    return {p.name: json.loads((p / "metrics.json").read_text()) for p in (out / "trials").iterdir()
            if (p / "metrics.json").is_file()}


def test_grid_selects_on_val_only_and_retrains_each_seed(folder, tmp_path, capsys):
    out = tmp_path / "sw"
    assert main(sweep_argv(folder, out, "--grid", "lr=0.3,0.003", "--grid", "wd=0", "--seeds", "2",
                           "--trainval")) == 0
    result = json.loads((out / "sweep.json").read_text())
    trials = _trial_metrics(out)
    assert set(trials) == {"lr=0.003,wd=0", "lr=0.3,wd=0"}
    for name, m in trials.items():  # the test split is never evaluated for a trial
        assert not any(k.startswith(("test_", "periodic_test")) for k in m), name
        log = (out / "trials" / name / "log.jsonl").read_text()
        assert "test" not in log and m["num_val"] > 0
    vals = {name: m["val_top1"] for name, m in trials.items()}
    best = max(vals, key=lambda n: (vals[n], -float(n.split(",")[0][3:])))  # ties: the smaller lr
    assert result["best"]["run_dir"] == f"trials/{best}" and result["best"]["val"] == vals[best]
    final = result["final"]
    assert final["trainval"] and [r["seed"] for r in final["runs"]] == [0, 1]
    tests = []
    for r in final["runs"]:
        m = json.loads((out / r["dir"] / "metrics.json").read_text())
        assert m["num_val"] == 0 and m["num_train"] == 24 + 9  # retrained on train+val
        assert m["lr"] == result["best"]["params"]["lr"] and m["seed"] == r["seed"]
        tests.append(m["test_top1"])
    assert final["mean"] == pytest.approx(statistics.fmean(tests))
    assert final["std"] == pytest.approx(statistics.stdev(tests))
    assert (out / "sweep_grid.png").stat().st_size > 1000 and (out / "sweep_history.png").is_file()
    assert "±" in (out / "sweep.md").read_text()
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.startswith("| lora |") and f"{final['mean']:.2f} ± {final['std']:.2f} (n=2)" in row


def test_killed_sweep_resumes_without_rerunning_finished_trials(folder, tmp_path, capsys):
    from vistune.config import make_config
    from vistune.workflows.sweep import Space, open_study, suggest
    from vistune.workflows.train import train

    out = tmp_path / "sw"
    argv = sweep_argv(folder, out, "--grid", "lr=0.2,0.02,0.002", "--grid", "wd=0", "--seeds", "1")
    assert main([*argv, "--max-trials", "1"]) == 0  # a first invocation that stops after one trial
    first = _trial_metrics(out)
    assert len(first) == 1 and not (out / "final").exists()
    (name, _), = first.items()
    stamp = (out / "trials" / name / "metrics.json").stat().st_mtime_ns
    # Simulate a kill in the middle of the second trial: the study holds it RUNNING and its run
    # folder holds the checkpoint of its first epoch.
    space = Space({"lr": [0.2, 0.02, 0.002], "wd": [0.0]}, "adamw")
    study = open_study(out, None, "vistune-sweep", "grid", space, "none", 2, 0)
    trial = study.ask()
    params = suggest(trial, space, "grid")
    killed = f"lr={params['lr']:g},wd=0"
    assert killed != name
    cfg = make_config(backbone="test_vit", img_size=32, method="lora", options={"rank": 2}, data=f"folder:{folder}",
                      epochs=2, batch_size=8, optimizer="adamw", lr=params["lr"], wd=0.0, progress=False,
                      out=str(out / "trials" / killed), val_every=1)
    assert train(cfg, stop_after_epoch=1, evaluate_test=False) == {"stopped_after_epoch": 1}
    capsys.readouterr()
    assert main(argv) == 0
    assert "retrying 1 trial" in capsys.readouterr().err
    result = json.loads((out / "sweep.json").read_text())
    complete = [t for t in result["trials"] if t["state"] == "COMPLETE"]
    assert sorted(t["params"]["lr"] for t in complete) == [0.002, 0.02, 0.2]  # each point once
    assert (out / "trials" / name / "metrics.json").stat().st_mtime_ns == stamp  # not re-run
    epochs = [json.loads(x)["epoch"] for x in (out / "trials" / killed / "log.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]  # the killed trial resumed from its checkpoint, no epoch twice
    assert result["final"]["runs"][0]["test_top1"] is not None
    again = (out / "sweep.json").stat().st_mtime_ns
    assert main(argv) == 0  # a finished sweep: nothing runs again
    assert len(json.loads((out / "sweep.json").read_text())["trials"]) == len(result["trials"])
    assert (out / "sweep.json").stat().st_mtime_ns >= again


def test_second_worker_joins_the_same_study(folder, tmp_path):
    out = tmp_path / "sw"
    assert main(sweep_argv(folder, out, "--grid", "lr=0.2,0.05,0.02,0.005", "--grid", "wd=0", "--seeds", "1",
                           "--jobs", "2")) == 0
    result = json.loads((out / "sweep.json").read_text())
    complete = [t for t in result["trials"] if t["state"] == "COMPLETE"]
    assert sorted({t["params"]["lr"] for t in complete}) == [0.005, 0.02, 0.05, 0.2]
    workers = {t["worker"] for t in complete}
    assert len(workers) == 2, (workers, (out / "workers.log").read_text()[-2000:])
    # issue item 5: two workers once trained the last point twice (7 trials for a 6-point grid)
    assert len(result["trials"]) == 4, result["trials"]


def test_method_options_are_searched_and_pruner_reports_each_epoch(folder, tmp_path):
    out = tmp_path / "sw"
    argv = ["sweep", "--backbone", "test_vit", "--img-size", "32", "--method", "vpt", "-o", "vpt:length=1,3",
            "-o", "deep=true", "--data", f"folder:{folder}", "--epochs", "2", "--batch-size", "8",
            "--grid", "lr=0.1", "--grid", "wd=0", "--seeds", "1", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    result = json.loads((out / "sweep.json").read_text())
    assert result["space"]["options.length"] == ["1", "3"]
    assert {t["params"]["options.length"] for t in result["trials"]} == {"1", "3"}
    assert all(t["last_epoch"] == 2 for t in result["trials"])  # the pruner saw every epoch's val
    final = json.loads((out / result["final"]["runs"][0]["dir"] / "metrics.json").read_text())
    assert final["options"]["length"] == int(result["best"]["params"]["options.length"])
    assert final["options"]["deep"] is True


def test_pruning_callback_stops_a_trial_through_the_loop(folder, tmp_path):
    from tests.test_engine import cfg_for
    from vistune.workflows.sweep import OptunaPruning
    from vistune.workflows.train import train

    class Trial:
        reports: list = []

        def report(self, value, step):
            self.reports.append((step, value))

        def should_prune(self):
            return True

    trial = Trial()
    with pytest.raises(optuna.TrialPruned, match="after epoch 1"):
        train(cfg_for(folder, tmp_path / "p", method="linear", epochs=3), callbacks=[OptunaPruning(trial)],
              evaluate_test=False)
    assert [s for s, _ in trial.reports] == [1]
    assert not (tmp_path / "p" / "metrics.json").exists()


def test_bad_sweep_settings_are_one_line_errors(folder, tmp_path, capsys):
    for extra in (["--grid", "lr"], ["--grid", "momentumx=1"], ["--grid", "lr=abc"], ["--sampler", "tpe"],
                  ["--jobs", "0"]):
        assert main(sweep_argv(folder, tmp_path / "x", *extra)) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0], (extra, err)


def test_a_diverging_trial_fails_alone(folder, tmp_path):
    """A learning rate that blows up is a bad configuration, not a broken sweep."""
    out = tmp_path / "sw"
    assert main(sweep_argv(folder, out, "--grid", "lr=1e9,0.01", "--grid", "wd=0", "--optimizer", "sgd",
                           "--clip-grad", "0", "--seeds", "1")) == 0
    result = json.loads((out / "sweep.json").read_text())
    states = {t["params"]["lr"]: t["state"] for t in result["trials"]}
    assert states == {1e9: "FAIL", 0.01: "COMPLETE"}
    assert result["best"]["params"]["lr"] == 0.01 and result["final"]["runs"][0]["test_top1"] is not None


def test_resuming_with_other_settings_is_refused(folder, tmp_path, capsys):
    """A finished trial folder is read back on resume: a second sweep into the same folder with
    other data or epochs would silently reuse those trials, so it is refused, naming the change."""
    out = tmp_path / "s"
    grid = ["--grid", "lr=0.05", "--grid", "wd=0", "--stage", "search"]
    assert main(sweep_argv(folder, out, *grid)) == 0
    trials = _trial_metrics(out)
    argv = sweep_argv(folder, out, *grid)
    argv[argv.index("--epochs") + 1] = "3"
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0] and "epochs: 2 there, 3 now" in err[0], err
    assert _trial_metrics(out) == trials
    assert main(sweep_argv(folder, out, *grid)) == 0  # the same settings resume as before


def test_a_study_without_recorded_settings_is_checked_against_its_trials(folder, tmp_path, capsys):
    """Studies written before settings were recorded: a trial outside the new grid is named in one
    line (Optuna's own error was 'CategoricalDistribution does not support dynamic value space')."""
    out = tmp_path / "old"
    grid = ["--grid", "wd=0", "--stage", "search"]
    assert main(sweep_argv(folder, out, "--grid", "lr=0.05", *grid)) == 0
    from vistune.workflows.sweep import open_study

    study = open_study(out, None, "vistune-sweep", "tpe", None, "none", 2, 0)
    study._storage.set_study_user_attr(study._study_id, "settings", None)  # as an old study had none
    capsys.readouterr()
    assert main(sweep_argv(folder, out, "--grid", "lr=0.01", *grid)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "searched other values (lr=0.05" in err[0], err


@pytest.mark.parametrize("journal", ["deleted", "emptied"])
def test_a_lost_journal_never_reuses_trials_trained_with_other_settings(folder, tmp_path, capsys, journal):
    """Issue item 3: with OUT/study.journal gone, a rerun with --epochs 3 read the 2-epoch trial
    folders back and reported them as 3-epoch results. Each folder's own config is compared now."""
    out = tmp_path / "s"
    grid = ["--grid", "lr=0.05", "--grid", "wd=0", "--seeds", "1"]
    assert main(sweep_argv(folder, out, *grid)) == 0
    trials = _trial_metrics(out)
    final = (out / "final" / "seed0" / "metrics.json").read_text()
    if journal == "deleted":
        (out / "study.journal").unlink()
    else:
        (out / "study.journal").write_text("")
    argv = sweep_argv(folder, out, *grid)
    argv[argv.index("--epochs") + 1] = "3"
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trials/lr=0.05,wd=0" in err[0] and "epochs: 2 there, 3 now" in err[0], err
    assert _trial_metrics(out) == trials
    # the same settings as the folders were trained with are read back (nothing retrained)
    stamp = (out / "trials" / "lr=0.05,wd=0" / "metrics.json").stat().st_mtime_ns
    assert main(sweep_argv(folder, out, *grid)) == 0
    assert (out / "trials" / "lr=0.05,wd=0" / "metrics.json").stat().st_mtime_ns == stamp
    assert (out / "final" / "seed0" / "metrics.json").read_text() == final
    assert json.loads((out / "sweep.json").read_text())["epochs"] == 2


def test_a_final_run_trained_with_other_settings_is_not_read_back(folder, tmp_path, capsys):
    """The retrain stage reads final/seed<S> back too: only when that run's config is the one asked."""
    out = tmp_path / "s"
    grid = ["--grid", "lr=0.05", "--grid", "wd=0", "--seeds", "1"]
    assert main(sweep_argv(folder, out, *grid)) == 0
    (out / "study.journal").unlink()
    import shutil

    shutil.rmtree(out / "trials")
    argv = sweep_argv(folder, out, *grid)
    argv[argv.index("--epochs") + 1] = "1"
    capsys.readouterr()
    assert main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not _progress(ln)]
    assert len(err) == 1 and "final/seed0" in err[0] and "epochs: 2 there, 1 now" in err[0], err


def test_a_truncated_journal_record_is_dropped_and_the_sweep_resumes(folder, tmp_path, capsys):
    """Issue item 6: a kill or a full disk mid-append leaves a partial last line; Optuna appended
    the next record onto it and every later resume died with a bare JSON error naming no file."""
    out = tmp_path / "s"
    argv = sweep_argv(folder, out, "--grid", "lr=0.05,0.01", "--grid", "wd=0", "--stage", "search")
    assert main([*argv, "--max-trials", "1"]) == 0
    journal = out / "study.journal"
    data = journal.read_bytes()
    journal.write_bytes(data[:-25])  # the last record (the trial's COMPLETE state) cut short
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "study.journal: dropped a partial last record (" in err and "Traceback" not in err, err
    assert (out / "study.journal.partial").read_bytes() == data[-len(data.split(b"\n")[-2]) - 1:-25] + b"\n"
    assert main(argv) == 0  # and again: the journal is sound now
    result = json.loads((out / "sweep.json").read_text())
    complete = sorted(t["params"]["lr"] for t in result["trials"] if t["state"] == "COMPLETE")
    assert complete == [0.01, 0.05], result["trials"]


@pytest.mark.parametrize("damage", ["middle", "end"])
def test_a_garbage_journal_is_refused_naming_the_file(folder, tmp_path, capsys, damage):
    out = tmp_path / "s"
    argv = sweep_argv(folder, out, "--grid", "lr=0.05", "--grid", "wd=0", "--stage", "search")
    assert main(argv) == 0
    journal = out / "study.journal"
    lines = journal.read_bytes().split(b"\n")
    if damage == "middle":
        lines.insert(1, b"\xff\xfe\x00garbage")
        journal.write_bytes(b"\n".join(lines))
    else:
        journal.write_bytes(b"\n".join(lines) + bytes(range(11, 256)))  # no newline in it
    before = journal.read_bytes()
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(journal) in err[0] and "move it away" in err[0], err
    assert ("line 2" in err[0]) if damage == "middle" else ("ends in bytes" in err[0])
    assert journal.read_bytes() == before  # nothing repaired that cannot be


def test_a_trial_whose_worker_is_alive_is_not_retried(folder, tmp_path, capsys):
    """Issue item 5: the rerun after a kill marked a trial FAIL and retried it although its worker
    (an orphan) was still training it. A worker holds a liveness lock; a held lock means alive."""
    import fcntl
    import os

    from vistune.workflows.sweep import Space, open_study, retry_stale_trials

    out = tmp_path / "s"
    out.mkdir()
    space = Space({"lr": [0.1, 0.01], "wd": [0.0]}, "adamw")
    study = open_study(out, None, "vistune-sweep", "grid", space, "none", 2, 0)
    trial = study.ask()
    trial.set_user_attr("alive", ".alive-elsewhere-1")
    trial.set_user_attr("worker", "elsewhere:1")
    fd = os.open(out / ".alive-elsewhere-1", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # the live worker's lock
    try:
        assert retry_stale_trials(study, out, wait=0) == 0
        assert "still running in elsewhere:1; not retried" in capsys.readouterr().err
        assert [t.state.name for t in study.get_trials()] == ["RUNNING"]
    finally:
        os.close(fd)  # the worker dies
    assert retry_stale_trials(study, out, wait=0) == 1
    assert [t.state.name for t in study.get_trials()] == ["FAIL", "WAITING"]
    assert not (out / ".alive-elsewhere-1").exists()


def test_killing_the_sweep_kills_its_workers(folder, tmp_path, capsys):
    """Issue item 5 with real processes: ``kill -9`` of ``sweep --jobs 2`` left the worker training
    on as an orphan (re-parented to PID 1). Workers die with their parent now, and the rerun
    then retries both trials (neither worker holds its liveness lock any more)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from vistune.workflows.sweep import Space, open_study, retry_stale_trials

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "s"
    argv = sweep_argv(folder, out, "--grid", "lr=0.05,0.01", "--grid", "wd=0", "--stage", "search")
    argv[argv.index("--epochs") + 1] = "1000"  # far longer than the test waits: only a kill ends them
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(repo / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "vistune", *argv, "--jobs", "2"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # both processes are training (an epoch logged in each trial)
            logs = list((out / "trials").glob("*/log.jsonl")) if (out / "trials").is_dir() else []
            if len(logs) == 2 and all(p.stat().st_size for p in logs):
                break
            assert proc.poll() is None, "the sweep ended before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("the two trials did not start")
        workers = [int(p.name.split("-")[1].split(".")[0]) for p in out.glob(".worker-*.ready")]
        assert len(workers) == 1
        proc.send_signal(signal.SIGKILL)
        proc.wait()

        def alive(pid: int) -> bool:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                return False
            return state not in ("Z", "X")

        deadline = time.monotonic() + 10
        while alive(workers[0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(workers[0]), "the worker outlived its killed parent"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    space = Space({"lr": [0.05, 0.01], "wd": [0.0]}, "adamw")
    study = open_study(out, None, "vistune-sweep", "grid", space, "none", 1000, 0)
    assert retry_stale_trials(study, out, wait=0) == 2
    assert "not retried" not in capsys.readouterr().err


def test_an_rdb_storage_sweep_keeps_optunas_heartbeat(folder, tmp_path, capsys):
    """The sweep runs its own ask/tell loop; with an RDB storage each trial still runs inside
    Optuna's heartbeat thread (so a dead machine's trials are retried), and nothing warns."""
    out = tmp_path / "s"
    argv = sweep_argv(folder, out, "--grid", "lr=0.05,0.01", "--grid", "wd=0", "--stage", "search",
                      "--storage", f"sqlite:///{tmp_path}/db.sqlite")
    argv[argv.index("--epochs") + 1] = "1"
    capsys.readouterr()
    assert main(argv) == 0
    assert [ln for ln in capsys.readouterr().err.splitlines() if not _progress(ln)] == []  # no warning
    study = optuna.load_study(study_name="vistune-sweep", storage=f"sqlite:///{tmp_path}/db.sqlite")
    assert sorted(t.params["lr"] for t in study.trials if t.state.name == "COMPLETE") == [0.01, 0.05]
    import sqlite3

    with sqlite3.connect(tmp_path / "db.sqlite") as db:  # each trial beat while it ran
        assert db.execute("select count(distinct trial_id) from trial_heartbeats").fetchone()[0] == 2


def test_a_point_whose_folder_another_process_holds_is_not_asked_again(folder, tmp_path, capsys):
    """A trial folder held by another process fails that trial; the loop once asked the same point
    again and again (thousands of FAIL trials). Now the point is left to its holder."""
    import signal

    from vistune.engine.rundir import FolderLock

    out = tmp_path / "s"
    holder = FolderLock(out / "trials" / "lr=0.05,wd=0")
    holder.acquire()  # "another process" (flock is per open file, so this process counts)

    def hung(*args):
        raise TimeoutError("the sweep kept asking the held point")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    try:
        assert main(sweep_argv(folder, out, "--grid", "lr=0.05,0.01", "--grid", "wd=0", "--stage", "search")) == 0
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        holder.release()
    err = capsys.readouterr().err
    assert err.count("is in use by another run") == 1, err
    result = json.loads((out / "sweep.json").read_text())
    assert sorted((t["params"]["lr"], t["state"]) for t in result["trials"]) == [(0.01, "COMPLETE"), (0.05, "FAIL")]


def test_a_lock_that_cannot_record_its_holder_is_released(tmp_path, monkeypatch):
    """A full disk while the lock file is written left the flock held by the failed run."""
    import os

    from vistune.engine import rundir

    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rundir.os, "write", full)
    with pytest.raises(OSError, match="No space left on device") as info:
        rundir.FolderLock(tmp_path / "r").acquire()
    monkeypatch.undo()
    assert info.value.filename == str(tmp_path / "r" / rundir.LOCK_NAME)
    lock = rundir.FolderLock(tmp_path / "r")
    lock.acquire()  # free again
    lock.release()
    assert os.path.exists(tmp_path / "r" / rundir.LOCK_NAME)


def test_each_trial_and_final_run_prints_one_progress_line(folder, tmp_path, capsys):
    """A sweep is never silent for minutes: one stderr line per trial and per final run, with its
    number, its own time and the elapsed time, also under --no-progress; a rerun says read back."""
    out = tmp_path / "sw"
    argv = sweep_argv(folder, out, "--grid", "lr=0.3,0.003", "--grid", "wd=0", "--seeds", "1")
    assert main(argv) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("vistune sweep: ")]
    trials = [ln for ln in lines if ": trial " in ln]
    finals = [ln for ln in lines if ": final seed 0 " in ln]
    assert len(trials) == 2 and len(finals) == 1, lines
    trial_vals = {json.loads((p / "metrics.json").read_text())["val_top1"] for p in (out / "trials").iterdir()}
    for ln in trials:
        assert " val_top1 " in ln and ln.endswith(" elapsed") and "fp32" in ln
        assert float(ln.split(" val_top1 ")[1].split()[0]) in {round(v, 2) for v in trial_vals}
    test = json.loads((out / "final" / "seed0" / "metrics.json").read_text())["test_top1"]
    assert f"test_top1 {test:.2f}" in finals[0]
    assert main(argv) == 0
    again = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("vistune sweep: ")]
    assert again and all("(read back)" in ln for ln in again)  # finished trials are not even revisited
    assert any(": final seed 0 " in ln for ln in again)
