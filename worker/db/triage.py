"""The worklist's maintained summary: one row per study with its triage key, and its filter tags.

The worklist orders studies by a key computed from every series of a study (latest jobs, current results, their
latest reviews). Computed at read time, every page view aggregated the whole archive (issue 22: 30 ms at 10,000
studies, 435 ms at 200,000). Here the key is kept in tables that indexes can walk in triage order:

* ``study_triage``: per study its ``triage_group`` (0: a suspected finding awaits review; 1: awaiting a result or
  a review; 2: reviewed), ``received_at`` (the study's ``created_at``), ``status``, ``review_state`` and its
  routed ``tasks``. Index ``(triage_group, received_at, study_pk)``: the default order, a keyset.
* ``study_tags``: one row per filter value a study matches (``status:done``, ``review:pending``,
  ``task:brain-tumor``, ``finding:glioma``; a study has one status and one review state, and a task and a finding
  per routed series), with a copy of the key. Index ``(tag, triage_group, received_at, study_pk)``: any one filter
  in triage order. More filters at once walk the rarest one and check the others by primary key.
* ``model_result_counts``: results per model UID (the admin models page).

Database triggers keep them, so every writer (the listener's raw DBAPI inserts, the scheduler's bulk updates,
the workers, the web's reviews) is covered without knowing of them. Each change refreshes the whole summary of
its study from the base tables (a study has a few series: a few index lookups), never an increment that could
drift. The definitions (status order, review states, which labels are findings) are this module's, built from
:mod:`models.tasks`; the triggers' names carry a hash of their SQL, so :func:`ensure` (called by
``upgrade_database`` at every start) reinstalls them and rebuilds the tables when the definition changed or a
migration that copies a table (SQLite batch mode) dropped them.

Concurrency: SQLite has one writer at a time. On PostgreSQL the triggers are deferred to commit and take one
transaction-level advisory lock before refreshing: two transactions changing series of one study concurrently
would otherwise each compute the summary without the other's change (read committed), and per-study locks taken
in event order could deadlock between transactions touching several studies (the scheduler's batches). After the
lock, each statement of the refresh sees every transaction committed before, so the last refresh is complete.
The lock is held only for the refresh at commit (well under a millisecond a study).
"""

from __future__ import annotations

import enum
import hashlib
from datetime import datetime

from sqlalchemy import Connection, ForeignKey, Index, Integer, SmallInteger, String, text
from sqlalchemy.orm import Mapped, mapped_column

from models.tasks import TASKS
from worker.db.models import UID, Base, JobState


class ReviewState(str, enum.Enum):
    NO_RESULT = "no_result"  # nothing to review yet
    PENDING = "pending"  # no current result reviewed
    PARTIAL = "partial"  # some reviewed
    CONFIRMED = "confirmed"  # all reviewed, none corrected
    CORRECTED = "corrected"  # all reviewed, at least one corrected


#: Study status: the most urgent state of its series' latest jobs wins (a failure shows over a success). A series
#: without a job yet counts as ``received``.
STATUS_ORDER: tuple[JobState, ...] = (
    JobState.FAILED, JobState.RUNNING, JobState.QUEUED, JobState.RECEIVED, JobState.DONE, JobState.NOT_APPLICABLE,
)

#: Triage groups, in worklist order.
SUSPECTED_UNREVIEWED, AWAITING, REVIEWED = 0, 1, 2

#: The PostgreSQL advisory lock the refreshes take (an arbitrary constant, distinct from the migrations' lock).
PG_REFRESH_LOCK = 0x74_72_69_61_67_65


class StudyTriage(Base):
    """A study's worklist summary (see the module's docstring); kept by triggers, never written by the app."""

    __tablename__ = "study_triage"

    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), primary_key=True,
                                          autoincrement=False)
    triage_group: Mapped[int] = mapped_column(SmallInteger)
    received_at: Mapped[datetime]
    status: Mapped[str] = mapped_column(String(32))
    review_state: Mapped[str] = mapped_column(String(16))
    #: The tasks its series' latest jobs were routed to, comma-separated (order not significant).
    tasks: Mapped[str | None] = mapped_column(String(400))

    __table_args__ = (Index("ix_study_triage_order", "triage_group", "received_at", "study_pk"),)


class StudyTag(Base):
    """A filter value a study matches, with the study's triage key so that one index serves filter and order."""

    __tablename__ = "study_tags"

    study_pk: Mapped[int] = mapped_column(ForeignKey("study_triage.study_pk", ondelete="CASCADE"),
                                          primary_key=True, autoincrement=False)
    tag: Mapped[str] = mapped_column(String(80), primary_key=True)
    triage_group: Mapped[int] = mapped_column(SmallInteger)
    received_at: Mapped[datetime]

    __table_args__ = (Index("ix_study_tags_order", "tag", "triage_group", "received_at", "study_pk"),)


