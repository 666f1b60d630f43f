"""``dicom-triage status``: the whole deployment at a glance, from the shared data directory and the database.

Every process's readiness comes from its status file (:mod:`worker.health`); queue depths, the oldest waiting job,
the delivery backlog and the active model per task from the database (:func:`worker.metrics.state_snapshot`, the
numbers ``/metrics`` shows); disk free from the archive's file system. Counts, states, task names and model
identities only: nothing about patients.
"""

from __future__ import annotations

from typing import Any

from config import Settings
from worker.health import read_statuses


def status_report(settings: Settings) -> dict[str, Any]:
    """The report ``status --json`` prints; ``ready`` is true when every process reports ready and the database
    answers."""
    from worker.db import Database
    from dicom_io.archive import free_bytes
    from worker.metrics import state_snapshot

    processes = read_statuses(settings.data_dir)
    report: dict[str, Any] = {"processes": processes}
    database = Database(settings.effective_database_url)
    try:
        snapshot = state_snapshot(database)
        report.update(
            queues=snapshot["queues"],
            oldest_waiting_job_seconds=snapshot["queues"]["inference"]["oldest_age_seconds"],
            delivery_backlog=snapshot["queues"]["delivery"]["depth"],
            deliveries_failed=sum(n for (_, status), n in snapshot["deliveries"].items() if status == "failed"),
            series=snapshot["series"],
            active_models=snapshot["active_models"],
            live_workers=snapshot["workers"],
            database="reachable",
        )
    except Exception as exc:  # the report still lists the processes, which say which check fails
        report["database"] = f"unreachable: {str(exc).splitlines()[0][:200]}"
    finally:
        database.dispose()
    try:
        report["disk"] = {"free_bytes": free_bytes(settings.archive_dir),
                          "watermark_bytes": settings.min_free_disk_mb * 2**20}
    except OSError as exc:
        report["disk"] = {"error": str(exc)}
    report["ready"] = bool(processes) and all(p.get("ready") for p in processes) and report["database"] == "reachable"
    return report


def format_status(report: dict[str, Any]) -> str:
    lines = [f"deployment: {'READY' if report['ready'] else 'NOT READY'}", "processes:"]
    if not report["processes"]:
        lines.append("  none reporting (is anything running with this --data-dir?)")
    for p in report["processes"]:
        state = "silent" if p.get("silent") else "ready" if p.get("ready") else "NOT READY"
        failing = [f"{c['name']}: {c['detail']}" for c in p.get("checks", []) if not c.get("ok")]
        where = f" {p['url']}" if p.get("url") else ""
        lines.append(f"  {p.get('role', '?'):<9} pid {p.get('pid')}@{p.get('host')}{where}: {state}"
                     + (f" ({'; '.join(failing)})" if failing else "") + f", reported {p.get('age_seconds')} s ago")
    lines.append(f"database: {report['database']}")
    if report["database"] == "reachable":
        for name, queue in report["queues"].items():
            lines.append(f"queue {name}: {queue['depth']} waiting, oldest {queue['oldest_age_seconds']:.0f} s")
        lines.append(f"delivery backlog: {report['delivery_backlog']} pending, {report['deliveries_failed']} failed")
        lines.append("series: " + ", ".join(f"{k} {v}" for k, v in sorted(report["series"].items())))
        lines.append(f"live workers: {report['live_workers']}")
        for task, model in sorted(report["active_models"].items()):
            lines.append(f"active model {task}: {model['name']} {model['version']} ({model['model_uid']})")
    disk = report["disk"]
    if "free_bytes" in disk:
        lines.append(f"disk free: {disk['free_bytes'] // 2**20} MB (watermark {disk['watermark_bytes'] // 2**20} MB)")
    return "\n".join(lines)
