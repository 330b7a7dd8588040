"""``vistune sweep``: the papers' protocol on Optuna — search on val, retrain the best, test once per seed.

Stage 1 (``search``) trains one run per configuration on the train split and scores it on the
validation split only (the test split is never evaluated for a trial). Configurations come from
a grid (Optuna's ``GridSampler``; VPT's lr × wd grid by default) or from Optuna's TPE sampler with
``--trials N``. Per-epoch val numbers reach Optuna's pruner (median or successive halving)
through the training loop's callbacks. Stage 2 (``final``) retrains the best configuration —
ties go to the smaller learning rate, as in VPT's ``tune_vtab.py`` — on train+val
(``--trainval``) for each seed and evaluates the test split once per seed: mean ± std.

The study lives in the output folder (``OUT/study.journal``, Optuna's journal file) unless
``--storage URL`` names any Optuna storage (e.g. PostgreSQL), so:

* a killed sweep resumes with the same command: finished trials are never re-run (their run
  folders are read back, but only when each run's own recorded config is the one asked, so a
  lost journal never passes old trials off as new), and a trial that was running when the
  process died is retried — its run resumes from its own checkpoint, so the result equals an
  uninterrupted run; a partial last journal record (a kill or a full disk mid-write) is cut off;
* ``--jobs N`` runs N worker processes on this machine against one study; they die with the
  sweep (``PR_SET_PDEATHSIG``), a trial whose worker is alive (its liveness lock held) is never
  retried, and trials are asked one process at a time, so no grid point is trained twice;
* several machines started with the same ``--storage URL`` work on one study (stale trials of a
  dead machine are retried after Optuna's heartbeat grace period); run ``--stage search`` on
  each and ``--stage final`` once.

Outputs: ``sweep.json`` (every trial, the best configuration, the final seeds), ``sweep.md``,
``sweep_grid.png`` (val over lr × wd) and ``sweep_history.png``; ``trials/<config>/`` and
``final/seed<S>/`` are ordinary run folders. ``vistune report OUT`` reads the sweep.

Default search spaces (one place: :data:`DEFAULT_SPACES`). Learning rates of the SGD grid are
VPT's base rates scaled by ``batch_size / 256``, as VPT scales them.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import typing
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vistune.config import ConfigError, TrainConfig
from vistune.engine import tracking as trk
from vistune.engine.callbacks import Callback, FitState
from vistune.engine.loop import DivergedError
from vistune.engine.rundir import (
    FolderLock,
    RunDirError,
    recorded_settings,
    settings_diff,
    settings_of,
)
from vistune.io import save_figure_atomic, write_json_atomic, write_text_atomic
from vistune.methods import get_method
from vistune.methods.base import MODULE_ADAMW_LRS, VPT_SGD_BASE_LRS
from vistune.tasks import get_task, task_of
from vistune.workflows.train import check_method, train

#: Run settings a search dimension may name besides method options.
CONFIG_DIMENSIONS = ("lr", "wd", "head_lr", "warmup_epochs", "epochs", "momentum", "optimizer")


class SweepError(ConfigError):
    """A search space, storage or stage cannot be used as asked."""


@dataclasses.dataclass
class Space:
    """The searched dimensions: ``values[name]`` for the grid (and TPE's categorical choices)."""

    values: dict[str, list[Any]]
    optimizer: str

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.values.values())


def default_space(method: str, optimizer: str | None, batch_size: int) -> Space:
    """The method's own grid (``Method.search_space``), or the given optimizer's default grid."""
    declared = get_method(method).search_space
    opt, lrs, wds = declared.optimizer, declared.lrs, declared.wds
    if optimizer and optimizer != opt:  # the user's optimizer: that optimizer's default grid
        opt = optimizer
        lrs = "vpt-sgd" if opt == "sgd" else MODULE_ADAMW_LRS
    if lrs == "vpt-sgd":
        lrs = tuple(_round(b * batch_size / 256) for b in VPT_SGD_BASE_LRS)
    return Space({"lr": list(lrs), "wd": list(wds)}, opt)


def _round(x: float) -> float:
    return float(f"{x:.4g}")


def build_space(cfg: TrainConfig, grid: Sequence[str], searched_options: dict[str, list[Any]],
                optimizer_given: str | None) -> Space:
    """The default space for ``cfg.method`` with ``--grid KEY=V1,V2`` and ``-o key=a,b`` on top."""
    space = default_space(cfg.method, optimizer_given, cfg.batch_size)
    for item in grid:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not text.strip():
            raise SweepError(f"--grid {item!r}: expected KEY=V1,V2,... (e.g. lr=0.1,0.01)")
        if key not in CONFIG_DIMENSIONS:
            raise SweepError(f"--grid {item!r}: {key!r} is not searchable; use one of {', '.join(CONFIG_DIMENSIONS)} "
                             "(method options: -o KEY=A,B)")
        space.values[key] = [_parse_value(key, v) for v in text.split(",") if v.strip()]
    for key, values in searched_options.items():
        space.values[f"options.{key}"] = values
    if "optimizer" in space.values:
        space.optimizer = ""
    return space