class ModelResultCount(Base):
    """How many results (current or superseded) each model produced; kept by triggers on ``results``."""

    __tablename__ = "model_result_counts"

    model_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    results: Mapped[int] = mapped_column(Integer)


def tag(name: str, value: str) -> str:
    """The ``study_tags.tag`` of a worklist filter (``status``, ``review``, ``task``, ``finding``) and its value."""
    return f"{name}:{value}"


# --- the SQL ----------------------------------------------------------------------------------------------------


def _quote(value: str) -> str:
    # Literals from this code's own definitions (job states, class names), never from a request.
    return "'" + value.replace("'", "''") + "'"


def _suspected(result: str) -> str:
    """SQL: the result ``result`` names a finding (``worker.web.worklist.is_suspected``, from ``Task``)."""
    parts = [
        f"({result}.task = {_quote(task.name)} AND {result}.label IN ({', '.join(map(_quote, task.finding_labels))}))"
        for task in TASKS.values() if task.finding_labels
    ]
    return "(" + " OR ".join(parts or ["1 = 0"]) + ")"


def _summary_select(dialect: str, where: str) -> str:
    """SQL: the ``study_triage`` rows of the studies ``where`` (on ``st``, the studies table) selects.

    The joins yield one row per (series, current result) with at most one job (the latest) and one review (the
    latest: no newer review of the same result), so plain counts are exact."""
    status_rank = "CASE j.state " + " ".join(
        f"WHEN {_quote(state.value)} THEN {n}" for n, state in enumerate(STATUS_ORDER)
    ) + f" ELSE {STATUS_ORDER.index(JobState.RECEIVED)} END"
    status = "CASE a.status_rank " + " ".join(
        f"WHEN {n} THEN {_quote(state.value)}" for n, state in enumerate(STATUS_ORDER)
    ) + " END"
    review = (
        f"CASE WHEN a.n_results = 0 THEN {_quote(ReviewState.NO_RESULT.value)}"
        f" WHEN a.n_reviewed = 0 THEN {_quote(ReviewState.PENDING.value)}"
        f" WHEN a.n_reviewed < a.n_results THEN {_quote(ReviewState.PARTIAL.value)}"
        f" WHEN a.n_corrected > 0 THEN {_quote(ReviewState.CORRECTED.value)}"
        f" ELSE {_quote(ReviewState.CONFIRMED.value)} END"
    )
    group = (
        f"CASE WHEN a.unreviewed_suspect = 1 THEN {SUSPECTED_UNREVIEWED}"
        f" WHEN a.n_reviewed < a.n_results OR a.n_results = 0 THEN {AWAITING} ELSE {REVIEWED} END"
    )
    tasks = ("group_concat(DISTINCT j.task)" if dialect == "sqlite"
             else "string_agg(DISTINCT j.task, ',' ORDER BY j.task)")
    return f"""SELECT a.study_pk, {group}, a.received_at, {status}, {review}, a.tasks FROM (
  SELECT st.id AS study_pk, st.created_at AS received_at, MIN({status_rank}) AS status_rank,
    MAX(CASE WHEN rv.id IS NULL AND {_suspected('r')} THEN 1 ELSE 0 END) AS unreviewed_suspect,
    COUNT(r.id) AS n_results, COUNT(rv.id) AS n_reviewed,
    COUNT(CASE WHEN rv.decision = 'correct' THEN 1 END) AS n_corrected, {tasks} AS tasks
  FROM studies st
  LEFT JOIN series se ON se.study_pk = st.id
  LEFT JOIN jobs j ON j.series_pk = se.id AND j.revision = se.revision
  LEFT JOIN results r ON r.series_pk = se.id AND r.superseded_by_pk IS NULL
  LEFT JOIN reviews rv ON rv.result_pk = r.id
    AND NOT EXISTS (SELECT 1 FROM reviews nr WHERE nr.result_pk = rv.result_pk AND nr.id > rv.id)
  WHERE {where}
  GROUP BY st.id, st.created_at
) a WHERE 1 = 1"""


def _tags_select(where: str) -> str:
    """SQL: the ``study_tags`` rows of the ``study_triage`` rows ``where`` (on ``t``) selects."""
    key = "t.triage_group, t.received_at"
    return f"""SELECT t.study_pk, 'status:' || t.status, {key} FROM study_triage t WHERE {where}
UNION ALL SELECT t.study_pk, 'review:' || t.review_state, {key} FROM study_triage t WHERE {where}
UNION ALL SELECT DISTINCT t.study_pk, 'task:' || j.task, {key} FROM study_triage t
  JOIN series se ON se.study_pk = t.study_pk JOIN jobs j ON j.series_pk = se.id AND j.revision = se.revision
  WHERE {where} AND j.task IS NOT NULL
UNION ALL SELECT DISTINCT t.study_pk, 'finding:' || r.label, {key} FROM study_triage t
  JOIN series se ON se.study_pk = t.study_pk JOIN results r ON r.series_pk = se.id AND r.superseded_by_pk IS NULL
  WHERE {where}"""


