"""The options the ``dicom-triage`` subcommands share, and the one way their flags become the settings.

Every area's ``cli`` module (``worker.cli``, ``worker.backfill_cli``, ``worker.registry.cli``, ``worker.web.cli``)
imports these; none imports another area's ``cli``, and ``worker.cli`` only assembles them into one parser.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from config import Settings, load_settings

#: The flags that override a setting of the same name where a subcommand has them.
_SETTING_FLAGS = ("dicom_port", "dicom_host", "ae_title", "web_host", "web_port", "listen_processes",
                  "sr_destinations", "health_port", "health_host", "web_tls_cert", "web_tls_key", "web_tls_client_ca")


def add_settings_options(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` and ``--data-dir DIR``: where the settings and the data are."""
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML settings file")
    parser.add_argument("--data-dir", type=Path, metavar="DIR",
                        help="archive, database, queue and web secret directory")


def add_supervisor_option(parser: argparse.ArgumentParser) -> None:
    """``--supervisor-pid``: how ``serve`` starts its workers, which then end when it does."""
    parser.add_argument("--supervisor-pid", type=int, metavar="PID",
                        help="end when this process, our parent, ends (how serve starts its workers)")


def read_settings(args: argparse.Namespace) -> Settings:
    """Settings from the file, the ``DICOM_TRIAGE_*`` variables and the flags given (a flag wins); raises
    ``ConfigError`` for a bad value, the routing rules included."""
    from worker.routing import check_rules

    overrides: dict[str, Any] = {name: getattr(args, name, None) for name in _SETTING_FLAGS}
    settings = load_settings(args.config, data_dir=args.data_dir, **overrides)
    check_rules(settings.routing_rules)
    return settings
