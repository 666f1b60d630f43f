"""The ``dicom-triage`` command.

Each area registers its own subcommands: ``training.cli`` (train, evaluate) and this module (serve, listen,
worker, results, sr). Settings are read once here and passed down.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    from training import cli as training_cli

    parser = argparse.ArgumentParser(prog="dicom-triage", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    training_cli.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except ConfigError as exc:
        print(f"dicom-triage: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
