"""The ``dicom-triage`` command.

Each area registers its own subcommands (``training.cli``: train, evaluate; ``worker.registry.cli``: models,
dataset; ``worker.backfill_cli``; ``worker.web.cli``: web, users, tokens; this module: serve, listen, worker,
results, status, sr, tls) and this module assembles them. Settings are read once per command by
``worker.cli_options.read_settings``, from ``--config FILE``, ``DICOM_TRIAGE_*`` variables and the command's flags,
and passed down.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from config import ConfigError
from worker.cli_options import add_settings_options, add_supervisor_option, read_settings
from worker.errors import StartupError
from worker.logs import ENV as LOG_FORMAT_ENV
from worker.logs import FORMATS, configure_logging


def _add_sr_destination_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sr-destination", action="append", dest="sr_destinations", metavar="AE@HOST:PORT",
        help="send every SR to this DICOM peer (repeatable; replaces sr_destinations from the config)",
    )


def _add_network_options(parser: argparse.ArgumentParser, web: bool) -> None:
    parser.add_argument("--dicom-port", type=int, metavar="N", help="DICOM port to listen on")
    parser.add_argument("--dicom-host", metavar="ADDRESS", help="DICOM bind address")
    parser.add_argument("--ae-title", metavar="AE", help="our AE title")
    parser.add_argument(
        "--processes", type=int, dest="listen_processes", metavar="N",
        help="listener processes sharing the DICOM port (listen_processes; each accepts up to max_associations)",
    )
    if web:
        from worker.web.cli import add_web_tls_options

        parser.add_argument("--web-port", type=int, metavar="N", help="web worklist port")
        add_web_tls_options(parser)
    else:
        _add_health_options(parser)


def _add_health_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--health-port", type=int, metavar="N",
                        help="serve /healthz, /readyz and /metrics on this port (health_port; 0: none)")
    parser.add_argument("--health-host", metavar="ADDRESS", help="their address (health_host; default loopback)")


# Settings are checked before the service modules (pynetdicom, Celery, TensorFlow) are imported: a bad value is
# reported at once.
def _serve(args: argparse.Namespace) -> int:
    settings = read_settings(args)
    from worker.multiproc import use_multiprocess_dir

    use_multiprocess_dir(settings.data_dir / "run")  # before prometheus_client is imported; children inherit it
    from worker.lifetime import exit_now
    from worker.service import run_serve

    # Stopped: children ended, database and lock released. The interpreter's teardown would add 1-4 s to the stop
    # bound (worker.lifetime.STOP_BOUND_SECONDS) on a loaded machine.
    exit_now(run_serve(settings, args.config))


def _listen(args: argparse.Namespace) -> int:
    settings = read_settings(args)
    from worker.multiproc import use_multiprocess_dir

    if settings.listen_processes > 1:  # the listener processes count, the supervisor's /metrics adds them up
        use_multiprocess_dir(settings.data_dir / "run")
    from worker.lifetime import exit_now
    from worker.service import run_listen

    exit_now(run_listen(settings))  # as serve's


def _worker(args: argparse.Namespace) -> int:
    settings = read_settings(args)
    from worker.service import run_worker

    return run_worker(settings, args.queue)


def _results(args: argparse.Namespace) -> int:
    from worker.db import Database
    from worker.report import write_json, write_text

    settings = read_settings(args)
    url = make_url(settings.effective_database_url)
    if url.get_backend_name() == "sqlite" and not Path(url.database or "").is_file():
        raise ConfigError(f"no database at {url.database}: has dicom-triage received anything with this --data-dir?")
    database = Database(settings.effective_database_url)
    try:
        # Streamed: a million series are written as they are read, not built in memory first (issue 22).
        (write_json if args.json else write_text)(database, sys.stdout, args.study)
    finally:
        database.dispose()
    return 0


def _status(args: argparse.Namespace) -> int:
    from worker.status import format_status, status_report

    settings = read_settings(args)
    report = status_report(settings)
    print(json.dumps(report, indent=2, default=str) if args.json else format_status(report))
    return 0 if report["ready"] else 1


def _sr_show(args: argparse.Namespace) -> int:
    from dicom_io.sr import SRError, describe

    try:
        print(describe(args.file))
    except SRError as exc:
        print(f"dicom-triage: {exc}", file=sys.stderr)
        return 1
    return 0


def _tls_make_dev_certs(args: argparse.Namespace) -> int:
    from dicom_io.tls import make_dev_certs

    try:
        written = make_dev_certs(args.directory, hosts=tuple(args.host or ("localhost", "127.0.0.1")))
    except OSError as exc:
        print(f"dicom-triage: cannot write certificates to {args.directory}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    for name, path in vars(written).items():
        print(f"{name}: {path}")
    print("for trying TLS out only: not for production (unencrypted keys, a CA nobody else trusts)")
    return 0


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the worker's subcommands."""
    tls = subparsers.add_parser("tls", help="TLS helpers")
    tls_commands = tls.add_subparsers(dest="tls_command", required=True, metavar="TLS_COMMAND")
    dev = tls_commands.add_parser(
        "make-dev-certs", help="write a local CA, a server and a client certificate (not for production)")
    dev.add_argument("directory", type=Path, metavar="DIR")
    dev.add_argument("--host", action="append", metavar="NAME",
                     help="a name or address the server certificate is for (repeatable; default localhost, "
                          "127.0.0.1)")
    dev.set_defaults(handler=_tls_make_dev_certs)

    serve = subparsers.add_parser("serve", help="listener, scheduler, web worklist and workers in one")
    add_settings_options(serve)
    _add_network_options(serve, web=True)
    _add_sr_destination_option(serve)
    serve.set_defaults(handler=_serve)

    listen = subparsers.add_parser("listen", help="DICOM listener and series scheduler")
    add_settings_options(listen)
    _add_network_options(listen, web=False)
    _add_sr_destination_option(listen)
    listen.set_defaults(handler=_listen)

    worker = subparsers.add_parser("worker", help="Celery inference worker")
    add_settings_options(worker)
    _add_sr_destination_option(worker)
    worker.add_argument("--ae-title", metavar="AE", help="our AE title (the calling AE of SR deliveries)")
    _add_health_options(worker)
    worker.add_argument(
        "--queue", choices=("inference", "delivery"), default="inference",
        help="inference: classify series (default); delivery: send SRs to their destinations",
    )
    add_supervisor_option(worker)
    worker.set_defaults(handler=_worker)

    results = subparsers.add_parser("results", help="series states and results")
    add_settings_options(results)
    results.add_argument("--study", metavar="UID", help="only this StudyInstanceUID")
    results.add_argument("--json", action="store_true", help="print JSON")
    results.set_defaults(handler=_results)

    status = subparsers.add_parser(
        "status", help="every process's readiness, queues, delivery backlog, disk free, active models")
    add_settings_options(status)
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(handler=_status)

    sr = subparsers.add_parser("sr", help="our Structured Reports")
    sr_commands = sr.add_subparsers(dest="sr_command", required=True, metavar="SR_COMMAND")
    show = sr_commands.add_parser("show", help="summarise one of our SR files")
    show.add_argument("file", type=Path, metavar="FILE")
    show.set_defaults(handler=_sr_show)


