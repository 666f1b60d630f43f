"""Fixtures shared by several test files: scratch databases on the real PostgreSQL, the tests' tiny models,
and the child processes a test starts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from dicom_factory import SHARED_DATA
from models.card import ModelCard
from models.imagefiles import read_grey_image
from models.preprocessing import prepare_batch
from models.tasks import TASKS
from databases import PG_ADMIN, scratch_postgres  # noqa: F401 (PG_ADMIN: imported from here by tests)
from processes import Child
from worker.db import Database, upgrade_database

@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database on 127.0.0.1:5432, dropped after the test."""
    with scratch_postgres() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The test runs twice: on a SQLite file, then on a scratch PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'triage.sqlite3'}"
    else:
        yield request.getfixturevalue("postgres_url")


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    """``database_url``'s database (SQLite, then PostgreSQL) with the schema, as a ``Database``."""
    upgrade_database(database_url)
    db = Database(database_url)
    yield db
    db.dispose()


@pytest.fixture
def postgres_database(postgres_url: str) -> Iterator[Database]:
    """A scratch PostgreSQL database with the schema, as a ``Database``."""
    database = Database(postgres_url)
    try:
        upgrade_database(database)
        yield database
    finally:
        database.dispose()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder with a threshold model for every task, fitted on a few images from ../shared/data (once a
    session: the 16 test files that start processes on it only read it)."""
    # Imported here: Keras takes seconds to import, and most test files never need it.
    from models.architectures import build_model, default_input_spec, fit_threshold_model

    root = tmp_path_factory.mktemp("models")
    for name, task in TASKS.items():
        spec = default_input_spec("threshold", task)
        model = build_model("threshold", task, spec)
        folder = "brain-tumor-mri/Training" if name == "brain-tumor" else "covid-ct"
        images, labels = [], []
        for index, class_name in enumerate(task.class_names):
            files = sorted((SHARED_DATA / folder / class_name).glob("*"))[:8]
            if not files:
                pytest.skip(f"no training images for {name}/{class_name} under {SHARED_DATA}")
            images += [read_grey_image(f) for f in files]
            labels += [index] * len(files)
        fit_threshold_model(model, prepare_batch(images, spec), np.array(labels))
        (root / name).mkdir()
        model.save(root / name / "model.keras")
        ModelCard(
            task=name, class_names=list(task.class_names), architecture="threshold", input_spec=spec,
            name=f"test-{name}",
        ).save(root / name)
    return root


@pytest.fixture
def processes() -> Iterator[list[Child]]:
    """Children the test starts; any still running at the end are stopped."""
    started: list[Child] = []
    yield started
    for process in started:
        process.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """The random order's seed at the end of every run, ``-q`` included (pytest-randomly shows it only in the
    header, which ``-q`` hides): a failing order is replayed with ``-p randomly --randomly-seed=SEED``."""
    seed = getattr(config.option, "randomly_seed", None)
    if isinstance(seed, int) and config.pluginmanager.hasplugin("randomly"):
        terminalreporter.write_line(f"test order: pytest-randomly seed {seed} "
                                    f"(replay: -p randomly --randomly-seed={seed})")
