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
  folders are read back), and a trial that was running when the process died is retried —
  its run resumes from its own checkpoint, so the result equals an uninterrupted run;
* ``--jobs N`` runs N worker processes on this machine against one study;
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
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vistune.config import ConfigError, TrainConfig
from vistune.engine.callbacks import Callback, FitState
from vistune.engine.loop import DivergedError
from vistune.engine.rundir import FolderLock, RunDirError
from vistune.io import save_figure_atomic, write_json_atomic, write_text_atomic
from vistune.methods import get_method
from vistune.methods.base import MODULE_ADAMW_LRS, VPT_SGD_BASE_LRS


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
    import typing

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


def open_study(out: Path, storage_url: str | None, name: str, sampler: str, space: Space, pruner: str,
               epochs: int, seed: int, create: bool = True) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if storage_url is None:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        storage: Any = JournalStorage(JournalFileBackend(str(out / "study.journal")))
    elif storage_url.startswith(("sqlite:", "postgresql", "mysql")):
        import warnings

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
        samp = optuna.samplers.GridSampler(space.values, seed=seed)
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
                                   direction="maximize", load_if_exists=True)
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


def retry_stale_trials(study: Any) -> int:
    """Trials left RUNNING by a dead worker (we hold the sweep's lock, so no local worker is alive):
    mark them failed and queue a retry of the same configuration, keeping its grid point (what
    Optuna's heartbeat retry does for an RDB storage; the journal file has no heartbeat)."""
    import optuna
    from optuna.trial import TrialState

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        history = [*t.system_attrs.get("retry_history", []), t.number]
        study.add_trial(optuna.create_trial(
            state=TrialState.WAITING, params=t.params, distributions=t.distributions, user_attrs=t.user_attrs,
            system_attrs={**t.system_attrs, "failed_trial": t.number, "retry_history": history}))
    return len(stale)


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
           max_trials: int | None, progress: bool, pruning: bool = True, tracking: Any = None) -> None:
    """This worker's share of stage 1: trials until the grid is exhausted (or N trials exist)."""

    from vistune.workflows.train import train

    def objective(trial: Any) -> float:
        params = suggest(trial, space, sampler)
        run_dir = out / "trials" / trial_name(params)
        trial.set_user_attr("run_dir", str(run_dir.relative_to(out)))
        trial.set_user_attr("worker", f"{os.uname().nodename}:{os.getpid()}")
        # the pruner needs every epoch's val number; without one, the run's own val_every stands
        val_every = 1 if pruning else base.val_every
        cfg = apply_params(base, params, space.optimizer, trainval=False, out=str(run_dir), progress=progress,
                           val_every=val_every, eval_test_every=0)
        done = run_dir / "metrics.json"
        if done.is_file():  # finished before (a retried or duplicated configuration): read it back
            metrics = json.loads(done.read_text())
        else:
            resume = (run_dir / "checkpoint.pt").is_file()
            try:
                logs = tracking.callbacks(cfg.to_dict(), f"trials/{run_dir.name}", searched=params,
                                          tags={"optuna.trial": str(trial.number)}) if tracking else []
                metrics = train(cfg, resume=resume, evaluate_test=False, callbacks=[OptunaPruning(trial), *logs])
            except RunDirError:
                if not done.is_file():  # another worker is running this configuration right now
                    raise
                metrics = json.loads(done.read_text())  # ... or just finished it: its number counts
            except DivergedError as err:  # a bad setting, not a broken sweep: the trial fails, the rest go on
                trial.set_user_attr("error", str(err))
                print(f"vistune sweep: trial {trial.number} ({_params(params)}): {err}", file=sys.stderr)
                return float("nan")  # Optuna records a NaN objective as a failed trial
        key = f"val_{_primary(metrics)}"
        if metrics.get(key) is None:
            raise SweepError(f"trial {run_dir}: the run has no {key} (does the data have a val split?)")
        return float(metrics[key])

    def finished() -> int:
        return sum(_settled(t) for t in study.get_trials(deepcopy=False))

    n_trials = max_trials
    if sampler == "tpe":
        left = max(0, (trials or 0) - finished())
        n_trials = left if max_trials is None else min(left, max_trials)
        if n_trials == 0:
            return
    elif _grid_done(study, space):
        return
    study.optimize(objective, n_trials=n_trials, catch=(RunDirError,), gc_after_trial=True)


def _primary(metrics: dict[str, Any]) -> str:
    return {"classify": "top1", "segment": "miou", "detect": "map50"}.get(metrics.get("task", "classify"), "top1")


def _settled(t: Any) -> bool:
    """A trial is settled when it completed, was pruned, or failed for its own reason (it diverged)."""
    from optuna.trial import TrialState

    return t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        t.state == TrialState.FAIL and "error" in t.user_attrs)


def _grid_done(study: Any, space: Space) -> bool:

    done = {trial_name(t.params) for t in study.get_trials(deepcopy=False) if _settled(t)}
    import itertools

    keys = list(space.values)
    return all(trial_name(dict(zip(keys, combo))) in done for combo in itertools.product(*space.values.values()))


