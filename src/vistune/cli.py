"""Command line: ``vistune info|weights|train|eval|...``.

Heavy imports (torch, timm) happen inside each command so ``vistune --help`` stays instant.
Every user error ends in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _add_backbone_args(p: argparse.ArgumentParser, method_required: bool = True) -> None:
    p.add_argument("--backbone", required=True, help="timm model name or vistune weights name (dinov2-s14, ...)")
    p.add_argument("--weights", default=None, help="vistune weights name or a local weights file")
    p.add_argument("--img-size", type=int, default=None, help="input resolution (ViT position embeddings are resampled)")
    p.add_argument("--method", required=method_required, help="tuning method: linear, full, bitfit, vpt, lora, adapter, ...")
    p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE", help="method option (repeatable)")


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from vistune.backbones import create_backbone
    from vistune.methods import parse_kv
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


def _add_train_args(p: argparse.ArgumentParser, multi_data: bool = False, shots: bool = True) -> None:
    """Every TrainConfig key as a flag; defaults are None so a --config file's values survive."""
    p.add_argument("--config", default=None, help="YAML file with the same keys as the flags")
    p.add_argument("--backbone", default=None, help="timm model name or vistune weights name (dinov2-s14, ...)")
    p.add_argument("--weights", default=None, help="vistune weights name or a local weights file")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--method", default=None, help="linear, full, bitfit, vpt, lora, adapter, spt, protuning")
    p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE", help="method option (repeatable)")
    data_help = "fashion-mnist | npz:PATH | folder:PATH | vtab:PATH/TASK | fgvc:PATH"
    if multi_data:
        p.add_argument("--data", action="append", default=None, help=data_help + " (repeatable: several sources)")
    else:
        p.add_argument("--data", default=None, help=data_help)
    if shots:
        p.add_argument("--shots", type=int, default=None, help="K examples per class from the training split")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--wd", type=float, default=None)
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default=None)
    p.add_argument("--warmup-epochs", type=float, default=None)
    p.add_argument("--clip-grad", type=float, default=None)
    p.add_argument("--accum-steps", type=int, default=None)
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None)
    p.add_argument("--augment", choices=["flip"], default=None)
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
    p.add_argument("--sensitivity", default=None, help="SPT: sensitivity scores file (computed when absent)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="output folder (tuned.safetensors, metrics.json, log.jsonl)")
    p.add_argument("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace, **forced):
    from vistune.config import load_config_file, make_config
    from vistune.methods import parse_kv

    file_values = load_config_file(args.config) if args.config else {}
    keys = ("backbone", "weights", "img_size", "method", "data", "shots", "seed", "epochs", "batch_size",
            "lr", "wd", "optimizer", "warmup_epochs", "clip_grad", "accum_steps", "precision", "augment",
            "trainval", "select", "val_every", "eval_test_every", "checkpoint_every", "max_per_split", "init_from",
            "sensitivity", "device", "out")
    overrides = {k: getattr(args, k, None) for k in keys}
    if isinstance(overrides["data"], list):
        overrides["data"] = overrides["data"][0]
    overrides["options"] = parse_kv(args.option) if args.option else None
    if args.no_progress:
        overrides["progress"] = False
    overrides.update(forced)
    return make_config(file_values, **overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from vistune.engine import train

    cfg = config_from_args(args)
    metrics = train(cfg, resume=args.resume)
    _print_metrics(metrics, cfg.out)
    return 0


def _print_metrics(metrics: dict, out: str) -> None:
    keys = ("method", "val_top1", "test_top1", "tuned_params", "head_params", "train_seconds",
            "train_img_per_s", "peak_memory_mb", "num_train", "num_test", "skipped_images")
    width = max(len(k) for k in keys)
    for k in keys:
        v = metrics.get(k)
        if isinstance(v, float):
            v = f"{v:.2f}"
        print(f"{k:<{width}}  {v}")
    print(f"{'written':<{width}}  {out}/tuned.safetensors, {out}/metrics.json")


def cmd_pretrain(args: argparse.Namespace) -> int:
    from vistune.config import load_config_file
    from vistune.pvp import pretrain

    sources = args.data
    if not sources and args.config:
        sources = load_config_file(args.config).get("data")
    if isinstance(sources, str):
        sources = [sources]
    if not sources:
        raise ValueError("pretrain needs --data SPEC (repeat it for several sources)")
    cfg = config_from_args(args, data=sources[0])
    metrics = pretrain(cfg, list(sources), cfg.out)
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
    from vistune.fewshot import markdown, parse_variants, run_fewshot

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
    result = run_fewshot(cfg, shots, seeds, variants, pvp_files, cfg.out, lr_for)
    print(markdown(result["table"], shots))
    print(f"written: {cfg.out}/fewshot.json, fewshot.md, fewshot.png")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from vistune.engine import evaluate_file

    res = evaluate_file(args.tuned, args.data, split=args.split, batch_size=args.batch_size,
                        device=args.device, progress=not args.no_progress)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{args.split}_top1  {res[f'{args.split}_top1']:.2f}  (n={res[f'num_{args.split}']})")
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
    from vistune.report import load_metrics, markdown_table

    rows = load_metrics(args.runs)
    if not rows:
        print("vistune report: error: no metrics.json under " + ", ".join(args.runs), file=sys.stderr)
        return 2
    print(markdown_table(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from vistune import __version__

    parser = argparse.ArgumentParser(prog="vistune", description="Parameter-efficient tuning of frozen vision backbones")
    parser.add_argument("--version", action="version", version=f"vistune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameter report of a method attached to a backbone")
    _add_backbone_args(p)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--load-weights", action="store_true",
                   help="materialise the model and its weights (default: count on the meta device "
                        "unless --weights is given)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="train a method on a dataset; writes tuned.safetensors + metrics.json")
    _add_train_args(p)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pretrain", help="PVP stage 1: pre-train a method's modules on source data")
    _add_train_args(p, multi_data=True)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("fewshot", help="few-shot protocol: shots x seeds x variants, mean ± std table + plot")
    _add_train_args(p, shots=False)
    p.add_argument("--shots", default="1,2,4,8,16", help="comma-separated K values")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    p.add_argument("--seed-list", default=None, help="explicit comma-separated seeds")
    p.add_argument("--compare", default=None, help="variants, e.g. vpt,vpt+pvp,lora,lora+pvp,linear")
    p.add_argument("--pvp", action="append", default=[], metavar="METHOD=FILE",
                   help="pre-trained module file for METHOD+pvp variants")
    p.add_argument("--lr-for", action="append", default=[], metavar="VARIANT=LR",
                   help="learning rate for one variant or method (default --lr)")
    p.set_defaults(func=cmd_fewshot)

    p = sub.add_parser("eval", help="evaluate a tuned file on a split")
    p.add_argument("--tuned", required=True, help="a tuned.safetensors written by train")
    p.add_argument("--data", default=None, help="data spec (default: the one recorded in the file)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)

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

    p = sub.add_parser("report", help="print a markdown table of run folders' metrics.json")
    p.add_argument("runs", nargs="+")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from vistune.errors import VistuneError

    try:
        return int(args.func(args) or 0)
    except (VistuneError, ValueError, FileNotFoundError) as err:
        print(f"vistune {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
