"""Routing rules: which task a series gets, or not_applicable with a reason that names each rule's objection."""

from __future__ import annotations

import pytest

from config import ConfigError, RoutingRule
from config.settings import DEFAULT_ROUTING_RULES
from worker.routing import SeriesFacts, check_rules, route


def facts(**overrides: object) -> SeriesFacts:
    values: dict[str, object] = {
        "modality": "MR",
        "body_part_examined": "BRAIN",
        "study_description": "MRI BRAIN W/WO",
        "series_description": "AX T1 POST",
        "image_types": frozenset({"ORIGINAL", "PRIMARY", "OTHER"}),
        "slice_count": 20,
    }
    values.update(overrides)
    return SeriesFacts(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "task"),
    [
        ({}, "brain-tumor"),
        ({"body_part_examined": ""}, "brain-tumor"),  # many MR scanners leave BodyPartExamined empty
        ({"modality": "CT", "body_part_examined": "CHEST"}, "covid-ct"),
        ({"modality": "CT", "body_part_examined": "thorax"}, "covid-ct"),
        ({"modality": "CT", "body_part_examined": "BRAIN"}, None),
        ({"modality": "US", "body_part_examined": ""}, None),
        ({"image_types": frozenset({"ORIGINAL", "PRIMARY", "LOCALIZER"})}, None),
        ({"modality": "CT", "body_part_examined": "CHEST", "image_types": frozenset({"SCOUT"})}, None),
        # Diffusion maps are no anatomical image; scouts named only in their description are refused too.
        ({"image_types": frozenset({"DERIVED", "PRIMARY", "DIFFUSION", "ADC"})}, None),
        ({"series_description": "Scano 3plane-2"}, None),
        ({"series_description": "Survey"}, None),
        ({"series_description": "3-Plane Loc"}, None),
        ({"modality": "CT", "body_part_examined": "CHEST", "series_description": "Localizer"}, None),
        # ... but a reformat or an averaged series of real slices is read.
        ({"modality": "CT", "body_part_examined": "", "series_description": "CHEST AX",
          "image_types": frozenset({"DERIVED", "SECONDARY", "REFORMATTED", "AVERAGE"})}, "covid-ct"),
        ({"series_description": "AX FLAIR blocked"}, "brain-tumor"),
        ({"modality": "CT", "body_part_examined": "CHEST", "image_types": frozenset({"DERIVED", "PRIMARY", "MPR"})},
         "covid-ct"),
        # Projections, subtractions, computed maps and screen captures are no slice of the anatomy.
        ({"modality": "CT", "body_part_examined": "CHEST",
          "image_types": frozenset({"DERIVED", "SECONDARY", "AXIAL", "MIP"})}, None),
        ({"modality": "CT", "body_part_examined": "CHEST",
          "image_types": frozenset({"DERIVED", "SECONDARY", "MIN_IP"})}, None),
        ({"image_types": frozenset({"DERIVED", "PRIMARY", "M", "ND", "SUB"})}, None),
        ({"image_types": frozenset({"DERIVED", "PRIMARY", "PERFUSION", "RCBV"})}, None),
        ({"image_types": frozenset({"DERIVED", "SECONDARY", "SCREEN SAVE"})}, None),
        # A Secondary Capture object is a captured picture, whatever its Modality says.
        ({"modality": "CT", "body_part_examined": "CHEST", "sop_classes": frozenset({"1.2.840.10008.5.1.4.1.1.7"})},
         None),
        ({"modality": "CT", "body_part_examined": "CHEST", "sop_classes": frozenset({"1.2.840.10008.5.1.4.1.1.2"})},
         "covid-ct"),
    ],
)
def test_default_rules(overrides: dict[str, object], task: str | None) -> None:
    assert route(facts(**overrides), DEFAULT_ROUTING_RULES).task == task


def test_a_secondary_capture_is_refused_by_its_sop_class_name() -> None:
    decision = route(facts(sop_classes=frozenset({"1.2.840.10008.5.1.4.1.1.7.3", "1.2.840.10008.5.1.4.1.1.4"})),
                     DEFAULT_ROUTING_RULES)
    assert decision.task is None
    assert "brain-tumor: SOP class Multi-frame Grayscale Word Secondary Capture Image Storage is excluded" in (
        decision.reason)


def test_reason_names_each_rule() -> None:
    decision = route(facts(modality="US", body_part_examined="ABDOMEN"), DEFAULT_ROUTING_RULES)
    assert decision.task is None
    assert decision.reason == (
        "no routing rule matches (brain-tumor: modality US not in MR; covid-ct: modality US not in CT)"
    )