def _parse_value(key: str, text: str) -> Any:
    text = text.strip()
    if key == "optimizer":
        if text not in ("sgd", "adamw"):
            raise SweepError(f"--grid optimizer={text!r}: use sgd or adamw")
        return text
    try:
        value = float(text)
    except ValueError:
        raise SweepError(f"--grid {key}={text!r} is not a number") from None
    if not math.isfinite(value):
        raise SweepError(f"--grid {key}={text!r} is not a finite number")
    return int(value) if key == "epochs" else value


def split_searched_options(method: str, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """``-o length=5,10,50`` (or ``-o vpt:length=...``) on a scalar option is a search dimension;
    commas inside a list-typed option (``targets=q,v``) are its value — write ``q,v|q,k,v`` to
    search those. Returns (fixed options, searched options)."""
    hints = typing.get_type_hints(get_method(method).Options)
    fixed: dict[str, Any] = {}
    searched: dict[str, list[Any]] = {}
    for key, value in options.items():
        scope, colon, name = key.partition(":")
        if colon:
            if scope != method:
                continue
            key = name
        text = value if isinstance(value, str) else None
        annotation = hints.get(key)
        is_list = typing.get_origin(annotation) in (tuple, list) or any(
            typing.get_origin(a) in (tuple, list) for a in typing.get_args(annotation))
        if text is not None and "|" in text:
            searched[key] = [v.strip() for v in text.split("|") if v.strip()]
        elif text is not None and "," in text and not is_list:
            searched[key] = [v.strip() for v in text.split(",") if v.strip()]
        else:
            fixed[key] = value
    return fixed, searched


def trial_name(params: dict[str, Any]) -> str:
    """A run folder name that is a function of the configuration (so a retry finds its checkpoint)."""
    parts = []
    for key in sorted(params):
        value = params[key]
        text = f"{value:g}" if isinstance(value, float) else str(value)
        parts.append(f"{key.removeprefix('options.')}={text}".replace("/", "_").replace(" ", ""))
    return ",".join(parts) or "default"


def apply_params(base: TrainConfig, params: dict[str, Any], optimizer: str, **changes: Any) -> TrainConfig:
    options = dict(base.options)
    values: dict[str, Any] = {}
    for key, value in params.items():
        if key.startswith("options."):
            options[key[len("options."):]] = value
        else:
            values[key] = value
    if optimizer:
        values.setdefault("optimizer", optimizer)
    cfg = dataclasses.replace(base, options=options, **values, **changes)
    cfg.validate()
    return cfg


class OptunaPruning(Callback):
    """Feeds each epoch's val metric to an Optuna trial; raises ``optuna.TrialPruned`` when told."""

    def __init__(self, trial: Any) -> None:
        self.trial = trial

    def on_epoch_end(self, state: FitState, record: dict[str, Any]) -> None:
        import optuna

        value = record.get(f"val_{state.primary}")
        if value is None:
            return
        self.trial.report(float(value), step=record["epoch"])
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {record['epoch']} (val {value:.4g})")


# ------------------------------------------------------------------------------------------------
# The study


def repair_journal(path: Path) -> str | None:
    """Check ``OUT/study.journal`` before Optuna reads it; drop a partial last record.

    A kill or a full disk in the middle of Optuna's append leaves a last line without its end.
    Optuna skips such a line when reading, but appends the next record right after it, which
    fuses both into one undecodable line and stops every later resume with a bare JSON error. So
    the partial record is cut off here (its bytes kept in ``study.journal.partial``) and the
    caller says so; the trial it belonged to is retried like any trial a killed worker left.
    Anything else that is no journal record (garbage bytes, a damaged line in the middle) is
    refused naming the file and line: vistune cannot tell what was lost there.

    Call only while holding the sweep folder's lock (no other writer). Returns what was repaired.
    """
    if not path.is_file():
        return None
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    good = 0
    for number, line in enumerate(lines, 1):
        if not _journal_record(line):
            if number == len(lines) and not tail and line.lstrip().startswith(b"{"):
                tail = line + b"\n"  # a cut record that happens to end in a newline: also partial
                break
            raise SweepError(
                f"{path} is damaged at line {number} (not an Optuna journal record: {line[:40]!r}); restore it "
                "from a backup, or move it away to rebuild the study (finished trial folders are then read back "
                "when their settings match)")
        good += len(line) + 1
    if not tail:
        return None
    if not tail.lstrip().startswith(b"{"):
        raise SweepError(
            f"{path} ends in bytes that are no journal record (line {len(lines) + 1}: {tail[:40]!r}); restore it "
            "from a backup, or move it away to rebuild the study (finished trial folders are then read back when "
            "their settings match)")
    with open(path.with_name(path.name + ".partial"), "ab") as f:
        f.write(tail if tail.endswith(b"\n") else tail + b"\n")
    os.truncate(path, good)
    return (f"{path}: dropped a partial last record ({len(tail)} bytes, left by an interrupted write; kept in "
            f"{path.name}.partial); its trial is retried")


def _journal_record(line: bytes) -> bool:
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return False
    return isinstance(record, dict) and "op_code" in record


def _grid_sampler_class() -> Any:
    import optuna

    class GridSampler(optuna.samplers.GridSampler):
        """Optuna's grid sampler, except that it never calls ``study.stop()`` after a trial: the
        sweep runs its own ask/tell loop (see :func:`search`), which decides when the grid is done,
        and ``stop()`` outside ``optimize`` raises."""

        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            return None

    return GridSampler


def _grid_sampler(values: dict[str, list[Any]], seed: int) -> Any:
    return _grid_sampler_class()(values, seed=seed)


def open_study(out: Path, storage_url: str | None, name: str, sampler: str, space: Space, pruner: str,
               epochs: int, seed: int, direction: str = "maximize") -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if storage_url is None:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        storage: Any = JournalStorage(JournalFileBackend(str(out / "study.journal")))
    elif storage_url.startswith(("sqlite:", "postgresql", "mysql")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)
            storage = optuna.storages.RDBStorage(storage_url, heartbeat_interval=60, grace_period=180,
                                                 heartbeat_stale_trial_callback=retry)
    else:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        storage = JournalStorage(JournalFileBackend(storage_url))
    if sampler == "grid":
        samp = _grid_sampler(space.values, seed=seed)
    else:
        samp = optuna.samplers.TPESampler(seed=seed)
    if pruner == "median":
        prn: Any = optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=max(1, epochs // 2))
    elif pruner == "sha":
        prn = optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, epochs // 4), reduction_factor=3)
    else:
        prn = optuna.pruners.NopPruner()
    try:
        return optuna.create_study(study_name=name, storage=storage, sampler=samp, pruner=prn,
                                   direction=direction, load_if_exists=True)
    except Exception as err:  # noqa: BLE001 - storage errors come in many types; one line for the user
        raise SweepError(f"cannot open the study {name!r} in {storage_url or out / 'study.journal'}: {err}") from None


#: Settings that do not change what a trial computes (where it writes, how it reports).
_NOT_SETTINGS = ("out", "progress", "num_workers", "device")


def sweep_settings(base: TrainConfig, space: Space) -> dict[str, Any]:
    """What every trial of a study shares: the run settings and the searched space (as JSON)."""
    cfg = {k: v for k, v in dataclasses.asdict(base).items() if k not in _NOT_SETTINGS}
    return json.loads(json.dumps({"config": cfg, "space": space.values, "optimizer": space.optimizer}, default=str))


def check_settings(study: Any, settings: dict[str, Any], out: Path) -> None:
    """A study remembers the settings it was started with; resuming it with others would mix
    trials trained on different data or schedules (a finished trial folder is read back, not
    re-run), so that is refused with the first difference named."""
    recorded = study.user_attrs.get("settings")
    if recorded is None:
        # a study from before settings were recorded: at least its trials must lie in this space
        space = settings["space"]
        for t in study.get_trials(deepcopy=False):
            for key, value in t.params.items():
                if key not in space or value not in space[key]:
                    raise SweepError(f"{out} holds a sweep whose trials searched other values ({key}={value!r} "
                                     f"is not in this search: {key} in {space.get(key)}); use another --out, or "
                                     "delete that folder to start over")
        study.set_user_attr("settings", settings)
        return
    if recorded == settings:
        return
    diffs = []
    for part in ("config", "space", "optimizer"):
        a, b = recorded.get(part), settings.get(part)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            diffs.append(f"{part}: {a!r} there, {b!r} now")
    raise SweepError(f"{out} holds a sweep with other settings ({'; '.join(diffs[:3])}); "
                     "use another --out, or delete that folder to start over")


def trial_config(base: TrainConfig, space: Space, params: dict[str, Any], run_dir: Path, progress: bool,
                 pruning: bool) -> TrainConfig:
    """The run config of the trial with ``params`` (one place, so the read-back check and the
    training agree on it)."""
    # the pruner needs every epoch's val number; without one, the run's own val_every stands
    val_every = 1 if pruning else base.val_every
    return apply_params(base, params, space.optimizer, trainval=False, out=str(run_dir), progress=progress,
                        val_every=val_every, eval_test_every=0)


def check_trial_folders(base: TrainConfig, space: Space, out: Path) -> None:
    """Every trial folder already in ``OUT/trials`` must have been trained with this sweep's
    settings (apart from the searched ones), or it would be read back as this sweep's result.

    The study journal records the settings too, but the journal can be gone (deleted, emptied,
    a new ``--storage``) while the folders stay: then only the runs' own configs can tell.
    """
    folder = out / "trials"
    if not folder.is_dir():
        return
    wanted = trial_config(base, space, {}, folder, False, True)
    for run_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        _check_read_back(run_dir, wanted, ignore=tuple(space.values))


def _check_read_back(run_dir: Path, cfg: TrainConfig, ignore: Sequence[str] = ()) -> None:
    """A run folder is read back only when its recorded settings equal ``cfg``'s (``ignore``: the
    searched keys, when a folder is checked against the sweep rather than one grid point)."""
    recorded = recorded_settings(run_dir)
    diffs = settings_diff(recorded, settings_of(cfg.to_dict()), ignore=tuple(ignore)) if recorded is not None else []
    if diffs:
        raise SweepError(f"{run_dir} holds a run trained with other settings ({'; '.join(diffs[:3])}), so its "
                         "result cannot be reused; use another --out, or delete that folder to retrain it")


def retry_stale_trials(study: Any, out: Path | None = None, wait: float = 10.0) -> int:
    """Trials left RUNNING by a dead worker: mark them failed and queue a retry of the same
    configuration, keeping its grid point (what Optuna's heartbeat retry does for an RDB storage;
    the journal file has no heartbeat).

    A worker holds a lock on ``OUT/.alive-<host>-<pid>`` while it runs trials (the kernel drops it
    when the process dies, even by ``kill -9``), so a trial whose worker still holds its lock is
    not retried: retrying it would train its configuration twice and make the live worker fail
    with Optuna's ``UpdateFinishedTrialError``. A worker whose parent was just killed dies with it
    (see :func:`_start_workers`) a moment later, so a held lock is waited on for ``wait`` seconds.
    """
    import optuna
    from optuna.trial import TrialState

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    retried = 0
    for t in stale:
        alive = t.user_attrs.get("alive")
        if out is not None and alive and _held(out / str(alive), wait):
            print(f"vistune sweep: trial {t.number} ({_params(t.params)}) is still running in "
                  f"{t.user_attrs.get('worker')}; not retried", file=sys.stderr)
            continue
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        history = [*t.system_attrs.get("retry_history", []), t.number]
        study.add_trial(optuna.create_trial(
            state=TrialState.WAITING, params=t.params, distributions=t.distributions, user_attrs=t.user_attrs,
            system_attrs={**t.system_attrs, "failed_trial": t.number, "retry_history": history}))
        retried += 1
    if out is not None:
        for lock in out.glob(".alive-*"):  # the locks of dead workers
            if not _held(lock, 0):
                lock.unlink(missing_ok=True)
    return retried


def _held(path: Path, wait: float) -> bool:
    """Whether another process holds the flock on ``path`` (polled for up to ``wait`` seconds)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return False
            except OSError:
                if time.monotonic() >= deadline:
                    return True
                time.sleep(0.2)
    finally:
        os.close(fd)  # also releases the flock if we took it


class _Alive:
    """This process's liveness lock (see :func:`retry_stale_trials`), held until :meth:`close`."""

    def __init__(self, out: Path) -> None:
        self.name = f".alive-{os.uname().nodename}-{os.getpid()}"
        self.lock = _FileLock(out / self.name).__enter__()

    def close(self) -> None:
        self.lock.path.unlink(missing_ok=True)
        self.lock.__exit__()


class _FileLock:
    """An exclusive flock held for a ``with`` block (serialises ``study.ask`` across workers)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> _FileLock:
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def suggest(trial: Any, space: Space, sampler: str) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for key, values in space.values.items():
        numeric = all(isinstance(v, float) for v in values) and key in ("lr", "head_lr") and len(values) > 1
        if sampler == "tpe" and numeric and min(values) > 0:
            params[key] = trial.suggest_float(key, min(values), max(values), log=True)
        else:
            params[key] = trial.suggest_categorical(key, values)
    return params


def search(base: TrainConfig, space: Space, out: Path, study: Any, sampler: str, trials: int | None,
           max_trials: int | None, progress: bool, pruning: bool = True, tracking: Any = None,
           started: float | None = None) -> None:
    """This worker's share of stage 1: trials until the grid is exhausted (or N trials exist)."""
    import optuna

    started = time.perf_counter() if started is None else started

    def objective(trial: Any) -> float:
        params = suggest(trial, space, sampler)
        run_dir = out / "trials" / trial_name(params)
        trial.set_user_attr("run_dir", str(run_dir.relative_to(out)))
        trial.set_user_attr("worker", f"{os.uname().nodename}:{os.getpid()}")
        cfg = trial_config(base, space, params, run_dir, progress, pruning)
        done = run_dir / "metrics.json"
        what = f"trial {trial.number} ({_params(params)})"
        if done.is_file():  # finished before (a retried or duplicated configuration): read it back
            _check_read_back(run_dir, cfg)
            metrics = json.loads(done.read_text())
            say(what, metrics, "val", started, "read back")
        else:
            resume = (run_dir / "checkpoint.pt").is_file()
            try:
                logs = tracking.callbacks(cfg.to_dict(), f"trials/{run_dir.name}", searched=params,
                                          tags={"optuna.trial": str(trial.number)}) if tracking else []
                metrics = train(cfg, resume=resume, evaluate_test=False, callbacks=[OptunaPruning(trial), *logs])
                say(what, metrics, "val", started)
            except optuna.TrialPruned:
                print(f"vistune sweep: {what}: pruned; {_clock(time.perf_counter() - started)} elapsed",
                      file=sys.stderr, flush=True)
                raise
            except RunDirError:
                if not done.is_file():  # another worker is running this configuration right now
                    raise
                _check_read_back(run_dir, cfg)
                metrics = json.loads(done.read_text())  # ... or just finished it: its number counts
            except DivergedError as err:  # a bad setting, not a broken sweep: the trial fails, the rest go on
                trial.set_user_attr("error", str(err))
                print(f"vistune sweep: trial {trial.number} ({_params(params)}): {err}", file=sys.stderr)
                return float("nan")  # Optuna records a NaN objective as a failed trial
        key = f"val_{_primary(metrics)}"
        if metrics.get(key) is None:
            raise SweepError(f"trial {run_dir}: the run has no {key} (does the data have a val split?)")
        return float(metrics[key])

    alive = _Alive(out)
    busy: set[str] = set()  # grid points whose folder another process holds: not asked again here
    try:
        done = 0
        while max_trials is None or done < max_trials:
            # One process at a time decides whether work is left and takes it: two workers asking
            # at once both saw the last grid point free, and one trained it twice (7 trials for 6).
            with _FileLock(out / ".ask.lock"):
                _fail_stale_trials(study)
                left = _work_left(study, space, sampler, trials, busy)
                if not left:
                    break
                if isinstance(left, dict):  # the next grid point, chosen here rather than at random
                    study.enqueue_trial(left)
                with warnings.catch_warnings():  # "Heartbeat ... supposed to be used with Study.optimize":
                    warnings.simplefilter("ignore", UserWarning)  # _run_trial runs the heartbeat itself
                    trial = study.ask()
                trial.set_user_attr("alive", alive.name)
                suggest(trial, space, sampler)  # its params are in the study before the next process looks
            if not _run_trial(study, trial, objective):
                busy.add(trial_name(trial.params))
            done += 1
    finally:
        alive.close()


def _run_trial(study: Any, trial: Any, objective: Any) -> bool:
    """Optuna's ``optimize`` step without its logging: a trial's error reaches the CLI as one line.
    False when another process holds the trial's run folder."""
    import optuna
    from optuna.storages._heartbeat import get_heartbeat_thread  # what optimize() runs a trial in
    from optuna.trial import TrialState

    try:
        with get_heartbeat_thread(trial._trial_id, study._storage):  # an RDB storage's liveness signal
            value = objective(trial)
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
        return True
    except RunDirError as err:  # another worker holds this configuration's folder: not this trial's fault
        print(f"vistune sweep: trial {trial.number}: {err}", file=sys.stderr)
        study.tell(trial, state=TrialState.FAIL)
        return False
    except BaseException:
        study.tell(trial, state=TrialState.FAIL)
        raise
    finally:
        gc.collect()
    if math.isnan(value):
        study.tell(trial, state=TrialState.FAIL)
    else:
        study.tell(trial, value)
    return True


def _fail_stale_trials(study: Any) -> None:
    """An RDB storage's heartbeat retry (as ``optimize()`` does before each trial): trials of a
    dead machine become FAIL and :class:`optuna.storages.RetryHeartbeatStaleTrialCallback`
    queues them again."""
    import optuna
    from optuna.storages._heartbeat import is_heartbeat_enabled

    if is_heartbeat_enabled(study._storage):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)


def _work_left(study: Any, space: Space, sampler: str, trials: int | None,
               busy: set[str] | frozenset[str] = frozenset()) -> bool | dict[str, Any]:
    """A queued retry (True), the first grid point no trial has settled or is running (its
    params), or (TPE) fewer than N trials settled or running (True); False when nothing is left.
    ``busy`` grid points (their folder held by another process) count as taken."""
    from optuna.trial import TrialState

    all_trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in all_trials):
        return True
    taken = [t for t in all_trials if _settled(t) or t.state == TrialState.RUNNING]
    if sampler == "tpe":
        return len(taken) < (trials or 0)

    names = {trial_name(t.params) for t in taken} | set(busy)
    keys = list(space.values)
    for combo in itertools.product(*space.values.values()):
        params = dict(zip(keys, combo))
        if trial_name(params) not in names:
            return params
    return False


