"""Sending our Structured Reports to every configured destination: the ``deliver_sr`` task on the ``delivery`` queue.

Each (SR, destination) pair is one :class:`~worker.db.SrDelivery` row and its own task, so a destination that is
down delays only its own deliveries: classification and the other destinations go on. The row is the truth:
``pending`` (with ``attempts``, the last ``error`` and ``next_attempt_at``), ``sent`` or ``failed``.

Without flooding the PACS: one association per attempt, attempt *n* waits ``backoff * 2**(n-1)`` seconds (capped)
after a failure, and after ``sr_delivery_max_attempts`` attempts the delivery is ``failed`` for good.

Messages can be lost (Celery's filesystem broker forgets a fetched message when its worker dies) or duplicated
(a broker redelivering, the sweep below). Neither matters: before an attempt the task takes a lease on the row by
moving ``next_attempt_at`` past the attempt's longest duration, so a second message for the same row finds it not
due and drops itself; and the delivery worker re-sends a message for every pending row at start and for every row
overdue for long (the sweep).

A destination configured with ``tls = true`` is recorded as ``AE@HOST:PORT+tls`` and sent to over DICOM TLS only,
with the CA and client certificate of the configured destination of that name, read afresh for each attempt (a CA
bundle fixed on disk is used by the next retry). A certificate that does not verify, or a TLS destination no longer
configured, is a failed attempt with its reason, retried like any other: never a plain association.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from celery import Celery, Task
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from config import Destination, Settings
from dicom_io.scu import AssociationError, send_datasets
from dicom_io.tls import TLSConfigError, client_context
from worker.celery_app import create_celery_app, run_celery_worker
from worker.db import Database, SrDelivery, SrDocument, upgrade_database, utcnow
from worker.metrics import SR_DELIVERIES

log = logging.getLogger(__name__)

DELIVERY_QUEUE = "delivery"
DELIVER_SR = "dicom_triage.deliver_sr"

#: Parallel deliveries in one delivery worker: a slow destination holds one thread, not the others.
DELIVERY_CONCURRENCY = 4
#: Longer than one attempt can take (the connection, ACSE and DIMSE timeouts of dicom_io.scu: 30 + 30 + 120 s).
ATTEMPT_LEASE = timedelta(minutes=5)
#: A message may run this much before the row's ``next_attempt_at`` (clock differences between hosts).
EARLY_SLACK = timedelta(seconds=5)
#: How often the delivery worker looks for pending rows whose message seems lost, and how late they must be.
SWEEP_SECONDS = 60.0
OVERDUE = timedelta(minutes=2)

#: Sends ``deliver_sr(delivery_pk)`` after ``countdown`` seconds.
DeliveryEnqueue = Callable[[int, float], None]


class DeliveryStatus(str, enum.Enum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


@dataclass(frozen=True)
class AttemptOutcome:
    """What one call of :func:`attempt_delivery` did: the row's status after it, and when to try again."""

    status: DeliveryStatus
    #: Seconds until the next attempt (``pending`` only); ``None`` when this message has nothing more to do.
    retry_in: float | None = None


def backoff_seconds(settings: Settings, attempts: int) -> float:
    """The wait after the ``attempts``-th failed attempt: exponential from the base, capped."""
    exponent = min(max(attempts - 1, 0), 60)  # 2**60 seconds is past any cap; avoids float overflow
    return min(settings.sr_delivery_backoff_max_seconds, settings.sr_delivery_backoff_seconds * 2.0**exponent)


def _store_failure_reason(status: int) -> str | None:
    """``None`` when the C-STORE response ``status`` means the SR was stored (success or a warning)."""
    category = code_to_category(status)
    if category in ("Success", "Warning"):
        return None
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(status, (category, "unknown status"))[1]
    return f"C-STORE refused with status 0x{status:04X} ({category}: {meaning})"


