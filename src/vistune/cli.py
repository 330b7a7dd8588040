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