def _primary(metrics: dict[str, Any]) -> str:
    """The metric a run of this task kind is selected on (its task class declares it)."""
    return task_of(metrics).primary


def _settled(t: Any) -> bool:
    """A trial is settled when it completed, was pruned, or failed for its own reason (it diverged)."""
    from optuna.trial import TrialState

    return t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        t.state == TrialState.FAIL and "error" in t.user_attrs)


def _grid_done(study: Any, space: Space) -> bool:

    done = {trial_name(t.params) for t in study.get_trials(deepcopy=False) if _settled(t)}

    keys = list(space.values)
    return all(trial_name(dict(zip(keys, combo))) in done for combo in itertools.product(*space.values.values()))


def _search_complete(study: Any, space: Space, sampler: str, trials: int | None) -> bool:

    if sampler == "grid":
        return _grid_done(study, space)
    return sum(_settled(t) for t in study.get_trials(deepcopy=False)) >= (trials or 0)


def best_trial(study: Any) -> Any:
    """The best COMPLETE trial on val (in the study's direction, the task's primary metric's); ties go
    to the smaller lr, then the smaller wd (VPT)."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    if not complete:
        raise SweepError("no trial finished: nothing to select (see the trials' folders for their errors)")
    sign = 1.0 if study.direction == StudyDirection.MAXIMIZE else -1.0
    return max(complete, key=lambda t: (sign * t.value, -t.params.get("lr", 0.0), -t.params.get("wd", 0.0), -t.number))


# ------------------------------------------------------------------------------------------------
# The command


def run_sweep(
    base: TrainConfig,
    *,
    grid: Sequence[str] = (),
    optimizer_given: str | None = None,
    sampler: str = "grid",
    trials: int | None = None,
    pruner: str = "median",
    seeds: Sequence[int] = (0, 1, 2),
    trainval: bool = False,
    storage: str | None = None,
    study_name: str = "vistune-sweep",
    jobs: int = 1,
    stage: str = "all",
    max_trials: int | None = None,
    worker: bool = False,
    argv: Sequence[str] | None = None,
    tracking: Any = None,
) -> dict[str, Any]:
    """Run (or resume) the sweep into ``base.out``; returns what ``sweep.json`` holds.

    ``tracking`` (:class:`vistune.engine.tracking.Tracking`, from ``--log``) logs every trial and
    final retrain as a run of its own, nested under one MLflow run of the sweep."""
    started = time.perf_counter()
    _check_sweep_args(sampler, trials, stage, jobs, seeds)
    fixed, searched = split_searched_options(base.method, base.options)
    base = dataclasses.replace(base, options=fixed)
    check_method(base)
    space = build_space(base, grid, searched, optimizer_given)
    out = Path(base.out)
    lock = FolderLock(out, what="sweep")
    if not worker:
        lock.acquire()
    try:
        study = _open_sweep_study(base, space, out, storage, study_name, sampler, pruner, worker)
        tracking = trk.for_sweep(tracking, study, out.name, worker=worker)
        if stage in ("all", "search"):
            _search_stage(base, space, out, study, sampler, trials, max_trials, pruner, storage, jobs, worker,
                          argv, tracking, started)
        if worker:
            return {}
        result = summarise(study, space, out, base)
        if stage == "final" or (stage == "all" and _search_complete(study, space, sampler, trials)):
            result["final"] = final_stage(base, space, study, out, seeds, trainval, tracking, started)
        write_outputs(out, result)
        trk.finish_sweep(tracking, result, [out / "sweep.json", out / "sweep.md"])
        return result
    except BaseException:
        if not worker:
            trk.fail_sweep(tracking)
        raise
    finally:
        lock.release()


def _check_sweep_args(sampler: str, trials: int | None, stage: str, jobs: int, seeds: Sequence[int]) -> None:
    """The sweep's own flags, refused before the folder is locked or anything is read."""
    if sampler not in ("grid", "tpe"):
        raise SweepError(f"--sampler must be grid or tpe, got {sampler!r}")
    if sampler == "tpe" and not trials:
        raise SweepError("--sampler tpe needs --trials N")
    if stage not in ("all", "search", "final"):
        raise SweepError(f"--stage must be all, search or final, got {stage!r}")
    if jobs < 1:
        raise SweepError(f"--jobs must be >= 1, got {jobs}")
    if not seeds:
        raise SweepError("--seeds must be >= 1")


