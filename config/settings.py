"""One typed settings object, from an optional TOML file and ``DICOM_TRIAGE_*`` variables.

Precedence (highest first): explicit overrides (CLI flags), environment variables, the TOML file, defaults.
Defaults serve the embedded mode: SQLite and Celery's filesystem broker under the data directory.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

ENV_PREFIX = "DICOM_TRIAGE_"
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars of default repertoire, no backslash


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names every bad value."""


def _check_ae_title(value: str) -> str:
    stripped = value.strip()
    if not stripped or not _AE_RE.match(stripped):
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable ASCII characters, no backslash)")
    return stripped


def _comma_separated(text: str) -> list[str]:
    """The items of an environment variable's ``a,b,c`` list, stripped, empty items dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]


#: The suffix of a TLS destination's text form (``AE@HOST:PORT+tls``), which is what a delivery row records.
TLS_SUFFIX = "+tls"


class Destination(BaseModel):
    """A DICOM peer we send Structured Reports to, written ``AE@HOST:PORT`` (plain TCP).

    Over DICOM TLS it is a table in the TOML file with ``tls = true``, the CA bundle its certificate must chain to
    (``tls_ca``) and, for a peer that requires one, our client certificate and key; its text form then ends in
    ``+tls``. A destination parsed from such text alone has no CA: its deliveries fail with that reason (never
    plain TCP) until the configuration names it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _check_ae_title(value)

    @model_validator(mode="after")
    def _tls_files(self) -> "Destination":
        if not self.tls and any((self.tls_ca, self.tls_cert, self.tls_key)):
            raise ValueError("tls_ca, tls_cert and tls_key need tls = true")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("a client certificate needs both tls_cert and tls_key")
        return self

    @classmethod
    def parse(cls, text: str) -> "Destination":
        stripped = text.strip()
        tls = stripped.endswith(TLS_SUFFIX)
        match = re.fullmatch(r"(?P<ae>[^@]+)@(?P<host>\[[^\]]+\]|[^:]+):(?P<port>\d+)",
                             stripped.removesuffix(TLS_SUFFIX))
        if not match:
            raise ValueError(f"{text!r} is not a destination of the form AE@HOST:PORT")
        return cls(ae_title=match["ae"], host=match["host"].strip("[]"), port=int(match["port"]), tls=tls)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6: parse() reads it back
        return f"{self.ae_title}@{host}:{self.port}{TLS_SUFFIX if self.tls else ''}"


#: Series descriptions of series that hold no diagnostic slice of the anatomy, as scanners and workstations name
#: them without always saying so in the Image Type: scouts and localizers; bolus-tracking scans (GE "SmartPrep",
#: Siemens "CARE Bolus" and "PreMonitoring"/"Monitoring", Canon "SUREStart", Philips "Bolus Tracking", a "test
#: bolus"), low-dose repeats of one level taken to time the contrast injection, whose image type is ORIGINAL PRIMARY
#: AXIAL like the diagnostic series'; projections and renderings (MIP, MinIP, volume rendering: a chest MIP shows
#: vessels as nodules). Reformats (MPR) are read.
DEFAULT_EXCLUDED_DESCRIPTIONS = (
    r"scout|locali[sz]er|survey|3[ -]?plane|tri-?pilot|aa-?head|\bloc\b"
    r"|smart ?prep|sure ?start|(care|test) ?bolus|bolus ?track|\b(pre)?monitoring\b"
    r"|(?<![a-z])(mip|min[ _-]?ip|max[ _-]?ip|vrt?)(?![a-z])|intensity projection|volume render"
)
#: Study or series descriptions of quality-assurance scans: phantoms are scanned under such names (a GE EPI phantom
#: with rods and wedges inside, study "Phantom", was called meningioma at 0.99 and its structure passes every image
#: check; a "FMRIF^QA" study holds an EPI phantom).
DEFAULT_QA_DESCRIPTIONS = r"phantom|\bqa\b|\bqc\b|quality[ _-]?(assurance|control)"