_TRIAGE_COLUMNS = "study_pk, triage_group, received_at, status, review_state, tasks"
_TAG_COLUMNS = "study_pk, tag, triage_group, received_at"


def _refresh_statements(dialect: str, study: str) -> list[str]:
    """SQL statements that recompute the summary and tags of the study whose id the expression ``study`` gives."""
    return [
        f"DELETE FROM study_tags WHERE study_pk = {study}",
        f"INSERT INTO study_triage ({_TRIAGE_COLUMNS}) {_summary_select(dialect, f'st.id = {study}')}"
        " ON CONFLICT (study_pk) DO UPDATE SET triage_group = excluded.triage_group,"
        " received_at = excluded.received_at, status = excluded.status, review_state = excluded.review_state,"
        " tasks = excluded.tasks",
        f"INSERT INTO study_tags ({_TAG_COLUMNS}) {_tags_select(f't.study_pk = {study}')}",
    ]


def _count_statement(model_uid: str, delta: int) -> str:
    return (f"INSERT INTO model_result_counts (model_uid, results) VALUES ({model_uid}, {delta})"
            f" ON CONFLICT (model_uid) DO UPDATE SET results = model_result_counts.results + {delta}")


# Where each table's rows point: the study whose summary a change of the row can alter. Only the columns the
# summary reads fire a refresh (an ingest's touch of a series' times does not). A row never moves to another
# study (no code changes a series' study or a job's series), so an update refreshes the study it is in.
_SERIES_STUDY = "(SELECT s.study_pk FROM series s WHERE s.id = {row}.series_pk)"
_WATCHED: dict[str, tuple[str, str]] = {
    # table: (columns whose update refreshes, the study of a row {row})
    "studies": ("created_at", "{row}.id"),
    "series": ("revision, study_pk", "{row}.study_pk"),
    "jobs": ("state, task, revision, series_pk", _SERIES_STUDY),
    "results": ("label, task, superseded_by_pk, series_pk", _SERIES_STUDY),
    "reviews": ("decision, result_pk",
                "(SELECT s.study_pk FROM results x JOIN series s ON s.id = x.series_pk WHERE x.id = {row}.result_pk)"),
}


def _sqlite_ddl(suffix: str) -> list[str]:
    statements = []
    for table, (columns, study) in _WATCHED.items():
        for event, row in (("INSERT", "NEW"), (f"UPDATE OF {columns}", "NEW"), ("DELETE", "OLD")):
            if table == "studies" and event == "DELETE":
                continue  # the summary goes with the study (ON DELETE CASCADE)
            body = _refresh_statements("sqlite", study.format(row=row))
            if table == "results" and event == "INSERT":
                body.append(_count_statement("NEW.model_uid", 1))
            if table == "results" and event == "DELETE":
                body.append(_count_statement("OLD.model_uid", -1))
            name = f"triage_{table}_{event.split()[0].lower()}_{suffix}"
            statements.append(f"CREATE TRIGGER {name} AFTER {event} ON {table} FOR EACH ROW BEGIN\n"
                              + ";\n".join(body) + ";\nEND")
    return statements


def _postgresql_ddl(suffix: str) -> list[str]:
    refresh = f"triage_refresh_{suffix}"
    statements = [
        f"CREATE FUNCTION {refresh}(p_study integer) RETURNS void LANGUAGE plpgsql AS $$\nBEGIN\n"
        f"  IF p_study IS NULL THEN RETURN; END IF;\n"
        f"  PERFORM pg_advisory_xact_lock({PG_REFRESH_LOCK});\n"
        + "".join(f"  {s};\n" for s in _refresh_statements("postgresql", "p_study"))
        + "END $$"
    ]
    for table, (columns, study) in _WATCHED.items():
        counts = ""
        if table == "results":
            counts = (f"  PERFORM pg_advisory_xact_lock({PG_REFRESH_LOCK});\n"
                      f"  IF TG_OP = 'INSERT' THEN {_count_statement('NEW.model_uid', 1)}; END IF;\n"
                      f"  IF TG_OP = 'DELETE' THEN {_count_statement('OLD.model_uid', -1)}; END IF;\n")
        function = f"triage_on_{table}_{suffix}"
        statements.append(
            f"CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$\nBEGIN\n"
            f"  IF TG_OP = 'DELETE' THEN PERFORM {refresh}({study.format(row='OLD')});\n"
            f"  ELSE PERFORM {refresh}({study.format(row='NEW')}); END IF;\n"
            f"{counts}  RETURN NULL;\nEND $$"
        )
        # Deferred to commit: see the module's docstring.
        statements.append(
            f"CREATE CONSTRAINT TRIGGER triage_{table}_{suffix} AFTER INSERT OR DELETE OR UPDATE OF {columns}"
            f" ON {table} DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {function}()"
        )
    return statements


