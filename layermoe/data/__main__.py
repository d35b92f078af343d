"""Command line: ``python -m layermoe.data fetch-quickstart [--target DIR] [--force]``."""

from __future__ import annotations

import argparse
import sys

from layermoe.data.quickstart import fetch_quickstart


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m layermoe.data")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser(
        "fetch-quickstart", help="fetch the sarcasm-headlines task from PyPI (evals wheel)"
    )
    fetch.add_argument("--target", default=None, help="output folder (default: $LAYERMOE_QUICKSTART_DATA)")
    fetch.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    folder = fetch_quickstart(args.target, force=args.force)
    print(f"quickstart data: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
