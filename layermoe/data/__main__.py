"""Command line: ``python -m layermoe.data fetch-quickstart [--target DIR] [--force]`` and
``python -m layermoe.data make-synthetic [--target DIR] [--train-rows N] [--test-rows N]``."""

from __future__ import annotations

import argparse
import sys

from layermoe.data.quickstart import fetch_quickstart
from layermoe.data.synthetic import write_synthetic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m layermoe.data")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser(
        "fetch-quickstart", help="fetch the sarcasm-headlines task from PyPI (evals wheel)"
    )
    fetch.add_argument("--target", default=None, help="output folder (default: $LAYERMOE_QUICKSTART_DATA)")
    fetch.add_argument("--force", action="store_true")
    make = sub.add_parser(
        "make-synthetic", help="write the seeded word-rule instruction / chat / multiple-choice data"
    )
    make.add_argument("--target", default=None, help="output folder (default: {cache}/data/synthetic)")
    make.add_argument("--train-rows", type=int, default=2000)
    make.add_argument("--test-rows", type=int, default=200)
    args = parser.parse_args(argv)
    if args.command == "make-synthetic":
        folder = write_synthetic(args.target, args.train_rows, args.test_rows)
        print(f"synthetic data: {folder}")
        return 0
    folder = fetch_quickstart(args.target, force=args.force)
    print(f"quickstart data: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