def test_description_patterns_and_min_slices() -> None:
    rule = RoutingRule(task="brain-tumor", modalities=("MR",), series_description=r"\bT1\b", min_slices=10)
    assert route(facts(), (rule,)).task == "brain-tumor"
    assert "does not match" in route(facts(series_description="AX FLAIR"), (rule,)).reason
    assert route(facts(slice_count=9), (rule,)).reason.endswith("9 slice(s), fewer than 10)")
    study_rule = RoutingRule(task="brain-tumor", study_description="brain")
    assert route(facts(study_description="MRI BRAIN"), (study_rule,)).task == "brain-tumor"  # case-insensitive
    assert route(facts(study_description="MRI KNEE"), (study_rule,)).task is None


def test_scout_descriptions_reason_and_switch_off() -> None:
    decision = route(facts(series_description="localizer"), DEFAULT_ROUTING_RULES)
    assert "series description names a scout, bolus-tracking scan or projection, no diagnostic slice ('localizer')" \
        in decision.reason
    # An empty pattern (TOML has no null) turns the check off rather than matching every description.
    rule = RoutingRule(task="brain-tumor", exclude_series_description="")
    assert route(facts(series_description="localizer"), (rule,)).task == "brain-tumor"
    with pytest.raises(ValueError, match="not a valid regular expression"):
        RoutingRule(task="brain-tumor", exclude_series_description="(")


@pytest.mark.parametrize("description", [
    # Bolus tracking: low-dose repeats of one level, ORIGINAL PRIMARY AXIAL like the diagnostic series of the study
    # (the extra collection's TCGA slice "Smart Prep Series"); vendors' names for it.
    "Smart Prep Series", "SmartPrep", "CARE Bolus CT", "PreMonitoring", "Monitoring 10.0 B30f", "Test Bolus",
    "SUREStart", "Bolus Tracking",
    # Projections and renderings a workstation sends back without a projection Image Type.
    "Lung MIP 10mm", "Lung_MIP", "MinIP 5 mm", "min_ip airways", "Maximum Intensity Projection", "VRT bone",
    "Volume Rendering",
])
def test_bolus_tracking_and_projections_named_in_the_description_are_not_read(description: str) -> None:
    chest = facts(modality="CT", body_part_examined="CHEST", series_description=description)
    decision = route(chest, DEFAULT_ROUTING_RULES)
    assert decision.task is None and "bolus-tracking scan or projection, no diagnostic slice" in decision.reason
    assert description not in decision.reason


@pytest.mark.parametrize("description", [
    # Diagnostic series of the development set and the extra collection, reformats among them: read.
    "ThoraxRoutine  8.0.0  B40f", "CHEST ROUTINE  2.0  B20f", "Thorax MPR cor", "t1_mpr_tra_iso", "sag 3d gre +c",
    "LOCALIZATION", "Recon 3: SUPER DIMENSION CHEST", "MIPS study", "Lung 1.0 IP",
])
def test_diagnostic_descriptions_are_read(description: str) -> None:
    chest = facts(modality="CT", body_part_examined="CHEST", series_description=description)
    assert route(chest, DEFAULT_ROUTING_RULES).task == "covid-ct"


def test_phantom_and_qa_studies_are_not_read() -> None:
    # The study descriptions of the two QA phantom series in the extra collection that no image check refused.
    for study in ("Phantom", "FMRIF^QA"):
        decision = route(facts(study_description=study), DEFAULT_ROUTING_RULES)
        assert decision.task is None
        assert "study description names a phantom or quality-assurance scan" in decision.reason
        assert study not in decision.reason  # the description itself is never in a (logged) reason
    decision = route(facts(series_description="ACR phantom T1"), DEFAULT_ROUTING_RULES)
    assert decision.task is None and "series description names a phantom" in decision.reason
    for study in ("MRI BRAIN W/O", "Aquarius follow-up", "QAnalysis"):  # words, not substrings
        assert route(facts(study_description=study), DEFAULT_ROUTING_RULES).task == "brain-tumor"
    assert route(facts(study_description="Phantom"), (RoutingRule(task="brain-tumor", exclude_qa_description=""),)
                 ).task == "brain-tumor"
    with pytest.raises(ValueError, match="not a valid regular expression"):
        RoutingRule(task="brain-tumor", exclude_qa_description="[")


def test_siemens_mosaics_are_not_read() -> None:
    # A mosaic tiles a whole EPI volume into one frame: the brain model would see a grid of small heads.
    mosaic = facts(image_types=frozenset({"ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"}))
    decision = route(mosaic, DEFAULT_ROUTING_RULES)
    assert decision.task is None and "image type MOSAIC is excluded" in decision.reason


def test_first_matching_rule_wins_and_empty_rules() -> None:
    rules = (RoutingRule(task="covid-ct"), RoutingRule(task="brain-tumor"))
    assert route(facts(), rules).task == "covid-ct"
    assert route(facts(), ()).reason == "no routing rules are configured"


def test_unknown_task_is_a_config_error() -> None:
    check_rules(DEFAULT_ROUTING_RULES)
    with pytest.raises(ConfigError, match="unknown task.*'knee-xray'"):
        check_rules((RoutingRule(task="knee-xray"),))
