"""The model registry: register trained models, find each task's active one, promote through the gate, roll back.

Every model is a row of :class:`worker.db.registry.RegisteredModel` pointing at its folder (``model.keras`` +
``card.json``). A task has at most one ``active`` model; promoting a candidate retires the model it replaces, and
a rollback retires the active model and re-activates the one promoted before it. Every change is a
:class:`~worker.db.registry.ModelEvent` naming who did it and, for a forced promotion, why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, defer

from config import Settings
from models.card import CARD_FILE, MODEL_FILE, ModelCard
from models.inference import default_model_dir
from models.tasks import TASKS, get_task
from worker.db import Database, utcnow
from worker.db.registry import ModelEvent, ModelState, RegisteredModel
from worker.registry.gate import GateDecision, evaluate_on_reference, gate_decision, load_reference_set

log = logging.getLogger(__name__)

#: The actor recorded when the shipped (or configured) models register themselves as the first active ones.
INSTALLED_ACTOR = "installed"


class RegistryError(ValueError):
    """A registry operation cannot be done; ``status`` is the HTTP status the web pages answer with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


class PromotionRefused(RegistryError):
    """The gate refused the candidate; ``decision`` holds every comparison."""

    def __init__(self, decision: GateDecision) -> None:
        super().__init__("promotion refused by the gate: " + "; ".join(decision.failures), status=409)
        self.decision = decision


def _event(session: Session, model: RegisteredModel, action: str, actor: str, reason: str = "",
           **details: Any) -> None:
    session.add(ModelEvent(model_pk=model.id, action=action, actor=actor, reason=reason, details=details))


def register_model(
    session: Session,
    model_dir: Path | str,
    *,
    actor: str,
    state: ModelState = ModelState.CANDIDATE,
    data_manifest: dict[str, Any] | None = None,
    parent_uid: str | None = None,
) -> RegisteredModel:
    """Register the model in ``model_dir`` (its card names it); a UID already registered is returned as is."""
    model_dir = Path(model_dir).resolve()
    if not (model_dir / MODEL_FILE).is_file():
        raise RegistryError(f"{model_dir} has no {MODEL_FILE}")
    card = ModelCard.load(model_dir / CARD_FILE)
    existing = session.scalar(select(RegisteredModel).where(RegisteredModel.model_uid == card.uid))
    if existing is not None:
        if Path(existing.model_dir) != model_dir:
            raise RegistryError(f"model UID {card.uid} is already registered from {existing.model_dir}", status=409)
        return existing
    if state is ModelState.ACTIVE and active_model(session, card.task) is not None:
        raise RegistryError(f"{card.task} already has an active model; register a candidate and promote it")
    model = RegisteredModel(
        model_uid=card.uid, task=card.task, name=card.name, version=card.version, architecture=card.architecture,
        state=state.value, model_dir=str(model_dir), card=card.to_dict(), data_manifest=data_manifest or {},
        parent_uid=parent_uid, reference_metrics={},
    )
    if state is ModelState.ACTIVE:
        model.promoted_at, model.promoted_by = utcnow(), actor
    session.add(model)
    session.flush()
    _event(session, model, "register", actor, state=state.value, model_dir=str(model_dir))
    return model


def installed_model_dir(settings: Settings, task_name: str) -> Path:
    """The model a task used before the registry: ``models_dir/<task>`` when configured, else the shipped one."""
    return settings.models_dir / task_name if settings.models_dir is not None else default_model_dir(task_name)


def register_installed_models(database: Database, settings: Settings) -> list[str]:
    """Register each task's installed model as its active one, for tasks the registry knows nothing of yet.

    Idempotent and cheap (one query per task); every process that reads the registry calls it first, so the
    shipped models are the initial active ones. Returns the UIDs registered now.
    """
    registered = []
    for task_name in TASKS:
        folder = installed_model_dir(settings, task_name)
        if not (folder / CARD_FILE).is_file():
            continue
        try:
            with database.session() as session:
                if session.scalar(select(RegisteredModel.id).where(RegisteredModel.task == task_name).limit(1)):
                    continue
                try:
                    model = register_model(session, folder, actor=INSTALLED_ACTOR, state=ModelState.ACTIVE)
                except (RegistryError, ValueError, OSError) as exc:
                    log.error("installed %s model in %s not registered: %s", task_name, folder, exc)
                    continue
                uid = model.model_uid
        except IntegrityError:
            # Processes starting together on a fresh database (two workers) race to register the same model: the
            # one whose insert lost finds it registered, which is what it wanted.
            log.info("installed %s model registered by another process meanwhile", task_name)
            continue
        registered.append(uid)
    return registered


