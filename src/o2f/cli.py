"""The ``o2f`` command line: ``o2f <command> --help`` for each command."""

from __future__ import annotations

import argparse
import sys

import o2f


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="o2f", description="One-to-Few label assignment for end-to-end dense detection.")
    parser.add_argument("--version", action="version", version=f"o2f {o2f.__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
