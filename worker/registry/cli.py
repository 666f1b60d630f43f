"""``dicom-triage dataset export|from-dicom``, ``models list|show|promote|rollback|retrain`` and ``training-worker``.

Hook into the main command with ``register(subparsers)``. Exit status 0 on success, 2 for bad input or a refused
operation (the message says why), so scripts can tell them apart.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path
from typing import Any

from config import Settings
from models.tasks import TASKS
from worker.cli_options import add_settings_options, add_supervisor_option, read_settings


def _database(settings: Settings) -> Any:
    from worker.db import Database, upgrade_database
    from worker.registry import register_installed_models

    database = Database(settings.effective_database_url)
    upgrade_database(database)
    register_installed_models(database, settings)
    return database


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def _fail(message: str) -> int:
    print(f"dicom-triage: {message}", file=sys.stderr)
    return 2


def _export(args: argparse.Namespace) -> int:
    from models.tasks import get_task
    from worker.export import ExportError, export_dataset

    settings = read_settings(args)
    if args.confirmed_only and args.include_unreviewed:
        return _fail(f"--confirmed-only and {INCLUDE_UNREVIEWED} contradict each other; give one")
    try:
        result = export_dataset(_database(settings), settings, get_task(args.task), args.out,
                                confirmed_only=not args.include_unreviewed, since=args.since)
    except ExportError as exc:
        return _fail(str(exc))
    _print_export(result)
    return 0


def _print_export(result: Any) -> None:
    counts, patients = result.counts(), result.patients()
    print(f"exported {result.images} images of {len(result.series)} series to {result.out_dir}")
    for split, per_class in counts.items():
        total = sum(per_class.values())
        print(f"  {split}: " + (", ".join(
            f"{k}={v} images ({v / total:.0%}) of {patients[split].get(k, 0)} patients"
            for k, v in sorted(per_class.items())) or "none"))
    for skipped in result.skipped:
        print(f"  skipped series {skipped['pseudo_series']}: {skipped['reason']}")
    if result.model_labels():
        print(f"  {result.model_labels()} images are labelled with the model's own unreviewed result")
    if result.unreviewed_left_out:
        print(f"  left out {result.unreviewed_left_out} unreviewed results (only radiologist-confirmed or corrected "
              f"labels by default; {INCLUDE_UNREVIEWED} adds them)")


#: The one flag name, on ``dataset export`` and ``models retrain``, that adds unreviewed model results as labels.
INCLUDE_UNREVIEWED = "--include-unreviewed"


def _add_unreviewed_option(parser: argparse.ArgumentParser, *aliases: str) -> None:
    parser.add_argument(INCLUDE_UNREVIEWED, *aliases, dest="include_unreviewed", action="store_true",
                        help="also series nobody reviewed, labelled with the model's own result (default: only "
                             "radiologist-confirmed or corrected labels)")


def _from_dicom(args: argparse.Namespace) -> int:
    from models.tasks import get_task
    from worker.export import ExportError, export_dicom_tree

    try:
        result = export_dicom_tree(read_settings(args), get_task(args.task), args.dicom, args.labels, args.out)
    except ExportError as exc:
        return _fail(str(exc))
    _print_export(result)
    return 0


def _list(args: argparse.Namespace) -> int:
    from worker.registry import describe, list_models

    with _database(read_settings(args)).session() as session:
        models = [describe(m) for m in list_models(session, args.task, args.state)]
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    print(f"{'task':<12} {'state':<10} {'name':<28} {'created':<26} uid")
    for m in models:
        print(f"{m['task']:<12} {m['state']:<10} {m['name'][:28]:<28} {m['created_at']:<26} {m['model_uid']}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from worker.registry import RegistryError, describe, get_model, model_events

    with _database(read_settings(args)).session() as session:
        try:
            model = get_model(session, args.uid)
        except RegistryError as exc:
            return _fail(str(exc))
        shown = describe(model)
        shown["card"] = model.card
        shown["data_manifest"] = model.data_manifest
        shown["events"] = [
            {"action": e.action, "actor": e.actor, "reason": e.reason, "at": e.created_at.isoformat(),
             "details": e.details}
            for e in model_events(session, model)
        ]
    if args.json:
        print(json.dumps(shown, indent=2))
        return 0
    for key in ("model_uid", "task", "state", "name", "version", "architecture", "model_dir", "created_at",
                "promoted_at", "promoted_by", "parent_uid"):
        print(f"{key:<13} {shown[key]}")
    for split, metrics in shown["metrics"].items():
        print(f"{split:<13} accuracy {metrics.get('accuracy', float('nan')):.4f}")
    series = shown["data_manifest"].get("series", [])
    print(f"data          {len(series)} archive series, external {shown['data_manifest'].get('external', [])}")
    for event in shown["events"]:
        reason = f": {event['reason']}" if event["reason"] else ""
        print(f"  {event['at']} {event['action']} by {event['actor']}{reason}")
    return 0


def _promote(args: argparse.Namespace) -> int:
    from worker.registry import PromotionRefused, RegistryError, promote

    settings = read_settings(args)
    if args.force and not (args.reason or "").strip():
        return _fail("--force needs --reason: a forced promotion is logged with why")
    try:
        outcome = promote(_database(settings), settings, args.uid, args.actor,
                          force_reason=args.reason if args.force else None)
    except PromotionRefused as exc:
        print(json.dumps(exc.decision.to_dict(), indent=2), file=sys.stderr)
        return _fail(f"{exc} (to promote anyway: --force --reason TEXT)")
    except RegistryError as exc:
        return _fail(str(exc))
    print(f"{outcome.task}: {outcome.model_uid} is active" + (" (forced)" if outcome.forced else "")
          + (f", replacing {outcome.replaced_uid}" if outcome.replaced_uid else ""))
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from worker.registry import RegistryError, rollback

    try:
        outcome = rollback(_database(read_settings(args)), args.task, args.actor, args.reason or "")
    except RegistryError as exc:
        return _fail(str(exc))
    print(f"{outcome.task}: rolled back from {outcome.replaced_uid} to {outcome.model_uid}")
    return 0


def _retrain(args: argparse.Namespace) -> int:
    from worker.celery_app import create_celery_app
    from worker.retraining import RetrainOptions, make_send, request_retraining

    settings = read_settings(args)
    try:
        options = RetrainOptions(epochs=args.epochs, architecture=args.arch, input_size=args.input_size,
                                 batch_size=args.batch_size, confirmed_only=not args.include_unreviewed,
                                 since=args.since.isoformat() if args.since else None,
                                 external=tuple(args.external) if args.external else None,
                                 start_from_active=args.from_active, time_budget_minutes=args.time_budget)
    except ValueError as exc:
        return _fail(str(exc))
    database = _database(settings)
    run_id = request_retraining(database, make_send(create_celery_app(settings)), args.task, options,
                                args.actor)
    print(f"queued training run {run_id} on the training queue")
    from models.tasks import get_task
    from worker.export import label_counts

    counts = label_counts(database, get_task(args.task), options.since_date)
    if options.confirmed_only:
        print(f"  labels: {counts['reviewed']} radiologist-reviewed series; left out {counts['unreviewed']} "
              f"unreviewed results ({INCLUDE_UNREVIEWED} adds them)")
    else:
        print(f"  labels: {counts['reviewed']} radiologist-reviewed series and {counts['unreviewed']} series "
              "labelled with the model's own unreviewed result")
    return 0


def _training_worker(args: argparse.Namespace) -> int:
    from worker.retraining import run_training_worker

    return run_training_worker(read_settings(args))


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add ``dataset``, ``models`` and ``training-worker`` to the ``dicom-triage`` command."""
    dataset = subparsers.add_parser("dataset", help="export archived, confirmed series for training")
    dataset_actions = dataset.add_subparsers(dest="dataset_command", required=True, metavar="ACTION")
    export = dataset_actions.add_parser("export", help="confirmed series -> de-identified image folders")
    add_settings_options(export)
    export.add_argument("--task", required=True, choices=sorted(TASKS))
    export.add_argument("--out", required=True, type=Path, help="folder to create (must not exist or be empty)")
    _add_unreviewed_option(export)
    # The default since issue 23; kept so scripts written for the old opt-in still run.
    export.add_argument("--confirmed-only", action="store_true", help=argparse.SUPPRESS)
    export.add_argument("--since", type=_date, metavar="DATE", help="only series received on or after this date")
    export.set_defaults(handler=_export)
    from_dicom = dataset_actions.add_parser(
        "from-dicom", help="a labelled tree of DICOM series (not the archive) -> the same de-identified image folders")
    add_settings_options(from_dicom)
    from_dicom.add_argument("--task", required=True, choices=sorted(TASKS))
    from_dicom.add_argument("--dicom", required=True, type=Path, metavar="DIR", help="tree of DICOM series")
    from_dicom.add_argument("--labels", type=Path, metavar="FILE",
                            help="PATH-PREFIX<TAB>LABEL lines, as for evaluate --dicom (default: the first folder "
                                 "under DIR names the label)")
    from_dicom.add_argument("--out", required=True, type=Path, help="folder to create (must not exist or be empty)")
    from_dicom.set_defaults(handler=_from_dicom)

    models = subparsers.add_parser("models", help="the model registry: list, show, promote, roll back, retrain")
    actions = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="registered models")
    add_settings_options(listing)
    listing.add_argument("--task", choices=sorted(TASKS))
    listing.add_argument("--state", choices=["candidate", "active", "retired"])
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=_list)

    show = actions.add_parser("show", help="one model: card, metrics, data manifest, lineage, events")
    add_settings_options(show)
    show.add_argument("uid")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=_show)

    promote = actions.add_parser("promote", help="make a candidate active if the gate passes (or --force)")
    add_settings_options(promote)
    promote.add_argument("uid")
    promote.add_argument("--force", action="store_true", help="promote even if the gate refuses")
    promote.add_argument("--reason", help="why (required with --force; logged)")
    promote.add_argument("--actor", default="cli", help="who promotes (logged)")
    promote.set_defaults(handler=_promote)

    rollback = actions.add_parser("rollback", help="re-activate the model the active one replaced")
    add_settings_options(rollback)
    rollback.add_argument("task", choices=sorted(TASKS))
    rollback.add_argument("--reason", help="why (logged)")
    rollback.add_argument("--actor", default="cli", help="who rolls back (logged)")
    rollback.set_defaults(handler=_rollback)

    retrain = actions.add_parser("retrain", help="queue a retraining on the training queue")
    add_settings_options(retrain)
    retrain.add_argument("task", choices=sorted(TASKS))
    retrain.add_argument("--epochs", type=int, default=20)
    retrain.add_argument("--arch", default="triage-cnn")
    retrain.add_argument("--input-size", help="HxW or HxWxC (default: the architecture's)")
    retrain.add_argument("--batch-size", type=int, default=32)
    _add_unreviewed_option(retrain, "--all-results")  # --all-results: the old name, kept working
    retrain.add_argument("--since", type=_date, metavar="DATE")
    retrain.add_argument("--external", action="append", metavar="DIR",
                         help="external labelled folder (repeatable; default: the external_training_data setting)")
    retrain.add_argument("--time-budget", type=float, metavar="MINUTES",
                         help="wall-clock limit of the training: it ends at the last epoch that fits")
    retrain.add_argument("--from-active", action="store_true",
                         help="start from the active model's weights (fine-tune) instead of new ones")
    retrain.add_argument("--actor", default="cli", help="who asks (logged)")
    retrain.set_defaults(handler=_retrain)

    worker = subparsers.add_parser("training-worker", help="Celery worker on the training queue (retraining runs)")
    add_settings_options(worker)
    add_supervisor_option(worker)
    worker.set_defaults(handler=_training_worker)


__all__ = ["register"]
