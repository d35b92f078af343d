"""Command line: ``python -m layermoe.models prepare smollm2 [--target DIR] [--force]``."""

from __future__ import annotations

import argparse
import sys
import time

from layermoe.models.smollm2 import ModelPrepareError, prepare_smollm2, smollm2_dir
from layermoe.progress import heartbeat

PREPARERS = {"smollm2": (prepare_smollm2, smollm2_dir)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m layermoe.models", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="convert a packaged model into $LAYERMOE_CACHE")
    prep.add_argument("name", choices=sorted(PREPARERS))
    prep.add_argument("--target", default=None, help="output folder (default: the cache location)")
    prep.add_argument("--force", action="store_true", help="rebuild even if the folder is complete")
    sub.add_parser("path", help="print the prepared folder of a model").add_argument(
        "name", choices=sorted(PREPARERS)
    )
    args = parser.parse_args(argv)
    prepare, default_dir = PREPARERS[args.name]
    if args.command == "path":
        print(default_dir())
        return 0
    start = time.perf_counter()
    label = f"prepare {args.name}"
    print(
        f"{label}: converting into {args.target or default_dir()} (about a minute; skipped when done)",
        flush=True,
    )
    try:
        with heartbeat(label):  # transformers' GGUF loader prints nothing while it dequantizes
            folder = prepare(args.target, force=args.force)
    except ModelPrepareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{args.name}: {folder} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