def _search_complete(study: Any, space: Space, sampler: str, trials: int | None) -> bool:

    if sampler == "grid":
        return _grid_done(study, space)
    return sum(_settled(t) for t in study.get_trials(deepcopy=False)) >= (trials or 0)


def best_trial(study: Any) -> Any:
    """The best COMPLETE trial on val; ties go to the smaller lr, then the smaller wd (VPT)."""
    from optuna.trial import TrialState

    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    if not complete:
        raise SweepError("no trial finished: nothing to select (see the trials' folders for their errors)")
    return max(complete, key=lambda t: (t.value, -t.params.get("lr", 0.0), -t.params.get("wd", 0.0), -t.number))


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
    from vistune.engine import tracking as trk

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
    from vistune.workflows.train import check_method

    fixed, searched = split_searched_options(base.method, base.options)
    base = dataclasses.replace(base, options=fixed)
    check_method(base)
    space = build_space(base, grid, searched, optimizer_given)
    out = Path(base.out)
    lock = FolderLock(out, what="sweep")
    if not worker:
        lock.acquire()
    try:
        study = open_study(out, storage, study_name, sampler, space, pruner, base.epochs, base.seed)
        check_settings(study, sweep_settings(base, space), out)
        tracking = trk.for_sweep(tracking, study, out.name, worker=worker)
        if stage in ("all", "search"):
            if not worker:
                if storage is None:
                    n = retry_stale_trials(study)
                    if n:
                        print(f"vistune sweep: retrying {n} trial(s) a killed worker left running", file=sys.stderr)
                children = _start_workers(jobs - 1, argv or [], out)
            else:
                (out / f".worker-{os.getpid()}.ready").touch()  # tells the first process this worker is in
            search(base, space, out, study, sampler, trials, max_trials, base.progress, pruner != "none", tracking)
            if not worker:
                _wait(children, out)
        if worker:
            return {}
        result = summarise(study, space, out, base)
        if stage == "final" or (stage == "all" and _search_complete(study, space, sampler, trials)):
            result["final"] = final_stage(base, space, study, out, seeds, trainval, tracking)
        write_outputs(out, result)
        trk.finish_sweep(tracking, result, [out / "sweep.json", out / "sweep.md"])
        return result
    except BaseException:
        if not worker:
            trk.fail_sweep(tracking)
        raise
    finally:
        lock.release()


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
        children = [subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT) for _ in range(n)]
    # Start searching only once every worker has joined the study (importing torch takes seconds),
    # so the first trials are shared out rather than all taken by this process.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(out.glob(".worker-*.ready"))) < n:
        if any(c.poll() is not None for c in children):
            break
        time.sleep(0.2)
    return children


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
        "format": "vistune.sweep/1", "method": base.method, "options": base.options, "data": base.data,
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
                trainval: bool, tracking: Any = None) -> dict[str, Any]:
    """Retrain the best configuration per seed (on train+val with ``trainval``); test once each."""
    from vistune.workflows.train import train

    best = best_trial(study)
    runs = []
    for seed in seeds:
        run_dir = out / "final" / f"seed{seed}"
        cfg = apply_params(base, dict(best.params), space.optimizer, seed=seed, trainval=trainval, out=str(run_dir),
                           select="last")
        done = run_dir / "metrics.json"
        if done.is_file():
            m = json.loads(done.read_text())
        else:
            logs = tracking.callbacks(cfg.to_dict(), f"final/seed{seed}", searched=best.params) if tracking else ()
            m = train(cfg, resume=(run_dir / "checkpoint.pt").is_file(), callbacks=logs)
        primary = _primary(m)
        runs.append({"seed": seed, f"test_{primary}": m.get(f"test_{primary}"), "dir": str(run_dir.relative_to(out)),
                     "tuned_params": m.get("tuned_params"), "head_params": m.get("head_params"),
                     "train_seconds": m.get("train_seconds")})
    primary = next(k for k in runs[0] if k.startswith("test_"))
    values = [r[primary] for r in runs if r[primary] is not None]
    return {"params": dict(best.params), "trainval": trainval, "metric": primary, "runs": runs,
            "mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


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
    return {"method": result["method"], "options": {**result.get("options", {}),
                                                       **{k.removeprefix("options."): v for k, v in best.get("params", {}).items()}},
            "test_top1": final.get("mean"), "test_top1_std": final.get("std"), "seeds": len(final.get("runs") or []),
            "val_top1": best.get("val"), "tuned_params": runs[0].get("tuned_params"),
            "head_params": runs[0].get("head_params"), "train_seconds": runs[0].get("train_seconds"),
            "train_img_per_s": speed.get("train_img_per_s"), "peak_memory_mb": speed.get("peak_memory_mb"),
            "trials": len(result.get("trials", [])), "sweep": str(path),
            "machine": speed.get("machine"), "precision": speed.get("precision")}


__all__ = ["OptunaPruning", "Space", "SweepError", "run_sweep", "sweep_row"]
