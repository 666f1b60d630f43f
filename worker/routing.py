"""Routing: which classifier (task) runs on a series, by the ``routing_rules`` in the settings.

The first rule whose every condition holds wins. A series no rule matches is ``not_applicable``; the reason
names, for each rule, the first condition that failed, so an administrator can see why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.uid import UID

from config import ConfigError, RoutingRule
from models.tasks import TASKS


@dataclass(frozen=True)
class SeriesFacts:
    """What routing looks at, gathered from the series' instances."""

    modality: str
    body_part_examined: str
    study_description: str
    series_description: str
    image_types: frozenset[str]
    slice_count: int
    #: The SOP Class UIDs of the series' instances.
    sop_classes: frozenset[str] = frozenset()


@dataclass(frozen=True)
class RoutingDecision:
    """``task`` is ``None`` when no rule matches; ``reason`` says which rule matched or why none did."""

    task: str | None
    reason: str


def check_rules(rules: tuple[RoutingRule, ...]) -> None:
    """Raise :class:`ConfigError` if a rule names a task no classifier exists for."""
    unknown = sorted({rule.task for rule in rules} - set(TASKS))
    if unknown:
        raise ConfigError(
            f"invalid settings:\n  routing_rules: unknown task(s) {', '.join(map(repr, unknown))}; "
            f"known tasks: {', '.join(TASKS)}"
        )


def _sop_class_name(uid: str) -> str:
    """A SOP Class UID as pydicom names it ('Secondary Capture Image Storage'), else the UID itself."""
    name = UID(uid).name
    return name if name and name != uid else uid


def _mismatch(rule: RoutingRule, facts: SeriesFacts) -> str | None:
    """The first condition of ``rule`` that ``facts`` fail, or ``None`` if all hold."""
    if rule.modalities and facts.modality.upper() not in {m.upper() for m in rule.modalities}:
        return f"modality {facts.modality or '(none)'!s} not in {'/'.join(rule.modalities)}"
    if rule.body_parts and facts.body_part_examined.upper() not in {b.upper() for b in rule.body_parts}:
        allowed = "/".join(b or "(none)" for b in rule.body_parts)
        return f"body part {facts.body_part_examined or '(none)'} not in {allowed}"
    # Reasons name the pattern or the matched word, never the description itself: they are logged, and a
    # description may carry patient data.
    if rule.study_description is not None and not re.search(
        rule.study_description, facts.study_description, re.IGNORECASE
    ):
        return f"study description does not match {rule.study_description!r}"
    if rule.series_description is not None and not re.search(
        rule.series_description, facts.series_description, re.IGNORECASE
    ):
        return f"series description does not match {rule.series_description!r}"
    if rule.exclude_qa_description:
        for which, text in (("study", facts.study_description), ("series", facts.series_description)):
            found = re.search(rule.exclude_qa_description, text, re.IGNORECASE)
            if found:
                return (f"{which} description names a phantom or quality-assurance scan "
                        f"({found.group(0).lower()!r})")
    if rule.exclude_series_description:
        found = re.search(rule.exclude_series_description, facts.series_description, re.IGNORECASE)
        if found:
            return (f"series description names a scout, bolus-tracking scan or projection, no diagnostic slice "
                    f"({found.group(0).lower()!r})")
    excluded = sorted(facts.image_types & {t.upper() for t in rule.exclude_image_types})
    if excluded:
        return f"image type {'/'.join(excluded)} is excluded"
    captured = sorted(facts.sop_classes & set(rule.exclude_sop_classes))
    if captured:
        return f"SOP class {'/'.join(_sop_class_name(uid) for uid in captured)} is excluded"
    if facts.slice_count < rule.min_slices:
        return f"{facts.slice_count} slice(s), fewer than {rule.min_slices}"
    return None


def route(facts: SeriesFacts, rules: tuple[RoutingRule, ...]) -> RoutingDecision:
    """The task for a series, or ``not_applicable`` with the reason."""
    failures = []
    for rule in rules:
        mismatch = _mismatch(rule, facts)
        if mismatch is None:
            return RoutingDecision(rule.task, f"routing rule for {rule.task} matched")
        failures.append(f"{rule.task}: {mismatch}")
    if not failures:
        return RoutingDecision(None, "no routing rules are configured")
    return RoutingDecision(None, "no routing rule matches (" + "; ".join(failures) + ")")