def active_model(session: Session, task_name: str) -> RegisteredModel | None:
    return session.scalar(
        select(RegisteredModel).where(RegisteredModel.task == task_name, RegisteredModel.state == ModelState.ACTIVE)
    )


def active_model_dirs(database: Database) -> Callable[[str], Path | None]:
    """``task -> folder of its active model`` (or ``None``), read from the database at each call: what a worker
    asks when a job starts, so a promotion takes effect without a restart."""

    def resolve(task_name: str) -> Path | None:
        with database.session() as session:
            found = session.scalar(
                select(RegisteredModel.model_dir).where(
                    RegisteredModel.task == task_name, RegisteredModel.state == ModelState.ACTIVE
                )
            )
        return Path(found) if found else None

    return resolve


def get_model(session: Session, model_uid: str) -> RegisteredModel:
    model = session.scalar(select(RegisteredModel).where(RegisteredModel.model_uid == model_uid))
    if model is None:
        raise RegistryError(f"no registered model with UID {model_uid}", status=404)
    return model


def list_models(session: Session, task: str | None = None, state: str | None = None) -> list[RegisteredModel]:
    # Without the training data manifests: a model trained on the archive lists every series it was trained on,
    # and the lists show none of it (it loads, by model, if read: get_model's page shows it).
    query = select(RegisteredModel).options(defer(RegisteredModel.data_manifest)).order_by(
        RegisteredModel.task, RegisteredModel.created_at.desc(), RegisteredModel.id.desc())
    if task is not None:
        query = query.where(RegisteredModel.task == get_task(task).name)
    if state is not None:
        query = query.where(RegisteredModel.state == ModelState(state).value)
    return list(session.scalars(query))


def model_events(session: Session, model: RegisteredModel) -> list[ModelEvent]:
    return list(session.scalars(select(ModelEvent).where(ModelEvent.model_pk == model.id).order_by(ModelEvent.id)))


def describe(model: RegisteredModel) -> dict[str, Any]:
    """The JSON form of a model for ``models list/show --json`` and the web pages."""
    return {
        "model_uid": model.model_uid,
        "task": model.task,
        "state": model.state,
        "name": model.name,
        "version": model.version,
        "architecture": model.architecture,
        "model_dir": model.model_dir,
        "created_at": model.created_at.isoformat(),
        "promoted_at": model.promoted_at.isoformat() if model.promoted_at else None,
        "promoted_by": model.promoted_by,
        "parent_uid": model.parent_uid,
        "metrics": model.card.get("metrics", {}),
        "reference_metrics": model.reference_metrics,
    }


def model_card(model_dir: Path | str, registered: dict[str, Any]) -> dict[str, Any]:
    """The card as its folder holds it now, else the one stored at registration.

    ``evaluate --dicom ... --record-split external`` adds the external split to ``card.json`` after the model was
    registered; the gate must compare what the card says today."""
    try:
        return ModelCard.load(Path(model_dir) / CARD_FILE).to_dict()
    except (OSError, ValueError, KeyError, TypeError):
        return registered


def reference_metrics(database: Database, settings: Settings, model_uid: str) -> dict[str, Any]:
    """The model's metrics on its task's reference set, evaluated once per reference content and kept in the row."""
    with database.session() as session:
        model = get_model(session, model_uid)
        task, model_dir, cached = get_task(model.task), model.model_dir, dict(model.reference_metrics)
    folder = settings.reference_sets.get(task.name)
    if folder is None:
        raise RegistryError(f"no reference set is configured for {task.name} (setting reference_sets)")
    reference = load_reference_set(folder, task)
    if reference.manifest_sha256 in cached:
        return cached[reference.manifest_sha256]
    metrics = evaluate_on_reference(model_dir, reference, settings.inference_batch_size)
    with database.session() as session:
        model = get_model(session, model_uid)
        # Reassign (not mutate) so SQLAlchemy sees the JSON column change.
        model.reference_metrics = {**model.reference_metrics, reference.manifest_sha256: metrics}
    return metrics


@dataclass(frozen=True)
class PromotionOutcome:
    model_uid: str
    task: str
    replaced_uid: str | None
    forced: bool
    decision: GateDecision | None


