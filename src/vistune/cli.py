"""Command line: ``vistune info|weights|train|eval|...``.

Every vistune module that pulls in torch or timm is imported inside the command that needs it (the
only function-local vistune imports here), so ``vistune --help`` stays instant.
Every user error ends in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import typing
import warnings
from collections.abc import Sequence
from pathlib import Path

from vistune import __version__
from vistune.config import PRECISIONS, load_config_file, make_config
from vistune.errors import VistuneError
from vistune.methods import get_method, method_names
from vistune.plugins import PluginWarning, load_plugin
from vistune.tasks import task_help, task_names, task_of


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error contract: one line on stderr, exit 2.

    Plain argparse prints the whole usage block first (twenty lines for ``train``), which
    buries the one line that says what is wrong; ``--help`` still shows the usage.
    """

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(text: object) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _number(kind: type, minimum: float | None = None, above: bool = False):
    """An argparse ``type`` for a finite int/float with a lower bound, refused at parse time."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if minimum is not None and (value <= minimum if above else value < minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if above else '>='} {minimum:g}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


_positive_int = _number(int, 1)
_count = _number(int, 0)
_positive_float = _number(float, 0, above=True)


def _method_help() -> str:
    """The registry's names, built-ins and plugins (vistune.methods imports no torch or plugin code
    to list them); computed when the parser is built, after ``--plugin`` modules registered theirs."""
    return "tuning method: " + ", ".join(method_names())


def _many_few(text: str) -> tuple[int, int]:
    """``--group-thresholds MANY,FEW``: two integers (their order, MANY >= FEW >= 0, is checked
    with the rest of the run config, so a YAML file gets the same rule)."""
    parts = [t.strip() for t in text.split(",")]
    try:
        many, few = (int(t) for t in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MANY,FEW training-image counts (e.g. 100,20), got {text!r}") from None
    return many, few


def _add_backbone_args(p: argparse.ArgumentParser, method_required: bool = True) -> None:
    p.add_argument("--backbone", required=True, help="timm model name or vistune weights name (dinov2-s14, ...)")
    p.add_argument("--weights", default=None, help="vistune weights name or a local weights file")
    p.add_argument("--img-size", type=_positive_int, default=None,
                   help="input resolution (ViT position embeddings are resampled)")
    p.add_argument("--method", required=method_required, help=_method_help())
    p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE", help="method option (repeatable)")


class _HelpWithMethodOptions(argparse.Action):
    """``vistune info --method X --help``: the usual help, then X's options table, generated from
    the option declarations on the method (``methods.base.option``), so it never drifts from them."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        method = getattr(namespace, "method", None)
        rows: list[dict] = []
        if method:
            from vistune.methods.base import option_table

            try:
                rows = option_table(get_method(method).Options)
            except ValueError as err:
                parser.exit(2, f"{parser.prog}: error: {_one_line(err)}\n")
        parser.print_help()
        if method:
            print(f"\noptions of method {method} (-o KEY=VALUE):" if rows else f"\nmethod {method} has no options")
            for r in rows:
                bounds = f"; {r['bounds']}" if r["bounds"] else ""
                print(f"  {r['name']} ({r['type']}, default {json.dumps(r['default'])}{bounds})\n      {r['help']}")
        parser.exit()


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from vistune.backbones import create_backbone
    from vistune.methods import parse_kv  # lives in methods.base, which imports torch
    from vistune.tuning import attach

    options = parse_kv(args.option)
    if args.weights is None and not args.load_weights:
        # No weights are needed to count parameters: build on the meta device, allocate nothing.
        with torch.device("meta"):
            model = create_backbone(args.backbone, img_size=args.img_size,
                                    num_classes=args.num_classes, load_weights=False)
    else:
        model = create_backbone(args.backbone, weights=args.weights, img_size=args.img_size,
                                num_classes=args.num_classes)
    tuned = attach(model, args.method, **options)
    report = tuned.parameter_report()
    info = model.vistune_info
    report.update(img_size=info.img_size, mean=list(info.mean), std=list(info.std), weights=info.weights)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"backbone   {report['backbone']} (img {info.img_size}, weights: {info.weights or 'none'})")
        print(f"method     {report['method']} {json.dumps(report['options'])}")
        tuned.print_trainable_parameters()
        print(f"mergeable  {report['mergeable']}")
    return 0