def _open_sweep_study(base: TrainConfig, space: Space, out: Path, storage: str | None, study_name: str,
                      sampler: str, pruner: str, worker: bool) -> Any:
    """The Optuna study (a local journal repaired first), refused when its recorded settings differ."""
    if not worker:  # before the study records this sweep's settings: a refusal changes nothing
        check_trial_folders(base, space, out)
    if not worker and storage is None:
        repaired = repair_journal(out / "study.journal")
        if repaired:
            print(f"vistune sweep: {repaired}", file=sys.stderr)
    direction = "maximize" if get_task(base.task).higher_is_better else "minimize"
    study = open_study(out, storage, study_name, sampler, space, pruner, base.epochs, base.seed,
                       direction=direction)
    check_settings(study, sweep_settings(base, space), out)
    return study


def _search_stage(base: TrainConfig, space: Space, out: Path, study: Any, sampler: str,
                  trials: int | None, max_trials: int | None, pruner: str, storage: str | None, jobs: int,
                  worker: bool, argv: Sequence[str] | None, tracking: Any, started: float) -> None:
    """Run trials in this process, beside ``jobs - 1`` workers the first process starts (a worker
    itself only searches); stale trials of a killed worker are retried first."""
    if not worker:
        if storage is None:
            n = retry_stale_trials(study, out)
            if n:
                print(f"vistune sweep: retrying {n} trial(s) a killed worker left running", file=sys.stderr)
        children = _start_workers(jobs - 1, argv or [], out)
    else:
        die_with_parent()
        (out / f".worker-{os.getpid()}.ready").touch()  # tells the first process this worker is in
    search(base, space, out, study, sampler, trials, max_trials, base.progress, pruner != "none", tracking,
           started)
    if not worker:
        _wait(children, out)


