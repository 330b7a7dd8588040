"""``python -m vistune.data fetch SPEC``: make a data set available now.

Reads the spec's layout (downloading a ``tv:`` data set, filling the
``datasets`` cache for a ``hf:`` hub name) without decoding images, and prints
one summary line, or one error line and exit code 2. Used by
``scripts/demo.sh`` to find out whether a data set can be had on this
machine, and by users to fetch data on a networked machine before going
offline.
"""

from __future__ import annotations

import argparse
import sys

from .errors import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vistune.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fetch", help="read (download if needed) a data spec and print a summary line")
    p.add_argument("spec", help="a data spec, e.g. tv:FashionMNIST, hf:NAME, npz:PATH")
    p.add_argument(
        "--data-root", default=None, help="tv: data root (default $VISTUNE_DATA_ROOT or ~/.cache/vistune/data)"
    )
    args = parser.parse_args(argv)
    from .loader import ReadOptions, read_source

    try:
        src = read_source(args.spec, ReadOptions(data_root=args.data_root))
    except DataError as err:
        print(f"python -m vistune.data {args.command}: error: {err}", file=sys.stderr)
        return 2
    sizes = ", ".join(f"{len(raw)} {split}" for split, raw in src.splits.items())
    print(f"{args.spec}: {sizes} images, {src.num_classes} classes, at {src.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