#: Image Type values of images no classifier reads, because they are computed from the acquired slices into
#: something that is no anatomical slice: scouts (LOCALIZER, SCOUT); diffusion and other parametric maps (ADC, EADC,
#: FA, TRACEW; relaxometry T1_MAP, T2_MAP, T2_STAR_MAP; perfusion TTP, MTT, RCBF, RCBV); projections through a slab
#: or the volume (PROJECTION IMAGE, MIP, MAX_IP, MIN_IP, MINIP: a maximum-intensity projection of a chest shows
#: vessels as nodules, a minimum one the airways); subtractions (SUBTRACTION, Siemens' SUB); screen captures
#: (SCREEN SAVE); Siemens mosaics (MOSAIC: an fMRI or DTI volume tiled into one frame, not split into slices). A
#: derived series of real slices (a reformat, a thick-slab average: DERIVED, SECONDARY, REFORMATTED, AVERAGE, MPR)
#: is read: two COVID-positive series of the development set are such reformats.
DEFAULT_EXCLUDED_IMAGE_TYPES: tuple[str, ...] = (
    "LOCALIZER", "SCOUT",
    "ADC", "EADC", "FA", "TRACEW", "T1_MAP", "T2_MAP", "T2_STAR_MAP", "TTP", "MTT", "RCBF", "RCBV",
    "PROJECTION IMAGE", "MIP", "MAX_IP", "MIN_IP", "MINIP",
    "SUBTRACTION", "SUB",
    "SCREEN SAVE",
    "MOSAIC",
)  # fmt: skip
#: SOP Classes no classifier reads: the Secondary Capture family, pictures captured or exported from a screen or a
#: workstation (a key image with annotations, a film scan), not the scanner's images, whatever their Modality says.
DEFAULT_EXCLUDED_SOP_CLASSES: tuple[str, ...] = (
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color Secondary Capture
)


class RoutingRule(BaseModel):
    """Which classifier runs on which series. All given conditions must hold; patterns are regexes
    (case-insensitive)."""

    # A misspelt key (``exclude_sop_class``) must be an error, not a condition silently dropped.
    model_config = ConfigDict(frozen=True, extra="forbid")

    task: str
    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    study_description: str | None = None
    series_description: str | None = None
    #: Image Type values of series no classifier reads (:data:`DEFAULT_EXCLUDED_IMAGE_TYPES`: scouts, parametric
    #: maps, projections, subtractions, screen captures, mosaics): not the anatomical slices the models were
    #: trained on.
    exclude_image_types: tuple[str, ...] = DEFAULT_EXCLUDED_IMAGE_TYPES
    #: SOP Class UIDs of series no classifier reads (:data:`DEFAULT_EXCLUDED_SOP_CLASSES`: Secondary Capture).
    exclude_sop_classes: tuple[str, ...] = DEFAULT_EXCLUDED_SOP_CLASSES
    #: A series whose description matches this regex (case-insensitive) is not read
    #: (:data:`DEFAULT_EXCLUDED_DESCRIPTIONS`: scouts, bolus tracking, projections): scanners name their scouts
    #: 'localizer', 'survey', '3-plane loc' ... without always marking the Image Type LOCALIZER. Empty: no check.
    exclude_series_description: str | None = DEFAULT_EXCLUDED_DESCRIPTIONS
    #: A series whose study or series description matches this regex (case-insensitive) is a phantom or another
    #: quality-assurance scan, not a patient: not read. Empty: no check.
    exclude_qa_description: str | None = DEFAULT_QA_DESCRIPTIONS
    min_slices: int = Field(default=1, ge=1)

    @field_validator("exclude_sop_classes")
    @classmethod
    def _uids_are_valid(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [uid for uid in value if not re.fullmatch(r"[0-9]+(\.[0-9]+)*", uid) or len(uid) > 64]
        if bad:
            raise ValueError(f"not a UID: {', '.join(map(repr, bad))}")
        return value

    @field_validator("study_description", "series_description", "exclude_series_description", "exclude_qa_description")
    @classmethod
    def _regex_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"{value!r} is not a valid regular expression: {exc}") from exc
        return value