def _start_workers(n: int, argv: Sequence[str], out: Path) -> list[subprocess.Popen]:
    """``--jobs N``: N-1 more processes of this very command, each a worker on the same study."""
    if n <= 0:
        return []
    threads = max(1, (os.cpu_count() or 1) // (n + 1))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    import torch

    torch.set_num_threads(threads)
    cmd = [sys.executable, "-m", "vistune", *argv, "--worker", "--jobs", "1"]
    for old in out.glob(".worker-*.ready"):
        old.unlink()
    with open(out / "workers.log", "a") as f:
        children = [subprocess.Popen(cmd, env={**env, PARENT_ENV: str(os.getpid())}, stdout=f,
                                     stderr=subprocess.STDOUT) for _ in range(n)]
    # Start searching only once every worker has joined the study (importing torch takes seconds),
    # so the first trials are shared out rather than all taken by this process.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(out.glob(".worker-*.ready"))) < n:
        if any(c.poll() is not None for c in children):
            break
        time.sleep(0.2)
    return children


#: The environment variable that tells a ``--jobs`` worker which process started it.
PARENT_ENV = "VISTUNE_SWEEP_PARENT"


def die_with_parent() -> None:
    """Make this ``--jobs`` worker die when the sweep process that started it dies.

    Without it, ``kill -9`` of the sweep left its workers running as orphans (re-parented to
    PID 1): the rerun retried their trials, and the orphans then failed on trials that were no
    longer theirs. Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, called by the worker itself (not
    in a ``preexec_fn``, which is unsafe once torch has started threads); a parent that died
    before that call is caught by comparing ``getppid()`` with the recorded parent. Elsewhere
    nothing is set, and the rerun's liveness check still keeps a live worker's trial from
    being retried.
    """
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):
        os._exit(1)