def send_sr(path: Path, destination: Destination, calling_ae: str) -> str | None:
    """C-STORE the SR file at ``path`` (over TLS for a TLS destination); ``None`` on success, else why it was not
    stored."""
    tls = None
    if destination.tls:
        if destination.tls_ca is None:
            return f"{destination}: a TLS destination with no tls_ca configured (not sent over plain TCP)"
        try:
            tls = client_context(destination.tls_ca, destination.tls_cert, destination.tls_key)
        except TLSConfigError as exc:
            return f"{destination}: {exc}"
    try:
        (status,) = send_datasets([path], destination.host, destination.port, destination.ae_title, calling_ae,
                                  tls=tls)
    except AssociationError as exc:
        return str(exc)
    except (ValueError, RuntimeError) as exc:
        # pynetdicom raises ValueError when the peer accepted no presentation context for the SR's SOP class.
        return f"{destination}: {exc}"
    except OSError as exc:
        return f"{destination}: {type(exc).__name__}: {exc}"
    return _store_failure_reason(status)


def configured_destination(settings: Settings, text: str) -> Destination:
    """The destination a delivery row names: the configured one of that text form (with its TLS files), else the
    text parsed (a ``+tls`` one then has no CA, and is not sent)."""
    for destination in settings.sr_destinations:
        if str(destination) == text:
            return destination
    return Destination.parse(text)


def attempt_delivery(database: Database, settings: Settings, delivery_pk: int) -> AttemptOutcome | None:
    """Make one attempt to send a delivery's SR, if it is due, and record the outcome on its row.

    Returns ``None`` for an unknown row; the row's status, with no ``retry_in``, when it is settled or not due
    (another message holds it); otherwise its status after the attempt and, if still pending, the seconds until
    the next attempt.
    """
    now = utcnow()
    with database.session() as session:
        delivery = session.get(SrDelivery, delivery_pk, with_for_update=True)
        if delivery is None:
            log.warning("SR delivery %d does not exist; message dropped", delivery_pk)
            return None
        status = DeliveryStatus(delivery.status)
        if status is not DeliveryStatus.PENDING:
            return AttemptOutcome(status)
        if delivery.next_attempt_at is not None and delivery.next_attempt_at > now + EARLY_SLACK:
            return AttemptOutcome(status)
        delivery.attempts += 1
        delivery.next_attempt_at = now + ATTEMPT_LEASE
        delivery.updated_at = now
        attempts = delivery.attempts
        destination_text = delivery.destination
        path = Path(session.scalar(select(SrDocument.archive_path).where(SrDocument.id == delivery.document_pk)))

    give_up = False
    try:
        destination = configured_destination(settings, destination_text)
    except ValueError as exc:
        error: str | None = f"bad destination: {exc}"
        give_up = True
    else:
        if path.is_file():
            error = send_sr(path, destination, settings.ae_title)
        else:
            error, give_up = f"the SR file {path} is missing from the archive", True

    finished = utcnow()
    with database.session() as session:
        delivery = session.get_one(SrDelivery, delivery_pk, with_for_update=True)
        delivery.updated_at = finished
        if error is None:
            delivery.status, delivery.error, delivery.next_attempt_at = DeliveryStatus.SENT.value, "", None
            log.info("SR delivery %d sent to %s (attempt %d)", delivery_pk, destination_text, attempts,
                     extra={"ids": {"delivery_id": delivery_pk}})
            SR_DELIVERIES.labels(destination_text, "sent").inc()
            return AttemptOutcome(DeliveryStatus.SENT)
        delivery.error = error[:2000]
        if give_up or attempts >= settings.sr_delivery_max_attempts:
            delivery.status, delivery.next_attempt_at = DeliveryStatus.FAILED.value, None
            log.error("SR delivery %d to %s failed for good after %d attempt(s): %s",
                      delivery_pk, destination_text, attempts, error, extra={"ids": {"delivery_id": delivery_pk}})
            SR_DELIVERIES.labels(destination_text, "failed").inc()
            return AttemptOutcome(DeliveryStatus.FAILED)
        delay = backoff_seconds(settings, attempts)
        delivery.next_attempt_at = finished + timedelta(seconds=delay)
        log.warning("SR delivery %d to %s: attempt %d failed, next in %.1f s: %s",
                    delivery_pk, destination_text, attempts, delay, error, extra={"ids": {"delivery_id": delivery_pk}})
        SR_DELIVERIES.labels(destination_text, "retry").inc()
        return AttemptOutcome(DeliveryStatus.PENDING, retry_in=delay)