DEFAULT_ROUTING_RULES: tuple[RoutingRule, ...] = (
    RoutingRule(task="brain-tumor", modalities=("MR",), body_parts=("BRAIN", "HEAD", "")),
    RoutingRule(task="covid-ct", modalities=("CT",), body_parts=("CHEST", "LUNG", "THORAX", "")),
)


class Settings(BaseModel):
    """Every setting a dicom-triage process reads. Build it with :func:`load_settings`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data_dir: Path = Path("./data")
    ae_title: str = "DICOM_TRIAGE"
    dicom_host: str = "0.0.0.0"
    dicom_port: int = Field(default=11112, ge=1, le=65535)
    #: DICOM TLS (PS3.15 Annex B, TLS 1.2+; dicom_io.tls): a second port for TLS associations, with our
    #: certificate and key, and the CA bundle client certificates must chain to. ``dicom_plain = false`` leaves
    #: only the TLS port listening.
    dicom_tls_port: int | None = Field(default=None, ge=1, le=65535)
    dicom_tls_cert: Path | None = None
    dicom_tls_key: Path | None = None
    dicom_tls_ca: Path | None = None
    #: Refuse TLS clients without a certificate from ``dicom_tls_ca`` (during the handshake).
    require_client_certificate: bool = False
    dicom_plain: bool = True
    #: Calling AE title -> the client certificate subject it must present (``O=...,CN=...``, as the listener logs
    #: it): such an AE is refused on the plain port and without that certificate. TOML only.
    dicom_tls_subjects: dict[str, str] = Field(default_factory=dict)
    web_host: str = "127.0.0.1"
    web_port: int = Field(default=8080, ge=1, le=65535)
    #: HTTPS for the web app (both or neither): cookies are then Secure and responses carry HSTS. Without them,
    #: serve the web app behind a TLS-terminating reverse proxy (README).
    web_tls_cert: Path | None = None
    web_tls_key: Path | None = None
    #: With HTTPS: ask clients for a certificate chaining to this CA bundle (optional at the TLS level; one from
    #: another CA fails the handshake). A verified certificate whose subject an admin bound to a sending system
    #: (``tokens add-certificate``) authenticates that system on the DICOMweb endpoints without a token.
    web_tls_client_ca: Path | None = None
    #: ``/healthz``, ``/readyz`` and ``/metrics`` of a ``listen`` or ``worker`` process (the web app serves its own
    #: on ``web_port``): loopback unless told otherwise; port 0 serves none.
    health_host: str = "127.0.0.1"
    health_port: int = Field(default=0, ge=0, le=65535)
    #: Login throttling per account name and per client address (worker.web.throttle): after the n-th failure, n at
    #: least ``login_backoff_after``, the next attempt waits login_backoff_seconds * 2**(n - after), at most
    #: login_backoff_max_seconds (429 with Retry-After); at ``login_lockout_after`` failures a lockout of
    #: ``login_lockout_seconds`` (it expires; ``users unlock`` lifts it). A client address, perhaps a proxy or NAT
    #: in front of many users, is allowed ``login_address_factor`` times as many failures.
    login_backoff_after: int = Field(default=3, ge=1, le=1000)
    login_lockout_after: int = Field(default=10, ge=1, le=1000)
    login_backoff_seconds: float = Field(default=1.0, gt=0, le=3600)
    login_backoff_max_seconds: float = Field(default=60.0, gt=0, le=86400)
    login_lockout_seconds: float = Field(default=900.0, gt=0, le=86400)
    login_address_factor: int = Field(default=5, ge=1, le=1000)
    #: ``text`` (the human format) or ``json`` (one object a line; worker.logs).
    log_format: Literal["text", "json"] = "text"
    allowed_calling_aes: tuple[str, ...] = ()
    max_associations: int = Field(default=10, ge=1, le=1000)
    #: Listener processes accepting on one listening socket (a free one takes each association), each with its own
    #: sink: more than one lets ingest use more than one core. Each accepts up to ``max_associations`` (a burst need
    #: not land evenly), so together they may hold ``listen_processes`` times as many.
    listen_processes: int = Field(default=1, ge=1, le=64)
    #: Empty archive files each listener process keeps made ahead by a background thread, so that creating a file
    #: (0.6-1.5 ms on an ext4 without a journal that recently freed inodes) is not part of a C-STORE's response
    #: time; 0 makes each when it is needed.
    archive_files_ahead: int = Field(default=4, ge=0, le=64)
    min_free_disk_mb: int = Field(default=500, ge=0)
    database_url: str | None = None
    broker_url: str | None = None
    result_backend_url: str | None = None
    series_quiet_seconds: float = Field(default=5.0, gt=0, le=86400)
    routing_rules: tuple[RoutingRule, ...] = DEFAULT_ROUTING_RULES
    sr_destinations: tuple[Destination, ...] = ()
    #: Whether results of backfilled studies (worker.backfill) are sent as SRs to ``sr_destinations``; off by
    #: default: the PACS already holds those studies' reports, and years of them would flood it (issue 19).
    backfill_sr_to_pacs: bool = False
    #: How backfill retrieves a series: ``move`` (C-MOVE to our own AE: the PACS must know it) or ``get`` (C-GET:
    #: the PACS sends on the same association; for a PACS that supports it and cannot reach us).
    backfill_retrieve: Literal["move", "get"] = "move"
    #: A series's retrieval that has not ended this long after it began is aborted and its study failed (a PACS
    #: that goes silent, or answers "pending" forever).
    backfill_retrieve_timeout_seconds: float = Field(default=600.0, gt=0, le=86400)
    #: ``backfill plan`` stops reading a C-FIND past this many matches and asks for a narrower query.
    backfill_max_matches: int = Field(default=10000, ge=1, le=1000000)
    #: Backfill waits before its next study while live ingest is busy: more than ``backfill_pause_live_series``
    #: live series waiting for or in classification, or more than ``backfill_pause_live_instances`` live instances
    #: received in the last ``backfill_pause_window_seconds``. After ``backfill_max_pause_seconds`` paused in a row
    #: one study starts anyway (an endless live stream must not starve a backfill; its jobs queue behind live ones).
    backfill_pause_live_series: int = Field(default=0, ge=0, le=1000000)
    backfill_pause_live_instances: int = Field(default=0, ge=0, le=100000000)
    backfill_pause_window_seconds: float = Field(default=10.0, ge=0, le=86400)
    backfill_max_pause_seconds: float = Field(default=600.0, gt=0, le=7 * 86400)
    #: A study a runner on another host claimed (``moving``) and has not advanced for this long is taken over (its
    #: runner is presumed gone; on this host a runner whose process is gone is known at once).
    backfill_claim_stale_seconds: float = Field(default=1800.0, gt=0, le=7 * 86400)
    #: STOW-RS (worker.web.stow): a part bigger than this fails alone (its bytes are read and dropped).
    stow_max_part_mb: int = Field(default=1024, ge=1, le=65536)
    #: SR delivery retries: attempt n waits backoff * 2**(n-1) seconds (capped), at most max_attempts attempts.
    sr_delivery_max_attempts: int = Field(default=12, ge=1, le=100)
    sr_delivery_backoff_seconds: float = Field(default=30.0, gt=0, le=86400)
    sr_delivery_backoff_max_seconds: float = Field(default=3600.0, gt=0, le=7 * 86400)
    models_dir: Path | None = None
    inference_batch_size: int = Field(default=32, ge=1, le=4096)
    worker_concurrency: int = Field(default=1, ge=1, le=64)
    #: A job ``queued`` this long without a worker starting it is sent again (a broker may lose a message;
    #: Celery's filesystem broker does when a worker dies between fetching and running it). Duplicates are harmless.
    queued_job_timeout_seconds: float = Field(default=300.0, gt=0, le=7 * 86400)
    #: Up to this many frames of queued series one worker classifies together (batches filled across series).
    inference_group_frames: int = Field(default=128, ge=1, le=65536)
    #: Processes that decode and preprocess series for a worker process (``worker.decoding.DecodePool``); unset:
    #: the cores it may use but one (none below 4 cores); 0: decode in the worker's own threads.
    decode_processes: int | None = Field(default=None, ge=0, le=256)
    #: At most this many frames decoded ahead of the model per task (memory stays bounded: 512 x 512 CT frames
    #: take about 1.5 MB each while decoding, a model input of 192 x 192 0.15 MB).
    decode_frames_in_flight: int = Field(default=512, ge=1, le=65536)
    #: Key of the keyed hash (HMAC-SHA256) that gives exported patients and series their pseudonymous IDs.
    #: Without it ``dataset export`` refuses to run: unkeyed hashes of patient IDs can be reversed by guessing.
    pseudonym_key: SecretStr | None = Field(default=None, min_length=16)
    #: The fixed reference image folder (``<class>/*`` images) per task that the promotion gate evaluates on,
    #: written ``task=DIR,task=DIR`` in the environment or as a table in the TOML file.
    reference_sets: dict[str, Path] = Field(default_factory=dict)
    #: Extra labelled image folders per task that every retraining adds to the exported archive data.
    external_training_data: dict[str, tuple[Path, ...]] = Field(default_factory=dict)
    #: The fewest patients each class needs for ``dataset export`` to write a training set: with fewer, a split by
    #: patient cannot keep a class on both sides, and a model would learn a patient rather than a finding.
    export_min_patients_per_class: int = Field(default=2, ge=0, le=100000)
    #: Drift watch (worker.drift): weeks shown, weeks a week is compared with, the fewest series a week needs to be
    #: judged, and the bounds: a class share this many times its baseline, the correction rate this many times, the
    #: indeterminate rate up by this much, the mean confidence down by this much (both absolute).
    drift_weeks: int = Field(default=8, ge=2, le=104)
    drift_baseline_weeks: int = Field(default=4, ge=1, le=52)
    drift_min_series: int = Field(default=10, ge=1, le=1000000)
    drift_share_ratio: float = Field(default=3.0, gt=1, le=1000)
    drift_correction_ratio: float = Field(default=2.0, gt=1, le=1000)
    drift_indeterminate_rise: float = Field(default=0.15, gt=0, le=1)
    drift_confidence_drop: float = Field(default=0.10, gt=0, le=1)
    #: How much worse than the active model (accuracy and every class's recall, as fractions) a candidate may be.
    promotion_tolerance: float = Field(default=0.02, ge=0, le=1)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _check_ae_title(value)

    @field_validator("allowed_calling_aes", mode="before")
    @classmethod
    def _aes(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = _comma_separated(value)
        return tuple(_check_ae_title(v) for v in value)

    @field_validator("sr_destinations", mode="before")
    @classmethod
    def _destinations(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = _comma_separated(value)
        return tuple(Destination.parse(v) if isinstance(v, str) else v for v in value)

    @field_validator("reference_sets", "external_training_data", mode="before")
    @classmethod
    def _task_paths(cls, value: Any, info: ValidationInfo) -> Any:
        # The environment form: ``task=DIR,task=DIR`` (a task may repeat for several external folders).
        if not isinstance(value, str):
            return value
        pairs: dict[str, list[str]] = {}
        for item in _comma_separated(value):
            task, sep, path = item.partition("=")
            if not sep or not task.strip() or not path.strip():
                raise ValueError(f"{item!r} is not of the form task=DIR")
            pairs.setdefault(task.strip(), []).append(path.strip())
        if info.field_name == "reference_sets":
            repeated = sorted(task for task, paths in pairs.items() if len(paths) > 1)
            if repeated:
                raise ValueError(f"one reference set per task; {', '.join(repeated)} given more than once")
            return {task: paths[0] for task, paths in pairs.items()}
        return pairs

    @field_validator("database_url")
    @classmethod
    def _db_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^(sqlite|postgresql)(\+\w+)?://", value):
            raise ValueError(f"{value!r} is not a sqlite:// or postgresql:// URL")
        return value

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^(redis|rediss|filesystem|memory|amqp)://", value):
            raise ValueError(f"{value!r} is not a redis://, amqp:// or filesystem:// broker URL")
        return value

    @field_validator("dicom_tls_subjects")
    @classmethod
    def _subject_aes(cls, value: dict[str, str]) -> dict[str, str]:
        return {_check_ae_title(ae): subject for ae, subject in value.items()}

    @model_validator(mode="after")
    def _tls(self) -> "Settings":
        problems = []
        if self.dicom_tls_port is not None:
            if self.dicom_tls_cert is None or self.dicom_tls_key is None:
                problems.append("dicom_tls_port needs dicom_tls_cert and dicom_tls_key")
            if self.dicom_plain and self.dicom_tls_port == self.dicom_port:
                problems.append("dicom_tls_port must differ from dicom_port")
        else:
            if not self.dicom_plain:
                problems.append("dicom_plain = false needs dicom_tls_port")
            if self.dicom_tls_subjects:
                problems.append("dicom_tls_subjects needs dicom_tls_port")
        if self.require_client_certificate and self.dicom_tls_ca is None:
            problems.append("require_client_certificate needs dicom_tls_ca")
        if (self.web_tls_cert is None) != (self.web_tls_key is None):
            problems.append("web_tls_cert and web_tls_key go together")
        if self.web_tls_client_ca is not None and self.web_tls_cert is None:
            problems.append("web_tls_client_ca needs web_tls_cert and web_tls_key")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _absolute_data_dir(self) -> "Settings":
        object.__setattr__(self, "data_dir", self.data_dir.expanduser().resolve())
        return self

    # Derived locations: one definition, used by every process.
    @property
    def archive_dir(self) -> Path:
        return self.data_dir / "archive"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'triage.sqlite3'}"

    @property
    def web_url(self) -> str:
        """Where the web app answers (https with ``web_tls_cert``)."""
        return f"{'https' if self.web_tls_cert is not None else 'http'}://{self.web_host}:{self.web_port}"

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"


def _from_environment(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    known = set(Settings.model_fields)
    for key, raw in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name not in known:
            raise ConfigError(f"{key}: unknown setting (known: {', '.join(sorted(known))})")
        if name in ("routing_rules", "dicom_tls_subjects"):
            raise ConfigError(f"{key}: {name} can only be set in the TOML config file")
        values[name] = raw
    return values


def _from_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    # Accept both a flat file and one with a [dicom_triage] table.
    return dict(data.get("dicom_triage", data))


def _describe(error: ValidationError, sources: dict[str, str]) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "settings"
        top = str(item["loc"][0]) if item["loc"] else ""
        origin = sources.get(top, "")
        given = item.get("input")
        shown = f" (got {given!r})" if given is not None and not isinstance(given, (dict, list)) else ""
        lines.append(f"  {field}{origin}: {item['msg']}{shown}")
    return "invalid settings:\n" + "\n".join(lines)


def load_settings(
    config_file: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Read settings once: defaults < TOML file < ``DICOM_TRIAGE_*`` environment < ``overrides``.

    Raises :class:`ConfigError` naming each bad value and where it came from.
    """
    env = os.environ if env is None else env
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if config_file is None and env.get(ENV_PREFIX + "CONFIG"):
        config_file = env[ENV_PREFIX + "CONFIG"]
    if config_file is not None:
        for key, value in _from_file(Path(config_file)).items():
            merged[key] = value
            sources[key] = f" [from {config_file}]"
    env_values = _from_environment({k: v for k, v in env.items() if k != ENV_PREFIX + "CONFIG"})
    for key, value in env_values.items():
        merged[key] = value
        sources[key] = f" [from {ENV_PREFIX}{key.upper()}]"
    for key, value in overrides.items():
        if value is not None:
            merged[key] = value
            sources[key] = " [from command line]"
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, sources)) from None