def _wait(children: list[subprocess.Popen], out: Path | None = None) -> None:
    codes = [c.wait() for c in children]
    if out is not None:
        for ready in out.glob(".worker-*.ready"):
            ready.unlink(missing_ok=True)
    bad = [c for c in codes if c != 0]
    if bad:
        print(f"vistune sweep: {len(bad)} worker(s) exited with {bad}; see workers.log", file=sys.stderr)


def summarise(study: Any, space: Space, out: Path, base: TrainConfig) -> dict[str, Any]:
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.WAITING:
            continue
        rows.append({"number": t.number, "state": t.state.name, "params": dict(t.params), "value": t.value,
                     "last_epoch": max(t.intermediate_values) if t.intermediate_values else None,
                     "run_dir": t.user_attrs.get("run_dir"), "worker": t.user_attrs.get("worker"),
                     "error": t.user_attrs.get("error")})
    result: dict[str, Any] = {
        "format": "vistune.sweep/1", "task": base.task, "method": base.method, "options": base.options,
        "data": base.data,
        "backbone": base.backbone, "img_size": base.img_size, "epochs": base.epochs,
        "batch_size": base.batch_size, "seed": base.seed, "optimizer": space.optimizer or None,
        "space": space.values, "grid_size": space.grid_size(), "trials": rows, "best": None,
    }
    try:
        best = best_trial(study)
        result["best"] = {"number": best.number, "params": dict(best.params), "val": best.value,
                          "run_dir": best.user_attrs.get("run_dir")}
    except SweepError:
        pass
    return result