def _evaluate_dicom(args: argparse.Namespace, curated: Any) -> int:
    """``evaluate --dicom``: the worker's own path on labelled DICOM series; without it, training's evaluate."""
    if not args.dicom:
        return int(curated(args) or 0)
    if args.data:
        raise ConfigError("evaluate takes --data (curated images) or --dicom (DICOM series), not both")
    from models.tasks import get_task
    from worker.evaluation import EvaluationError, run_dicom_evaluate

    settings = read_settings(args)
    try:
        return run_dicom_evaluate(get_task(args.task), args.dicom, args.labels, Path(args.model) if args.model else None,
                                  Path(args.json) if args.json else None, args.record_split, settings.routing_rules,
                                  args.batch_size)
    except (EvaluationError, FileNotFoundError, ValueError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2


def _add_dicom_evaluation(evaluate: argparse.ArgumentParser) -> None:
    """``evaluate --dicom`` runs the worker's path (routing, decoding, series decision), which the training
    package does not import: the worker adds it to training's ``evaluate``."""
    evaluate.add_argument("--dicom", type=Path, metavar="DIR",
                          help="score the worker's own path per series on a tree of real DICOM series")
    evaluate.add_argument("--labels", type=Path, metavar="FILE",
                          help="with --dicom: PATH-PREFIX<TAB>LABEL lines (a class name or 'out-of-domain'); "
                               "default: the first folder under DIR names the label")
    evaluate.add_argument("--record-split", metavar="NAME",
                          help="with --dicom: write the series figures into the model's card as this split "
                               "(e.g. external)")
    add_settings_options(evaluate)
    curated = evaluate.get_default("handler")
    evaluate.set_defaults(handler=lambda args: _evaluate_dicom(args, curated))


def build_parser() -> argparse.ArgumentParser:
    from training import cli as training_cli
    from worker import backfill_cli
    from worker.registry import cli as registry_cli
    from worker.web import cli as web_cli

    parser = argparse.ArgumentParser(prog="dicom-triage", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register(subparsers)
    training_cli.register(subparsers)
    _add_dicom_evaluation(subparsers.choices["evaluate"])
    registry_cli.register(subparsers)
    backfill_cli.register(subparsers)
    web_cli.register(subparsers)
    parser.add_argument("--log-format", choices=FORMATS, help="text (default) or json: one object a line")
    for sub in subparsers.choices.values():  # also after the command: dicom-triage serve --log-format json
        sub.add_argument("--log-format", choices=FORMATS, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.log_format:
        # A setting like any other from here on: the children serve starts inherit it with the environment.
        os.environ[LOG_FORMAT_ENV] = args.log_format
    configure_logging(args.log_format, role=getattr(args, "command", "") or "")
    if getattr(args, "supervisor_pid", None) is not None:
        # Before anything slow (settings, the database, TensorFlow): a child must not outlive its supervisor.
        from worker.lifetime import die_with_parent

        die_with_parent(args.supervisor_pid)
    try:
        return int(args.handler(args) or 0)
    except ConfigError as exc:
        print(f"dicom-triage: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"dicom-triage: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