def _definition(dialect: str) -> tuple[str, list[str]]:
    """(suffix, DDL): the suffix is a hash of the DDL, so a changed definition has new names."""
    builder = _sqlite_ddl if dialect == "sqlite" else _postgresql_ddl
    suffix = hashlib.sha256("\n".join(builder("X")).encode()).hexdigest()[:10]
    return suffix, builder(suffix)


def _installed(connection: Connection) -> tuple[set[str], set[str]]:
    """(trigger names, function names) of ours in the database."""
    if connection.dialect.name == "sqlite":
        names = connection.execute(
            text("SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'triage\\_%' ESCAPE '\\'")
        ).scalars()
        return set(names), set()
    triggers = connection.execute(text(
        "SELECT DISTINCT tgname FROM pg_trigger WHERE NOT tgisinternal AND tgname LIKE 'triage\\_%'"
    )).scalars()
    functions = connection.execute(text(
        "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = current_schema() AND p.proname LIKE 'triage\\_%'"
    )).scalars()
    return set(triggers), set(functions)


def _expected_triggers(dialect: str, suffix: str) -> set[str]:
    if dialect == "sqlite":
        return {
            f"triage_{table}_{event}_{suffix}" for table in _WATCHED for event in ("insert", "update", "delete")
            if not (table == "studies" and event == "delete")
        }
    return {f"triage_{table}_{suffix}" for table in _WATCHED}


def uninstall(connection: Connection) -> None:
    """Drop every trigger and function of ours (any definition)."""
    triggers, functions = _installed(connection)
    if connection.dialect.name == "sqlite":
        for name in triggers:
            connection.exec_driver_sql(f'DROP TRIGGER IF EXISTS "{name}"')
        return
    for name in triggers:
        tables = connection.execute(
            text("SELECT DISTINCT c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
                 " WHERE t.tgname = :name"), {"name": name}
        ).scalars().all()
        for table in tables:
            connection.exec_driver_sql(f'DROP TRIGGER IF EXISTS "{name}" ON "{table}"')
    for name in functions:
        connection.exec_driver_sql(f'DROP FUNCTION IF EXISTS "{name}" CASCADE')


def install(connection: Connection) -> None:
    """Replace our triggers with the current definition (the tables are not touched: see :func:`rebuild`)."""
    uninstall(connection)
    for statement in _definition(connection.dialect.name)[1]:
        connection.exec_driver_sql(statement)


def rebuild(connection: Connection) -> None:
    """Recompute every study's summary and tags and every model's count, set-based (a migration, a benchmark's
    bulk load). Writers must wait meanwhile: run it inside the migrations' lock, or with nothing else writing."""
    dialect = connection.dialect.name
    if dialect == "postgresql":
        connection.execute(text(f"SELECT pg_advisory_xact_lock({PG_REFRESH_LOCK})"))
    for statement in (
        "DELETE FROM study_tags",
        "DELETE FROM study_triage",
        "DELETE FROM model_result_counts",
        f"INSERT INTO study_triage ({_TRIAGE_COLUMNS}) {_summary_select(dialect, '1 = 1')}",
        f"INSERT INTO study_tags ({_TAG_COLUMNS}) {_tags_select('1 = 1')}",
        "INSERT INTO model_result_counts (model_uid, results) SELECT model_uid, COUNT(*) FROM results"
        " GROUP BY model_uid",
    ):
        connection.exec_driver_sql(statement)


def ensure(connection: Connection) -> bool:
    """Install the current triggers and rebuild the tables if the installed ones differ or some are missing (a
    changed definition; a table copied by a migration). Returns whether it did. Called under the migrations' lock.
    """
    dialect = connection.dialect.name
    suffix, _ = _definition(dialect)
    triggers, _functions = _installed(connection)
    if triggers == _expected_triggers(dialect, suffix):
        return False
    install(connection)
    rebuild(connection)
    return True


__all__ = [
    "AWAITING", "REVIEWED", "STATUS_ORDER", "SUSPECTED_UNREVIEWED", "ModelResultCount", "ReviewState", "StudyTag",
    "StudyTriage", "ensure", "install", "rebuild", "tag", "uninstall",
]