def final_stage(base: TrainConfig, space: Space, study: Any, out: Path, seeds: Sequence[int],
                trainval: bool, tracking: Any = None, started: float | None = None) -> dict[str, Any]:
    """Retrain the best configuration per seed (on train+val with ``trainval``); test once each."""
    started = time.perf_counter() if started is None else started

    best = best_trial(study)
    runs = []
    for seed in seeds:
        run_dir = out / "final" / f"seed{seed}"
        cfg = apply_params(base, dict(best.params), space.optimizer, seed=seed, trainval=trainval, out=str(run_dir),
                           select="last")
        done = run_dir / "metrics.json"
        what = f"final seed {seed} ({_params(dict(best.params))})"
        if done.is_file():
            _check_read_back(run_dir, cfg)
            m = json.loads(done.read_text())
            say(what, m, "test", started, "read back")
        else:
            logs = tracking.callbacks(cfg.to_dict(), f"final/seed{seed}", searched=best.params) if tracking else ()
            m = train(cfg, resume=(run_dir / "checkpoint.pt").is_file(), callbacks=logs)
            say(what, m, "test", started)
        primary = _primary(m)
        runs.append({"seed": seed, f"test_{primary}": m.get(f"test_{primary}"), "dir": str(run_dir.relative_to(out)),
                     "tuned_params": m.get("tuned_params"), "head_params": m.get("head_params"),
                     "train_seconds": m.get("train_seconds")})
    primary = next(k for k in runs[0] if k.startswith("test_"))
    values = [r[primary] for r in runs if r[primary] is not None]
    return {"params": dict(best.params), "trainval": trainval, "metric": primary, "runs": runs,
            "mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def say(what: str, metrics: dict[str, Any], split: str, started: float, note: str = "") -> None:
    """One progress line per trial and final run (stderr): its number, its own time, the sweep's.

    Printed also with ``--no-progress`` (which only drops the per-epoch bars): a sweep of a few
    runs otherwise sits silent for minutes."""
    key = f"{split}_{_primary(metrics)}"
    value = metrics.get(key)
    number = f"{key} {value:.2f}" if isinstance(value, (int, float)) else f"{key} -"
    own = note if note else f"{metrics.get('train_seconds') or 0:.0f} s, {metrics.get('precision', '?')}"
    print(f"vistune sweep: {what}: {number} ({own}); {_clock(time.perf_counter() - started)} elapsed",
          file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# sweep: {result['method']} on {result['data']}", ""]
    keys = list(result["space"])
    lines.append("| trial | state | " + " | ".join(k.removeprefix("options.") for k in keys) + " | val |")
    lines.append("|---|---|" + "---|" * len(keys) + "---|")
    done = [r for r in result["trials"] if r["value"] is not None]
    for r in sorted(done, key=lambda r: -r["value"]) + [r for r in result["trials"] if r["value"] is None]:
        cells = [_fmt(r["params"].get(k)) for k in keys]
        val = "-" if r["value"] is None else f"{r['value']:.2f}"
        lines.append(f"| {r['number']} | {r['state'].lower()} | " + " | ".join(cells) + f" | {val} |")
    if result.get("best"):
        b = result["best"]
        lines += ["", f"best on val: trial {b['number']} ({_params(b['params'])}), val {b['val']:.2f}"]
    final = result.get("final")
    if final:
        where = "train+val" if final["trainval"] else "train"
        per_seed = ", ".join(f"{r[final['metric']]:.2f}" for r in final["runs"] if r[final["metric"]] is not None)
        lines += ["", f"retrained on {where}, {len(final['runs'])} seeds: {final['metric']} "
                      f"**{final['mean']:.2f} ± {final['std']:.2f}** ({per_seed})"]
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k.removeprefix('options.')}={_fmt(v)}" for k, v in params.items())


def write_outputs(out: Path, result: dict[str, Any]) -> None:
    write_json_atomic(out / "sweep.json", result)
    write_text_atomic(out / "sweep.md", markdown(result))
    plot_grid(result, out / "sweep_grid.png")
    plot_history(result, out / "sweep_history.png")


def plot_grid(result: dict[str, Any], path: Path) -> None:
    """Val metric over lr × wd (the max over any other searched dimension); pruned = grey."""
    space = result["space"]
    if "lr" not in space or "wd" not in space:
        return
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lrs, wds = sorted(space["lr"]), sorted(space["wd"])
    grid = [[math.nan] * len(lrs) for _ in wds]
    for r in result["trials"]:
        p, v = r["params"], r["value"]
        if v is None or p.get("lr") not in lrs or p.get("wd") not in wds:
            continue
        i, j = wds.index(p["wd"]), lrs.index(p["lr"])
        grid[i][j] = v if math.isnan(grid[i][j]) else max(grid[i][j], v)
    fig = Figure(figsize=(1.2 + 0.75 * len(lrs), 1.2 + 0.5 * len(wds)))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    im = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
    for i in range(len(wds)):
        for j in range(len(lrs)):
            if not math.isnan(grid[i][j]):
                ax.text(j, i, f"{grid[i][j]:.1f}", ha="center", va="center", fontsize=7, color="white")
    ax.set_xticks(range(len(lrs)), [f"{v:g}" for v in lrs], rotation=45)
    ax.set_yticks(range(len(wds)), [f"{v:g}" for v in wds])
    ax.set_xlabel("learning rate")
    ax.set_ylabel("weight decay")
    best = result.get("best")
    title = f"{result['method']}: val over the grid"
    if best:
        title += f" (best {best['val']:.1f})"
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)


