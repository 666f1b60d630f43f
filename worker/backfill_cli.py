"""``dicom-triage backfill plan|run|status|cancel|retry`` (issue 19): see :mod:`worker.backfill`."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from config import ConfigError
from worker.cli_options import add_settings_options, read_settings

T = TypeVar("T")
#: Where ``backfill plan --from-dicomweb`` reads the source's bearer token when ``--token`` is not given (a token on
#: the command line shows in the process list).
TOKEN_VARIABLE = "DICOM_TRIAGE_DICOMWEB_TOKEN"


def _database(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from worker.service import open_database

    settings = read_settings(args)
    return settings, open_database(settings)


def _date_range(text: str) -> str:
    if not re.fullmatch(r"\d{8}(-\d{8})?|-\d{8}|\d{8}-", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a DICOM date or range (YYYYMMDD-YYYYMMDD)")
    return text


def _plan(args: argparse.Namespace) -> int:
    from dicom_io.dicomweb import DicomwebError
    from dicom_io.retrieve import QueryError
    from dicom_io.scu import AssociationError
    from worker.backfill import make_plan
    from worker.backfill_dicomweb import make_dicomweb_plan

    settings, database = _database(args)
    try:
        if args.dicomweb:
            summary = make_dicomweb_plan(database, args.dicomweb, args.token or os.environ.get(TOKEN_VARIABLE),
                                         args.modality, args.study_date, args.description or "", args.limit)
        else:
            summary = make_plan(database, settings, args.source, args.modality, args.study_date,
                                args.description or "", args.limit)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    except (AssociationError, QueryError, DicomwebError) as exc:
        print(f"dicom-triage: backfill plan: {exc}", file=sys.stderr)
        return 1
    finally:
        database.dispose()
    instances = summary.instances if summary.instances is not None else "unknown"
    print(f"plan {summary.plan_id}: {summary.studies} studies, {summary.series} series, {instances} instances")
    return 0


def _on_plan(args: argparse.Namespace, action: Callable[[Any], T]) -> T | None:
    """``action(database)`` on the settings' database; ``None`` after printing a :class:`BackfillError` (a plan
    that does not exist or is in the wrong state)."""
    from worker.backfill import BackfillError

    _settings, database = _database(args)
    try:
        return action(database)
    except BackfillError as exc:
        print(f"dicom-triage: {exc}", file=sys.stderr)
        return None
    finally:
        database.dispose()


def _run(args: argparse.Namespace) -> int:
    from worker.backfill import start_plan

    if _on_plan(args, lambda db: start_plan(db, args.plan_id, args.max_in_flight, args.per_minute) or True) is None:
        return 1
    print(f"plan {args.plan_id} running: serve (or listen) retrieves it; see backfill status")
    return 0


def _status(args: argparse.Namespace) -> int:
    from worker.backfill import format_status, plan_status

    report = _on_plan(args, lambda db: plan_status(db, args.plan_id))
    if report is None:
        return 1
    print(json.dumps(report, indent=2) if args.json else format_status(report))
    return 0


def _cancel(args: argparse.Namespace) -> int:
    from worker.backfill import cancel_plan

    cancelled = _on_plan(args, lambda db: cancel_plan(db, args.plan_id))
    if cancelled is None:
        return 1
    print(f"plan {args.plan_id} cancelled ({cancelled} studies not retrieved)")
    return 0


def _retry(args: argparse.Namespace) -> int:
    from worker.backfill import retry_plan

    retried = _on_plan(args, lambda db: retry_plan(db, args.plan_id, args.include_cancelled))
    if retried is None:
        return 1
    print(f"plan {args.plan_id}: {retried} failed studies planned again")
    return 0


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    backfill = subparsers.add_parser(
        "backfill", help="retrieve past studies from a PACS (C-FIND, then C-MOVE or C-GET) or a DICOMweb source "
                         "(QIDO-RS, then WADO-RS)")
    commands = backfill.add_subparsers(dest="backfill_command", required=True, metavar="BACKFILL_COMMAND")

    plan = commands.add_parser("plan", help="query the PACS (C-FIND or QIDO-RS) and store what matches as a plan")
    add_settings_options(plan)
    source = plan.add_mutually_exclusive_group(required=True)
    source.add_argument("--from", dest="source", metavar="AE@HOST:PORT", help="the PACS (C-FIND, then C-MOVE)")
    source.add_argument("--from-dicomweb", dest="dicomweb", metavar="URL",
                        help="a DICOMweb service root (QIDO-RS, then WADO-RS), e.g. http://pacs:8042/dicom-web")
    plan.add_argument("--token", metavar="TOKEN",
                      help=f"bearer token of the DICOMweb source (default: ${TOKEN_VARIABLE})")
    plan.add_argument("--modality", required=True, metavar="MOD", help="e.g. MR or CT")
    plan.add_argument("--study-date", required=True, type=_date_range, metavar="A-B", help="YYYYMMDD-YYYYMMDD")
    plan.add_argument("--description", metavar="PATTERN", help="study description, DICOM wildcards (*, ?)")
    plan.add_argument("--limit", type=_count, metavar="N", help="at most N studies (the oldest first)")
    plan.add_argument("--ae-title", metavar="AE", help="our AE title (calling AE, and the C-MOVE destination)")
    plan.set_defaults(handler=_plan)

    run = commands.add_parser("run", help="start (or resume) retrieving a plan; serve does the retrieval")
    add_settings_options(run)
    run.add_argument("plan_id", type=int, metavar="PLAN_ID")
    run.add_argument("--max-in-flight", type=_count, metavar="N", help="studies moved but not yet classified")
    run.add_argument("--per-minute", type=_positive, metavar="R", help="studies started per minute")
    run.set_defaults(handler=_run)

    status = commands.add_parser("status", help="each plan's study counts per state, failures and ETA")
    add_settings_options(status)
    status.add_argument("plan_id", type=int, nargs="?", metavar="PLAN_ID")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(handler=_status)

    cancel = commands.add_parser("cancel", help="stop a plan; studies not yet moving are not retrieved")
    add_settings_options(cancel)
    cancel.add_argument("plan_id", type=int, metavar="PLAN_ID")
    cancel.set_defaults(handler=_cancel)

    retry = commands.add_parser("retry", help="plan a plan's failed studies again (their series received are kept); "
                                              "a done or cancelled plan runs again")
    add_settings_options(retry)
    retry.add_argument("plan_id", type=int, metavar="PLAN_ID")
    retry.add_argument("--include-cancelled", action="store_true",
                       help="also the studies a cancel failed")
    retry.set_defaults(handler=_retry)