def _add_train_args(p: argparse.ArgumentParser, multi_data: bool = False, shots: bool = True,
                    runs: bool = True) -> None:
    """Every TrainConfig key as a flag; defaults are None so a --config file's values survive."""
    p.add_argument("--config", default=None, help="YAML file with the same keys as the flags")
    p.add_argument("--backbone", default=None, help="timm model name or vistune weights name (dinov2-s14, ...)")
    p.add_argument("--weights", default=None, help="vistune weights name or a local weights file")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--method", default=None, help=_method_help())
    p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE", help="method option (repeatable)")
    data_help = ("fashion-mnist | npz:PATH | folder:PATH | vtab:PATH/TASK | fgvc:PATH | hf:NAME_OR_PATH[:CONFIG] | "
                 "tv:NAME | wds:DIR (dense: camvid:PATH | voc:PATH | pennfudan:PATH)")
    if multi_data:
        p.add_argument("--data", action="append", default=None, help=data_help + " (repeatable: several sources)")
    else:
        p.add_argument("--data", default=None, help=data_help)
    p.add_argument("--data-root", default=None, help="tv: data: torchvision's folder (default ~/.cache/vistune/data)")
    p.add_argument("--image-column", default=None, help="hf: data: the image column (default: the first Image)")
    p.add_argument("--label-column", default=None, help="hf: data: the label column (default: the first ClassLabel)")
    if shots:
        p.add_argument("--shots", type=int, default=None, help="K examples per class from the training split")
    p.add_argument("--subset", default=None, metavar="TRAIN/VAL",
                   help="VTAB-1k protocol: e.g. 800/200 random training images as train/val (test untouched)")
    if not multi_data:
        p.add_argument("--imbalance", type=_number(float, 1), default=None, metavar="R",
                       help="long-tailed training split (CIFAR-10-LT): class at rank c of a seeded order keeps "
                            "int(n_max * R^(-c/(C-1))) images; 1 = as is; val/test untouched (README 'Class imbalance')")
        p.add_argument("--group-thresholds", type=_many_few, default=None, metavar="MANY,FEW",
                       help="many-/medium-/few-shot class groups of the test metrics: more than MANY, "
                            "FEW..MANY, fewer than FEW training images (default 100,20)")
    p.add_argument("--head-init", choices=["random", "zeros", "prototypes"], default=None,
                   help="classification head start: timm's random init, zeros, or normalised class-mean prototypes")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="the global batch (split over processes)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--head-lr", type=float, default=None, help="the head's learning rate (default: --lr)")
    p.add_argument("--wd", type=float, default=None)
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default=None)
    p.add_argument("--warmup-epochs", type=float, default=None)
    p.add_argument("--clip-grad", type=float, default=None)
    p.add_argument("--accum-steps", type=int, default=None)
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="auto (default): bf16 autocast where the hardware runs it natively (CUDA with bf16, a CPU "
                        "with AVX512-BF16/AMX), else fp32; fp16: CUDA only, with a gradient scaler")
    p.add_argument("--augment", choices=["flip"], default=None)
    p.add_argument("--compile", nargs="?", const="on", default=None, choices=["on", "off", "auto"],
                   help="torch.compile the training forward (classification; eval stays eager). --compile = on; "
                        "auto: measure the first eager steps and compile only if the run's remaining steps repay the "
                        "compile (0-18%% off a step on CPU, per method; the compile costs 30-50 s); default off")
    p.add_argument("--trainval", action="store_const", const=True, default=None,
                   help="train on train+val (VTAB's final protocol); no validation split")
    p.add_argument("--select", choices=["last", "best-val"], default=None,
                   help="which epoch is tested: the last (VPT protocol) or the best on val")
    p.add_argument("--val-every", type=int, default=None, help="evaluate val every N epochs (default 1)")
    p.add_argument("--eval-test-every", type=int, default=None,
                   help="also evaluate test every N epochs (reported as periodic_test, never used for selection)")
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--max-per-split", type=int, default=None, help="cap each split (quick runs)")
    p.add_argument("--init-from", default=None, help="PVP: initialise the method's modules from a tuned/pretrained file")
    p.add_argument("--freeze-modules", action="store_const", const=True, default=None,
                   help="with --init-from: keep the loaded modules frozen, train the head only")
    p.add_argument("--sensitivity", default=None, help="SPT: sensitivity scores file (computed there when absent)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="output folder (tuned.safetensors, metrics.json, log.jsonl)")
    p.add_argument("--no-progress", action="store_true")
    if runs:
        p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
        p.add_argument("--overwrite", action="store_true", help="replace a finished or unfinished run in --out")
        p.add_argument("--nproc", type=int, default=None,
                       help="data-parallel processes on this machine (launches torchrun; see README 'Scale out')")


def _add_tracking_args(p: argparse.ArgumentParser) -> None:
    """``--log``: experiment tracking, kept out of TrainConfig (where a run is watched from is not
    part of what it computes, so a sweep resumed with another --log is the same experiment)."""
    p.add_argument("--log", action="append", choices=["tensorboard", "mlflow"], default=None,
                   help="log steps, epochs, final metrics and the config to TensorBoard and/or MLflow (repeatable; "
                        "pip install 'vistune[tracking]'; README 'Experiment tracking')")
    p.add_argument("--log-dir", default=None, help="TensorBoard folder (default OUT/tb)")
    p.add_argument("--mlflow-uri", default=None,
                   help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else file:OUT/mlruns)")
    p.add_argument("--mlflow-experiment", default=None, help="MLflow experiment name (default vistune)")


def _tracking(args: argparse.Namespace, out: str | None):
    """The checked ``--log`` choices (None without --log); refused before anything is written."""
    from vistune.engine.tracking import build_tracking

    return build_tracking(args.log, out, log_dir=args.log_dir, mlflow_uri=args.mlflow_uri,
                          experiment=args.mlflow_experiment)


_CONFIG_FLAGS = ("backbone", "weights", "img_size", "method", "data", "data_root", "image_column", "label_column",
                 "shots", "subset", "imbalance", "group_thresholds", "head_init", "seed", "epochs", "batch_size",
                 "lr", "head_lr", "wd", "optimizer", "warmup_epochs", "clip_grad", "accum_steps", "precision",
                 "compile", "augment", "trainval", "select", "val_every", "eval_test_every", "checkpoint_every",
                 "max_per_split", "init_from", "freeze_modules", "sensitivity", "device", "out", "task")


def config_from_args(args: argparse.Namespace, **forced):
    from vistune.methods import parse_kv  # lives in methods.base, which imports torch

    file_values = load_config_file(args.config) if args.config else {}
    overrides = {k: getattr(args, k, None) for k in _CONFIG_FLAGS}
    if isinstance(overrides["data"], list):
        overrides["data"] = overrides["data"][0]
    overrides["options"] = parse_kv(args.option) if args.option else None
    if args.no_progress:
        overrides["progress"] = False
    overrides.update(forced)
    return make_config(file_values, **overrides)


def _launch_if_asked(args: argparse.Namespace) -> int | None:
    """``--nproc N``: re-run this very command under torchrun on this machine; None = run here."""
    nproc = getattr(args, "nproc", None)
    if nproc is None or nproc == 1:
        return None
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    from vistune.engine.distributed import in_torchrun, launch

    if in_torchrun():
        raise ValueError("--nproc starts torchrun itself; under torchrun, leave it out")
    argv = list(args._argv)
    i = argv.index("--nproc") if "--nproc" in argv else None
    if i is not None:
        del argv[i: i + 2]
    else:
        argv = [a for a in argv if not a.startswith("--nproc=")]
    return launch(nproc, argv, args.command)


def cmd_train(args: argparse.Namespace) -> int:
    launched = _launch_if_asked(args)
    if launched is not None:
        return launched
    from vistune.workflows.train import train

    cfg = config_from_args(args)
    tracking = _tracking(args, cfg.out)
    metrics = train(cfg, resume=args.resume, overwrite=args.overwrite,
                    callbacks=tracking.callbacks(cfg.to_dict()) if tracking else ())
    if _is_main():
        _print_metrics(metrics, cfg.out)
    return 0


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from vistune.sensitivity import allocate, load_scores, plot_allocation
    from vistune.workflows.sensitivity import write_sensitivity

    cfg = config_from_args(args, method="linear", out=str(Path(args.scores).parent))
    path = Path(args.scores)
    if args.plot and not args.budget:
        raise ValueError("--plot draws an allocation: give --budget too")
    if args.budget:
        from vistune.sensitivity.allocate import parse_budget

        parse_budget(args.budget, 10**15)  # its form, before the pass (a percentage is resolved later)
    path.parent.mkdir(parents=True, exist_ok=True)  # an unusable --scores place fails before the pass
    backbone, data, meta = write_sensitivity(cfg, path, batch_size=args.sens_batch_size, num_batches=args.batches,
                                             recompute=args.recompute)
    if meta is None:
        print(f"scores: {path} (existing; --recompute to redo)")
    else:
        print(f"scores: {path} ({meta['num_batches']} batches of {meta['batch_size']}, {meta['seconds']:.1f} s)")
    if args.budget:
        probe = backbone
        probe.reset_classifier(data.num_classes)
        scores = load_scores(path, probe)
        alloc = allocate(probe, scores, args.budget, structured=args.structured, alpha=args.alpha,
                         beta=args.beta, rank=args.rank)
        summary = alloc.summary()
        print(json.dumps({k: v for k, v in summary.items() if k != "structured_matrices"}))
        print("structured:", ", ".join(summary["structured_matrices"]) or "(none)")
        if args.plot:
            print(f"plot: {plot_allocation(alloc, args.plot)}")
    return 0


def _print_metrics(metrics: dict, out: str) -> None:
    task = task_of(metrics)  # its headline metrics and their format are declared on the task class
    keys = ["method", *task.metric_keys, "tuned_params", "head_params", "train_seconds", "train_img_per_s",
            "peak_memory_mb", "num_train", "num_test", "skipped_images", "world_size"]
    keys = [k for k in keys if k in metrics]
    width = max(len(k) for k in keys)
    for k in keys:
        v = metrics.get(k)
        if isinstance(v, float):
            v = format(v, task.metric_format if k in task.metric_keys else ".2f")
        print(f"{k:<{width}}  {v}")
    print(f"{'written':<{width}}  {out}/tuned.safetensors, {out}/metrics.json")


def cmd_pretrain(args: argparse.Namespace) -> int:
    launched = _launch_if_asked(args)
    if launched is not None:
        return launched
    from vistune.workflows.pvp import pretrain

    sources = args.data
    if not sources and args.config:
        sources = load_config_file(args.config).get("data")
    if isinstance(sources, str):
        sources = [sources]
    if not sources:
        raise ValueError("pretrain needs --data SPEC (repeat it for several sources)")
    cfg = config_from_args(args, data=sources[0])
    tracking = _tracking(args, cfg.out)
    metrics = pretrain(cfg, list(sources), cfg.out, resume=args.resume, overwrite=args.overwrite,
                       train_on_test=args.source_test,
                       callbacks=tracking.callbacks({**cfg.to_dict(), "sources": list(sources)}) if tracking else ())
    if _is_main():
        for src in metrics["sources"]:
            top1 = "-" if src["eval_top1"] is None else f"{src['eval_top1']:.2f}"
            print(f"source {src['data']}: {src['num_train']} train images, {src['eval_split']} top-1 {top1}")
        print(f"modules: {metrics['modules_file']} ({metrics['tuned_params']:,} tuned params)")
    return 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def cmd_fewshot(args: argparse.Namespace) -> int:
    launched = _launch_if_asked(args)
    if launched is not None:
        return launched
    from vistune.workflows.fewshot import markdown, parse_variants, run_fewshot

    cfg = config_from_args(args, shots=1)
    shots = _int_list(args.shots)
    seeds = list(range(args.seeds)) if args.seed_list is None else _int_list(args.seed_list)
    variants = parse_variants(args.compare or cfg.method)
    pvp_files = {}
    for item in args.pvp:
        method, sep, path = item.partition("=")
        if not sep:
            raise ValueError(f"--pvp {item!r}: expected METHOD=FILE")
        pvp_files[method] = path
    lr_for = {}
    for item in args.lr_for:
        label, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--lr-for {item!r}: expected VARIANT=LR")
        lr_for[label] = float(value)
    result = run_fewshot(cfg, shots, seeds, variants, pvp_files, cfg.out, lr_for, overwrite=args.overwrite,
                         tracking=_tracking(args, cfg.out))
    if _is_main():
        print(markdown(result["table"], shots))
        print(f"written: {cfg.out}/fewshot.json, fewshot.md, fewshot.png")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from vistune.workflows.sweep import markdown, run_sweep

    cfg = config_from_args(args, trainval=False)
    seeds = list(range(args.seeds)) if args.seed_list is None else _int_list(args.seed_list)
    tracking = _tracking(args, cfg.out)
    if args.stage != "final":  # every worker too: each then starts its trials equally warm

        from vistune.workflows.sweep import split_searched_options
        from vistune.workflows.train import check_shared_settings

        fixed, _ = split_searched_options(cfg.method, cfg.options)  # searched options are checked per value
        check_shared_settings(dataclasses.replace(cfg, options=fixed))  # one line now, not a failed trial each
    result = run_sweep(cfg, grid=args.grid, optimizer_given=args.optimizer, sampler=args.sampler, trials=args.trials,
                       pruner=args.pruner, seeds=seeds, trainval=bool(args.trainval), storage=args.storage,
                       study_name=args.study_name, jobs=args.jobs, stage=args.stage, max_trials=args.max_trials,
                       worker=args.worker, argv=args._argv, tracking=tracking)
    if result:
        print(markdown(result), end="")
        print(f"written: {cfg.out}/sweep.json, sweep.md, sweep_grid.png, sweep_history.png")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vistune.tasks import kind_of_run

    kind = kind_of_run(args.tuned)  # the run's task class answers: top-k, labels, or a drawing
    res = kind.predict(Path(args.tuned), Path(args.image), None if args.out is None else Path(args.out),
                       top=args.top, score_threshold=args.score_threshold, device=args.device)
    print(json.dumps(res) if args.json or "out" not in res else f"written {res['out']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from vistune.workflows.train import evaluate_run

    res = evaluate_run(args.tuned, args.data, split=args.split, batch_size=args.batch_size, device=args.device,
                       weights=args.weights, allow_class_mismatch=args.allow_class_mismatch, precision=args.precision)
    if args.json:
        print(json.dumps(res))
    else:
        print("\n".join(task_of(res).eval_lines(res, args.split)))
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    from vistune.weights import get_weights, list_cached, zoo_names

    if args.action == "get":
        names = zoo_names() if args.name == "all" else [args.name]
        for name in names:
            path = get_weights(name, cache_dir=args.cache_dir, force=args.force)
            print(f"{name}: {path}")
        return 0
    rows = list_cached(args.cache_dir)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no cached weights (available: {', '.join(zoo_names())}; fetch with `vistune weights get NAME`)")
    for r in rows:
        print(f"{r['name']:<20} {r['size_bytes'] / 2**20:7.1f} MiB  {r['licence']:<28} {r['source']}")
        print(f"{'':<20} {r['path']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from vistune.report import collect_rows, machine_lines, markdown_table, task_columns
    from vistune.robustness.report import report_columns

    rows, skipped = collect_rows(args.runs)
    if not rows:
        reasons = "; ".join(f"{path}: {why}" for path, why in skipped)
        print(f"vistune report: error: nothing readable ({_one_line(reasons)})", file=sys.stderr)
        return 2
    print("\n".join(machine_lines(rows)) + "\n")  # what made the numbers, above them
    print(markdown_table(rows, report_columns(rows, task_columns(rows))))
    for path, why in skipped:  # after the table, on stderr: the good rows stay usable
        print(f"vistune report: skipped {path}: {_one_line(why)}", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from vistune.serve.config import (
        load_config_file,
        make_config,
        parse_task_args,
        serve,
    )

    file_values = load_config_file(args.config) if args.config else {}
    cfg = make_config(file_values, parse_task_args(args.task), backbone=args.backbone, weights=args.weights,
                      img_size=args.img_size, host=args.host, port=args.port, max_batch=args.max_batch,
                      batch_window_ms=args.batch_window_ms, bf16=args.bf16, precision=args.precision, device=args.device,
                      max_upload_mb=args.max_upload_mb, read_only=args.read_only, threads=args.threads,
                      admin=args.admin, admin_token=args.admin_token, task_root=args.task_root,
                      max_inflight=args.max_inflight, max_decodes=args.max_decodes, max_image_mb=args.max_image_mb)
    return serve(cfg)


def _add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve many tuned files on one shared backbone: HTTP API + web page at /")
    p.add_argument("--config", default=None, help="YAML with the same keys as the flags and a tasks: table")
    p.add_argument("--task", action="append", default=[], metavar="NAME=PATH",
                   help="a tuned file or dense run folder to serve as NAME (repeatable)")
    p.add_argument("--backbone", default=None, help="default: the backbone the first task was trained on")
    p.add_argument("--weights", default=None)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--host", default=None, help="default 127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default 8000")
    p.add_argument("--max-batch", type=int, default=None, help="most samples per forward (default 16)")
    p.add_argument("--batch-window-ms", type=float, default=None,
                   help="how long the first request of a batch waits for others (default 5)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="auto (default): bf16 autocast only where this machine runs it natively, else fp32")
    p.add_argument("--bf16", action="store_const", const=True, default=None, help="same as --precision bf16")
    p.add_argument("--device", default=None, help="cpu (default), cuda, auto")
    p.add_argument("--max-upload-mb", type=float, default=None, help="largest request body (default 16)")
    p.add_argument("--read-only", action="store_const", const=True, default=None,
                   help="refuse POST/DELETE /tasks (the default; contradicts --admin)")
    p.add_argument("--admin", action="store_const", const=True, default=None,
                   help="open POST/DELETE /tasks to holders of the admin token, for files under --task-root")
    p.add_argument("--admin-token", default=None, metavar="TOKEN",
                   help="the admin bearer token (prefer $VISTUNE_ADMIN_TOKEN: a flag shows in ps)")
    p.add_argument("--task-root", default=None, metavar="DIR",
                   help="with --admin: the only folder POST /tasks may load from")
    p.add_argument("--max-inflight", type=int, default=None,
                   help="predictions admitted at once; more get 503 + Retry-After (default 16)")
    p.add_argument("--max-decodes", type=int, default=None, help="images decoded at once (default 2)")
    p.add_argument("--max-image-mb", type=float, default=None,
                   help="the most memory one image decode may take, else 413 (default 128)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.set_defaults(func=cmd_serve)
def cmd_export(args: argparse.Namespace) -> int:
    from vistune.export import export

    options = {}
    if args.exporter is not None:
        options["exporter"] = args.exporter
    if args.no_base:
        options["include_base"] = False
    info = export(args.tuned, args.format, args.out, overwrite=args.overwrite, weights=args.weights, **options)
    check = info.get("check") or {}
    print(f"written {args.out} ({args.format}): {', '.join(info.get('files', []))}")
    if check.get("checked"):
        print(f"onnxruntime vs vistune: max abs diff {check['max_abs_diff']:.2e} ({check['images']})")
    load = info["load"]
    for line in (load.values() if isinstance(load, dict) else [load]):
        print(f"run without vistune: {line}")
    return 0


def cmd_import_peft(args: argparse.Namespace) -> int:
    from vistune.export import import_peft

    names = [n.strip() for n in args.class_names.split(",")] if args.class_names else None
    res = import_peft(args.adapter, args.out, backbone=args.backbone, weights=args.weights, img_size=args.img_size,
                      class_names=names)
    opts = res["method"]["options"]
    print(f"written {res['out']}: lora rank={opts['rank']} alpha={opts['alpha']} targets={','.join(opts['targets'])}, "
          f"{res['num_classes']} classes")
    return 0


def cmd_robustness(args: argparse.Namespace) -> int:
    from vistune.robustness.corruptions import parse_corruptions, parse_severities

    # numpy-only checks first: a mistyped corruption or severity fails before torch is imported
    corruptions = parse_corruptions(args.corruptions) if args.corruptions else []
    severities = parse_severities(args.severities)
    from vistune.robustness.attacks import parse_attacks, parse_eps
    from vistune.workflows.robustness import RobustnessSettings, run_robustness

    s = RobustnessSettings(
        tuned=args.tuned, out=args.out, data=args.data, corruptions=corruptions,
        severities=severities, attacks=parse_attacks(args.attack) if args.attack else [],
        eps=parse_eps(args.eps), pgd_steps=args.pgd_steps, pgd_alpha=args.pgd_alpha,
        ood=[x.strip() for x in args.ood.split(",") if x.strip()] if args.ood else [], class_map=args.class_map,
        baseline=args.baseline, max_images=args.max_images, batch_size=args.batch_size, device=args.device,
        precision=args.precision, attack_precision=args.attack_precision, workers=args.workers, seed=args.seed,
        weights=args.weights, verbose=not args.no_progress, image_cache=args.image_cache)
    report = run_robustness(s)
    for key, value in report["summary"].items():
        print(f"{key:<13} {value:.2f}" if isinstance(value, float) else f"{key:<13} {value}")
    print(f"written       {args.out}/robustness.json, robustness.md ({report['seconds']:.0f} s)")
    return 0


def _add_robustness_parser(sub) -> None:
    p = sub.add_parser("robustness", help="a run under ImageNet-C corruptions, FGSM/PGD attacks and other data sets")
    p.add_argument("--tuned", required=True, help="a classification run folder or its tuned.safetensors")
    p.add_argument("--data", default=None, help="data spec (default: the one recorded in the run)")
    p.add_argument("--out", required=True, help="output folder: robustness.json/.md, plots, cells/ (resumable)")
    p.add_argument("--corruptions", default=None, metavar="all|common|extra|NAME,NAME",
                   help="ImageNet-C corruptions (imagecorruptions): 15 common + 4 extra")
    p.add_argument("--severities", default="1,2,3,4,5", help="comma-separated, each 1..5")
    p.add_argument("--baseline", default=None, metavar="RUN",
                   help="a run evaluated on the same corrupted images: CE and relative mCE against it")
    p.add_argument("--attack", default=None, metavar="fgsm,pgd", help="L∞ untargeted attacks (ART)")
    p.add_argument("--eps", default="1/255,2/255,4/255,8/255",
                   help="L∞ radii in [0,1] pixel space: fractions or floats")
    p.add_argument("--pgd-steps", type=_positive_int, default=10)
    p.add_argument("--pgd-alpha", type=_positive_float, default=None, help="PGD step (default 2.5*eps/steps)")
    p.add_argument("--attack-precision", choices=PRECISIONS, default="fp32",
                   help="attack precision (default fp32: input gradients in bf16 weaken the attack)")
    p.add_argument("--ood", default=None, metavar="SPEC[,SPEC]", help="other data sets with (some of) the run's classes")
    p.add_argument("--class-map", default=None, metavar="FILE", help="YAML 'source class: run class' for --ood")
    p.add_argument("--max-images", type=_positive_int, default=None,
                   help="at most N images per evaluation (seeded, class-proportional, the same for every run)")
    p.add_argument("--seed", type=_count, default=0, help="corruption noise and PGD random start")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--workers", type=_count, default=min(4, os.cpu_count() or 1),
                   help="DataLoader worker processes for the corruptions (CPU-bound)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="evaluation forwards: auto (default) keeps the run's own precision where native, else fp32")
    p.add_argument("--weights", default=None, help="backbone weights file, for runs trained on a local file")
    p.add_argument("--image-cache", default=None, metavar="DIR",
                   help="keep the corrupted images here and reuse them for every run on the same images "
                        "(comparing methods pays the corruptions once)")
    p.add_argument("--no-progress", action="store_true", help="no line per finished cell")
    p.set_defaults(func=cmd_robustness)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: global flags, then one builder per subcommand (in help order)."""
    parser = _Parser(prog="vistune", description="Parameter-efficient tuning of frozen vision backbones")
    parser.add_argument("--version", action="version", version=f"vistune {__version__}")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE (a dotted module name or a .py file) before the command, so the "
                             "methods and task kinds it registers (vistune.register_method, "
                             "vistune.tasks.register_task) can be used (repeatable; "
                             "installed packages' 'vistune.methods' entry points need no flag)")
    sub = parser.add_subparsers(dest="command", required=True)

    _add_info_parser(sub)
    _add_train_parser(sub)
    _add_sensitivity_parser(sub)
    _add_predict_parser(sub)
    _add_pretrain_parser(sub)
    _add_fewshot_parser(sub)
    _add_sweep_parser(sub)
    _add_eval_parser(sub)
    _add_weights_parser(sub)
    _add_export_parser(sub)
    _add_import_peft_parser(sub)
    _add_report_parser(sub)
    _add_serve_parser(sub)
    _add_robustness_parser(sub)
    return parser


def _add_info_parser(sub: argparse._SubParsersAction) -> None:
    """`vistune info`: the parameter report; its own -h also lists a --method's options."""
    p = sub.add_parser("info", help="parameter report of a method attached to a backbone", add_help=False)
    p.add_argument("-h", "--help", action=_HelpWithMethodOptions, nargs=0,
                   help="show this help; with --method X before it, also X's options (defaults, bounds, help)")
    _add_backbone_args(p)
    p.add_argument("--num-classes", type=_count, default=10)
    p.add_argument("--load-weights", action="store_true",
                   help="materialise the model and its weights (default: count on the meta device "
                        "unless --weights is given)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    """`vistune train`: the shared training flags plus --task and tracking."""
    p = sub.add_parser("train", help="train a method on a dataset; writes tuned.safetensors + metrics.json")
    _add_train_args(p)
    p.add_argument("--task", choices=task_names(), default=None, help=task_help())
    _add_tracking_args(p)
    p.set_defaults(func=cmd_train)


def _add_sensitivity_parser(sub: argparse._SubParsersAction) -> None:
    """`vistune sensitivity`: SPT scores, and optionally an allocation and its plot."""
    p = sub.add_parser("sensitivity", help="SPT: gradient sensitivity scores (+ an allocation and its plot)")
    _add_train_args(p, runs=False)
    p.add_argument("--scores", required=True, help="output .safetensors for the scores")
    p.add_argument("--sens-batch-size", type=_positive_int, default=32)
    p.add_argument("--batches", type=_positive_int, default=16)
    p.add_argument("--recompute", action="store_true")
    p.add_argument("--budget", default=None, help="e.g. 0.4M, 400k, 0.5%%: allocate and print the summary")
    p.add_argument("--structured", choices=["lora", "adapter", "none"], default="lora")
    p.add_argument("--alpha", type=_positive_float, default=10.0)
    p.add_argument("--beta", type=_positive_float, default=5.0)
    p.add_argument("--rank", type=_positive_int, default=8)
    p.add_argument("--plot", default=None, help="PNG heat-map of the allocation")
    p.set_defaults(func=cmd_sensitivity)


def _add_predict_parser(sub: argparse._SubParsersAction) -> None:
    """`vistune predict`: one run's answer for one image, through its task kind."""
    p = sub.add_parser("predict", help="a run on one image: top-k classes (JSON), another kind's answer (multi-label: "
                                       "its labels), or a dense run's drawing (mask overlay or boxes)")
    p.add_argument("--tuned", required=True, help="run folder or its tuned.safetensors")
    p.add_argument("--image", required=True)
    p.add_argument("--out", default=None,
                   help="output file: a dense run's drawing (PNG, required there); else the JSON answer (.json)")
    p.add_argument("--top", type=_positive_int, default=5, help="classification: how many classes to list")
    p.add_argument("--score-threshold", type=_number(float, 0), default=None,
                   help="detect: keep boxes scoring at least this (default 0.3); a kind that thresholds "
                        "scores (multi-label: 0.5) uses it as its threshold")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_predict)


def _add_pretrain_parser(sub: argparse._SubParsersAction) -> None:
    """`vistune pretrain`: PVP stage 1 over several source datasets."""
    p = sub.add_parser("pretrain", help="PVP stage 1: pre-train a method's modules on source data")
    _add_train_args(p, multi_data=True)
    p.add_argument("--source-test", action="store_true",
                   help="also train on each source's test split (sources are never targets)")
    _add_tracking_args(p)
    p.set_defaults(func=cmd_pretrain)


def _add_fewshot_parser(sub: argparse._SubParsersAction) -> None:
    """`vistune fewshot`: the shots x seeds x variants protocol."""
    p = sub.add_parser("fewshot", help="few-shot protocol: shots x seeds x variants, mean ± std table + plot")
    _add_train_args(p, shots=False)
    p.add_argument("--shots", default="1,2,4,8,16", help="comma-separated K values")
    p.add_argument("--seeds", type=_positive_int, default=3, help="number of seeds (0..N-1)")
    p.add_argument("--seed-list", default=None, help="explicit comma-separated seeds")
    p.add_argument("--compare", default=None, help="variants, e.g. vpt,vpt+pvp,lora,lora+pvp,linear")
    p.add_argument("--pvp", action="append", default=[], metavar="METHOD=FILE",
                   help="pre-trained module file for METHOD+pvp variants")
    p.add_argument("--lr-for", action="append", default=[], metavar="VARIANT=LR",
                   help="learning rate for one variant or method (default --lr)")
    _add_tracking_args(p)
    p.set_defaults(func=cmd_fewshot)


def _add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    """`vistune sweep`: the Optuna search on val, then the per-seed final retrain."""
    p = sub.add_parser("sweep", help="search lr/wd/options on val (Optuna), retrain the best per seed, test once each")
    _add_train_args(p, runs=False)
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a searched run setting (lr, wd, head_lr, warmup_epochs, epochs, momentum, optimizer); "
                        "default: VPT's lr x wd grid for the method (method options: -o KEY=A,B)")
    p.add_argument("--sampler", choices=["grid", "tpe"], default="grid")
    p.add_argument("--trials", type=_positive_int, default=None, help="number of trials for --sampler tpe")
    p.add_argument("--pruner", choices=["median", "sha", "none"], default="median",
                   help="stop poor trials early on their per-epoch val numbers")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the final retrain (0..N-1)")
    p.add_argument("--seed-list", default=None, help="explicit comma-separated seeds of the final retrain")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL shared by several machines (default: OUT/study.journal)")
    p.add_argument("--study-name", default="vistune-sweep")
    p.add_argument("--jobs", type=int, default=1, help="worker processes on this machine")
    p.add_argument("--stage", choices=["all", "search", "final"], default="all")
    p.add_argument("--max-trials", type=_positive_int, default=None,
                   help="run at most N trials in this invocation")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    _add_tracking_args(p)
    p.set_defaults(func=cmd_sweep)


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    """`vistune eval`: evaluate a tuned file on one split."""
    p = sub.add_parser("eval", help="evaluate a tuned file on a split")
    p.add_argument("--tuned", required=True, help="a run folder or the tuned.safetensors written by train")
    p.add_argument("--data", default=None, help="data spec (default: the one recorded in the file)")
    p.add_argument("--weights", default=None,
                   help="backbone weights file, for runs trained on a local file (the file records only a label)")
    p.add_argument("--allow-class-mismatch", action="store_true",
                   help="evaluate although the data's class names differ from the model's")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto (default): the run's own precision where this hardware runs it natively, else fp32")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)


def _add_weights_parser(sub: argparse._SubParsersAction) -> None:
    """`vistune weights get|list`: the local pre-trained weights cache."""
    p = sub.add_parser("weights", help="fetch/convert real pre-trained weights into the local cache")
    wsub = p.add_subparsers(dest="action", required=True)
    g = wsub.add_parser("get", help="fetch and convert NAME (or 'all'); idempotent")
    g.add_argument("name")
    g.add_argument("--force", action="store_true", help="re-download and re-convert")
    g.add_argument("--cache-dir", default=None, help="default: $VISTUNE_WEIGHTS_DIR or ~/.cache/vistune/weights")
    g.set_defaults(func=cmd_weights)
    ls = wsub.add_parser("list", help="what is cached: sizes and provenance")
    ls.add_argument("--cache-dir", default=None)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_weights)


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    """`vistune export`: a run as a timm folder, an ONNX graph or a PEFT adapter."""
    p = sub.add_parser("export", help="export a run as a plain timm folder, an ONNX graph or a PEFT LoRA adapter")
    p.add_argument("--tuned", required=True, help="run folder (classification or dense) or its tuned.safetensors")
    p.add_argument("--format", required=True, help="timm | onnx | peft")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    p.add_argument("--exporter", default=None, help="onnx: torchscript (default) | dynamo")
    p.add_argument("--no-base", action="store_true", help="peft: skip base/ (the frozen backbone as a timm folder)")
    p.add_argument("--weights", default=None,
                   help="backbone weights file, for runs trained on a local file (the file records only a label)")
    p.set_defaults(func=cmd_export)


def _add_import_peft_parser(sub: argparse._SubParsersAction) -> None:
    """`vistune import-peft`: a HF PEFT LoRA adapter as a vistune tuned file."""
    p = sub.add_parser("import-peft", help="turn a HF PEFT LoRA adapter into a vistune tuned file")
    p.add_argument("adapter", help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--backbone", required=True, help="the timm model or vistune weights name it was trained on")
    p.add_argument("--weights", default=None, help="vistune weights name or a local weights file")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--class-names", default=None, help="comma-separated class names (default: from the folder)")
    p.add_argument("--out", required=True, help="output tuned .safetensors file")
    p.set_defaults(func=cmd_import_peft)


def _add_report_parser(sub: argparse._SubParsersAction) -> None:
    """`vistune report`: a markdown table of run folders."""
    p = sub.add_parser("report", help="print a markdown table of run folders' metrics.json")
    p.add_argument("runs", nargs="+")
    p.set_defaults(func=cmd_report)

#: What to do after an interruption, per command (Ctrl-C prints this instead of a traceback).
_RESUME = {
    "train": "; resume with --resume",
    "pretrain": "; resume with --resume",
    "sweep": "; resume by running the same command again (finished trials are kept)",
    "fewshot": "; run the same command again to continue (finished runs are kept)",
    "robustness": "; run the same command again to continue (finished cells are kept)",
}


def _lost_peer(err: BaseException, text: str) -> bool:
    """A collective failed because another rank is gone (gloo/NCCL say so in their own words)."""
    names = {type(e).__name__ for e in (err, err.__cause__, err.__context__) if e is not None}
    markers = ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL", "ProcessGroup",
               "Broken pipe", "Socket Timeout", "connection closed")
    return bool(names & {"DistBackendError", "DistNetworkError", "DistError"}) or any(m in text for m in markers)


def _plugins_in(argv: Sequence[str]) -> list[str]:
    """The ``--plugin`` values before the command (they must be imported before the parser is
    built, so its help lists their methods). Placed after the command, argparse would only say
    "unrecognized arguments"; this says where it goes."""
    found: list[str] = []
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        if argv[i] == "--plugin" and i + 1 < len(argv):
            found.append(argv[i + 1])
            i += 1
        elif argv[i].startswith("--plugin="):
            found.append(argv[i].partition("=")[2])
        i += 1
    if any(a == "--plugin" or a.startswith("--plugin=") for a in argv[i + 1:]):
        raise ValueError("--plugin goes before the command: vistune --plugin MODULE COMMAND ...")
    return found


def _parser_with_plugins(argv: Sequence[str]) -> argparse.ArgumentParser:
    """Import the ``--plugin`` modules, then build the parser (its help lists their methods).

    A failing plugin (or a misplaced flag) is one line and exit 2. Warnings about installed
    plugins (an entry point that takes a built-in name) become one ``vistune: warning:`` line
    each, printed once, instead of Python's two-line format repeated per ``--method`` flag."""
    try:
        for spec in _plugins_in(argv):
            load_plugin(spec)
    except (VistuneError, ValueError) as err:
        print(f"vistune: error: {_one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PluginWarning)
        parser = build_parser()
    for text in dict.fromkeys(_one_line(w.message) for w in caught if issubclass(w.category, PluginWarning)):
        print(f"vistune: warning: {text}", file=sys.stderr)
    for w in caught:
        if not issubclass(w.category, PluginWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser_with_plugins(argv)
    args = parser.parse_args(argv)
    args._argv = argv

    world = int(os.environ.get("WORLD_SIZE", "1"))
    where = f" (rank {os.environ.get('RANK', '0')} of {world})" if world > 1 else ""
    try:
        return int(args.func(args) or 0)
    except (VistuneError, ValueError, OSError) as err:
        # OSError: a path the user named cannot be read or written (a file where a folder is
        # expected, a read-only place, a full disk): the message names it, a traceback adds nothing.
        if isinstance(err, OSError) and err.filename is not None and err.strerror:
            err = f"{err.strerror}: {err.filename}"
        print(f"vistune {args.command}: error{where}: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vistune {args.command}: interrupted{where}{_RESUME.get(args.command, '')}", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as err:
        text = _one_line(err)
        if world > 1 and _lost_peer(err, text):
            print(f"vistune {args.command}: error{where}: lost contact with another process of the job (a rank "
                  f"died or was killed: {text[:160]}); the job stops{_RESUME.get(args.command, '')}", file=sys.stderr)
            return 2
        if not isinstance(err, MemoryError) and "out of memory" not in text and "can't allocate memory" not in text:
            raise  # a bug: keep its traceback
        print(f"vistune {args.command}: error{where}: out of memory ({text[:200]}); lower --batch-size, "
              "--img-size or the method's size options", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