def promote(
    database: Database, settings: Settings, model_uid: str, actor: str, force_reason: str | None = None
) -> PromotionOutcome:
    """Make a candidate (or retired) model its task's active one if the gate passes, or if forced with a reason.

    The gate compares on the reference set (see :mod:`worker.registry.gate`). A refusal is logged and raised as
    :class:`PromotionRefused`; a forced promotion logs its reason and the gate's findings. With no active model to
    compare with, the model is promoted without the gate.
    """
    force_reason = (force_reason or "").strip() or None
    with database.session() as session:
        model = get_model(session, model_uid)
        if model.state == ModelState.ACTIVE:
            raise RegistryError(f"{model_uid} is already the active {model.task} model", status=409)
        task_name = model.task
        current = active_model(session, task_name)
        current_uid = current.model_uid if current else None
        cards = (model_card(model.model_dir, model.card), model_card(current.model_dir, current.card)) \
            if current is not None else None
    decision: GateDecision | None = None
    if current_uid is not None and cards is not None:
        try:
            decision = gate_decision(reference_metrics(database, settings, model_uid),
                                     reference_metrics(database, settings, current_uid), settings.promotion_tolerance)
            decision = decision.with_external(*cards)  # the real-DICOM split, where the active card has one
        except (RegistryError, ValueError, OSError) as exc:
            if force_reason is None:
                raise RegistryError(f"the gate cannot evaluate: {exc}; force the promotion with a reason") from exc
            log.warning("forced promotion of %s without the gate: %s", model_uid, exc)
        if decision is not None and not decision.passed and force_reason is None:
            with database.session() as session:
                refused = get_model(session, model_uid)
                refused.card = cards[0]  # the card the gate read, external split included, shown on its page
                _event(session, refused, "promotion_refused", actor, gate=decision.to_dict(), active_uid=current_uid)
            raise PromotionRefused(decision)
    forced = force_reason is not None and (decision is None or not decision.passed) and current_uid is not None
    with database.session() as session:
        # Lock the task's rows so two concurrent promotions cannot leave two active models.
        rows = session.scalars(
            select(RegisteredModel).where(RegisteredModel.task == task_name).with_for_update()
        ).all()
        model = next(r for r in rows if r.model_uid == model_uid)
        current = next((r for r in rows if r.state == ModelState.ACTIVE), None)
        if (current.model_uid if current else None) != current_uid:
            raise RegistryError("the active model changed meanwhile; try again", status=409)
        if current is not None:
            current.state = ModelState.RETIRED.value
            _event(session, current, "retire", actor, replaced_by=model_uid)
            session.flush()  # the retirement lands before the new activation
        model.state = ModelState.ACTIVE.value
        model.promoted_at, model.promoted_by = utcnow(), actor
        if cards is not None:
            model.card = cards[0]
        _event(session, model, "promote_forced" if forced else "promote", actor, force_reason if forced else "",
               replaced_uid=current_uid, gate=decision.to_dict() if decision else None)
    log.info("%s promoted %s model %s%s", actor, task_name, model_uid, f" (forced: {force_reason})" if forced else "")
    return PromotionOutcome(model_uid, task_name, current_uid, forced, decision)


def rollback(database: Database, task_name: str, actor: str, reason: str = "") -> PromotionOutcome:
    """Retire the task's active model and re-activate the model its promotion replaced.

    The target comes from the active model's promotion event, not from dates, so rolling back twice walks back
    along the promotions (C -> B -> A) and never re-activates a model that was itself rolled back.
    """
    task = get_task(task_name)
    with database.session() as session:
        rows = session.scalars(select(RegisteredModel).where(RegisteredModel.task == task.name).with_for_update()).all()
        current = next((r for r in rows if r.state == ModelState.ACTIVE), None)
        if current is None:
            raise RegistryError(f"{task.name} has no active model to roll back", status=409)
        promotion = session.scalar(
            select(ModelEvent)
            .where(ModelEvent.model_pk == current.id, ModelEvent.action.in_(("promote", "promote_forced")))
            .order_by(ModelEvent.id.desc())
            .limit(1)
        )
        previous_uid = (promotion.details or {}).get("replaced_uid") if promotion else None
        previous = next((r for r in rows if r.model_uid == previous_uid), None)
        if previous is None:
            raise RegistryError(f"{task.name}'s active model {current.model_uid} replaced no earlier model; "
                                "there is nothing to roll back to", status=409)
        current.state = ModelState.RETIRED.value
        _event(session, current, "rollback", actor, reason.strip(), restored_uid=previous.model_uid)
        session.flush()
        previous.state = ModelState.ACTIVE.value
        _event(session, previous, "restore", actor, reason.strip(), replaced_uid=current.model_uid)
        outcome = PromotionOutcome(previous.model_uid, task.name, current.model_uid, False, None)
    log.info("%s rolled %s back from %s to %s", actor, task.name, outcome.replaced_uid, outcome.model_uid)
    return outcome


__all__ = [
    "INSTALLED_ACTOR",
    "PromotionOutcome",
    "PromotionRefused",
    "RegistryError",
    "active_model",
    "active_model_dirs",
    "describe",
    "get_model",
    "installed_model_dir",
    "list_models",
    "model_card",
    "model_events",
    "promote",
    "reference_metrics",
    "register_installed_models",
    "register_model",
    "rollback",
]
