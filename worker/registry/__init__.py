"""The model registry: every trained model with its card, metrics, data manifest and lineage; promotion through a
gate on a fixed reference set; rollback. Tables in :mod:`worker.db.registry`."""

from worker.registry.gate import GateDecision, ReferenceSetError, gate_decision, load_reference_set
from worker.registry.store import (
    PromotionOutcome,
    PromotionRefused,
    RegistryError,
    active_model,
    active_model_dirs,
    describe,
    get_model,
    installed_model_dir,
    list_models,
    model_card,
    model_events,
    promote,
    reference_metrics,
    register_installed_models,
    register_model,
    rollback,
)

__all__ = [
    "GateDecision",
    "PromotionOutcome",
    "PromotionRefused",
    "ReferenceSetError",
    "RegistryError",
    "active_model",
    "active_model_dirs",
    "describe",
    "gate_decision",
    "get_model",
    "installed_model_dir",
    "list_models",
    "load_reference_set",
    "model_events",
    "promote",
    "reference_metrics",
    "register_installed_models",
    "register_model",
    "rollback",
]