def make_delivery_enqueue(app: Celery) -> DeliveryEnqueue:
    """A function sending ``deliver_sr`` to the delivery queue through ``app``."""

    def enqueue(delivery_pk: int, countdown: float = 0.0) -> None:
        app.send_task(DELIVER_SR, args=[delivery_pk], queue=DELIVERY_QUEUE, countdown=countdown or None)

    return enqueue


_apps: dict[tuple[str, Path], Celery] = {}
_apps_lock = threading.Lock()


def delivery_enqueue(settings: Settings) -> DeliveryEnqueue:
    """The enqueue function for processes that do not run the delivery worker (one Celery app per broker)."""
    key = (settings.effective_broker_url, settings.broker_dir)
    with _apps_lock:
        if key not in _apps:
            _apps[key] = create_celery_app(settings)
        return make_delivery_enqueue(_apps[key])


def resume_deliveries(database: Database, enqueue: DeliveryEnqueue, overdue: timedelta = timedelta(0)) -> int:
    """Send a message for every pending delivery due more than ``overdue`` ago, or later when it is due.

    With ``overdue`` zero (at start) that is every pending row: their messages died with the previous worker.
    Returns the number of messages sent.
    """
    now = utcnow()
    with database.session() as session:
        rows = session.execute(
            select(SrDelivery.id, SrDelivery.next_attempt_at).where(SrDelivery.status == DeliveryStatus.PENDING.value)
        ).all()
    sent = 0
    for delivery_pk, next_attempt_at in rows:
        due = next_attempt_at or now
        if overdue and due > now - overdue:
            continue
        enqueue(delivery_pk, max(0.0, (due - now).total_seconds()))
        sent += 1
    return sent


def register_delivery_task(app: Celery, settings: Settings, database: Database) -> None:
    """Add ``deliver_sr`` to ``app``, bound to this process's settings and database."""

    @app.task(bind=True, name=DELIVER_SR, acks_late=True, ignore_result=True, max_retries=None, shared=False)
    def deliver_sr(self: Task, delivery_pk: int) -> None:
        try:
            outcome = attempt_delivery(database, settings, delivery_pk)
        except OperationalError as exc:  # the database is away: try the same message again later
            raise self.retry(exc=exc, countdown=backoff_seconds(settings, self.request.retries + 1))
        if outcome is not None and outcome.retry_in is not None:
            raise self.retry(countdown=outcome.retry_in)


def _sweep(database: Database, enqueue: DeliveryEnqueue, stop: threading.Event) -> None:
    while not stop.wait(SWEEP_SECONDS):
        try:
            if resent := resume_deliveries(database, enqueue, OVERDUE):
                log.warning("re-sent %d overdue SR delivery message(s)", resent)
        except Exception:  # the database or broker may be briefly away; the next sweep tries again
            log.exception("SR delivery sweep failed")


def run_delivery_worker(settings: Settings) -> int:
    """``dicom-triage worker --queue delivery``: a Celery worker sending SRs (no models loaded) until signalled."""
    from worker.health import ProcessHealth, Readiness, standard_checks

    database = Database(settings.effective_database_url)
    upgrade_database(database)
    app = create_celery_app(settings)
    register_delivery_task(app, settings, database)
    enqueue = make_delivery_enqueue(app)
    stop = threading.Event()
    health = ProcessHealth(settings, Readiness("delivery", standard_checks(settings, database))).start()
    try:
        if resumed := resume_deliveries(database, enqueue):
            log.info("resumed %d pending SR deliveries", resumed)
        threading.Thread(target=_sweep, args=(database, enqueue, stop), name="delivery-sweep", daemon=True).start()
        # On stop nothing is handed back: a delivery's row is its state, and a lease a stopped attempt held
        # expires; the next delivery worker's start sends every pending one again.
        return run_celery_worker(app, "delivery", DELIVERY_QUEUE, pool="threads",
                                 concurrency=DELIVERY_CONCURRENCY, handback=lambda _deadline: stop.set())
    finally:
        stop.set()
        health.stop()
        database.dispose()


__all__ = [
    "DELIVERY_QUEUE",
    "DELIVER_SR",
    "AttemptOutcome",
    "DeliveryStatus",
    "attempt_delivery",
    "backoff_seconds",
    "configured_destination",
    "delivery_enqueue",
    "make_delivery_enqueue",
    "register_delivery_task",
    "resume_deliveries",
    "run_delivery_worker",
    "send_sr",
]