def plot_history(result: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    done = sorted((r["number"], r["value"]) for r in result["trials"] if r["value"] is not None)
    if not done:
        return
    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    xs, ys = zip(*done)
    best, running = [], -math.inf
    for y in ys:
        running = max(running, y)
        best.append(running)
    ax.plot(xs, ys, "o", label="trial (val)", alpha=0.7)
    ax.step(xs, best, where="post", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("val metric")
    ax.set_title(f"{result['method']}: optimisation history", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)


def sweep_row(path: Path) -> dict[str, Any] | None:
    """A report row for a sweep folder (``vistune report``)."""
    f = path / "sweep.json"
    if not f.is_file():
        return None
    result = json.loads(f.read_text())
    final, best = result.get("final") or {}, result.get("best") or {}
    runs = final.get("runs") or [{}]
    # speed and memory are per run, not averaged: show the first retrained seed's, as for train s
    first = path / runs[0]["dir"] / "metrics.json" if runs[0].get("dir") else None
    speed = json.loads(first.read_text()) if first is not None and first.is_file() else {}
    task = task_of({"task": result.get("task") or speed.get("task")})
    test_key = final.get("metric") or f"test_{task.primary}"  # test_<primary> of the sweep's task
    return {"method": result["method"], "options": {**result.get("options", {}),
                                                       **{k.removeprefix("options."): v for k, v in best.get("params", {}).items()}},
            "task": task.name, test_key: final.get("mean"), f"{test_key}_std": final.get("std"),
            "seeds": len(final.get("runs") or []), "val_" + test_key.removeprefix("test_"): best.get("val"), "tuned_params": runs[0].get("tuned_params"),
            "head_params": runs[0].get("head_params"), "train_seconds": runs[0].get("train_seconds"),
            "train_img_per_s": speed.get("train_img_per_s"), "peak_memory_mb": speed.get("peak_memory_mb"),
            "trials": len(result.get("trials", [])), "sweep": str(path),
            "machine": speed.get("machine"), "precision": speed.get("precision")}


__all__ = ["OptunaPruning", "Space", "SweepError", "run_sweep", "sweep_row"]
