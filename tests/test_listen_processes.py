"""``dicom-triage listen --processes N``: listener processes accepting on one listening socket, supervised.

A real ``listen --processes 2`` on the embedded default (SQLite): dcmtk's storescu pushes a study over several
parallel associations and every acknowledged instance is archived with its row; while one child is stopped
(SIGSTOP) the other takes every association; a child killed with SIGKILL is restarted while the port keeps
answering; a bad ``listen_processes`` fails at start with a clear message.
"""

from __future__ import annotations

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydicom import Dataset
from sqlalchemy import select

from dicom_factory import brain_images, ct_images, storescu, write_files
from dicom_io.synthesis import ct_series, mr_series
from processes import Child, free_port, serve_ready, triage_command, triage_environment, wait_for
from worker.db import Database, Instance
from worker.ingest import MARKER_PREFIX

AE = "DICOM_TRIAGE"
ECHOSCU = "/usr/bin/echoscu"
DCMTK_ENV = {"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}


def _push(port: int, datasets: list[Dataset], directory: Path, associations: int) -> None:
    """Send ``datasets`` over ``associations`` parallel storescu processes; every status must be success."""
    files = write_files(datasets, directory)
    chunks = [files[i::associations] for i in range(associations)]
    with ThreadPoolExecutor(associations) as pool:
        results = list(pool.map(lambda chunk: storescu(port, chunk, called_ae=AE), chunks))
    for chunk, result in zip(chunks, results):
        assert result.statuses == [0] * len(chunk), result.output[-3000:]


def _echo(port: int, timeout: int = 30) -> int:
    """echoscu's exit status; it gives up after ``timeout`` seconds without an answer (connection or ACSE)."""
    return subprocess.run([ECHOSCU, "-to", str(timeout), "-ta", str(timeout), "-aec", AE, "127.0.0.1", str(port)],
                          capture_output=True, env=DCMTK_ENV, timeout=timeout * 3).returncode


def _child_pids(ready_line: str) -> list[int]:
    match = re.search(r"2 listener processes, pids (\d+), (\d+)\)", ready_line)
    assert match, ready_line
    return [int(match[1]), int(match[2])]


def _recorded(data_dir: Path) -> dict[str, str]:
    database = Database(f"sqlite:///{data_dir / 'triage.sqlite3'}")
    try:
        with database.read_session() as session:
            rows = session.execute(select(Instance.sop_instance_uid, Instance.archive_path))
            return {uid: path for uid, path in rows}
    finally:
        database.dispose()


def test_two_processes_share_the_port_restart_a_killed_child_and_lose_nothing(tmp_path: Path) -> None:
    data_dir, port = tmp_path / "data", free_port()
    # The default limit (10) and six parallel associations: they need not land evenly, and each process takes the
    # whole limit, so none is refused.
    env = triage_environment(tmp_path / "models")
    listen = Child(triage_command("listen", "--data-dir", str(data_dir), "--dicom-port", str(port),
                                  "--processes", "2"), env, name="listen")
    try:
        pids = _child_pids(listen.wait_for_line(serve_ready, 120))
        listening = [line for line in listen.lines if f"listening as {AE} on 127.0.0.1:{port}" in line]
        assert len(listening) == 2, listen.output  # both children bound the one port

        study = mr_series(brain_images(12, seed=21)) + ct_series(ct_images(12, seed=22))
        _push(port, study, tmp_path / "send", associations=6)
        recorded = _recorded(data_dir)
        assert set(recorded) == {ds.SOPInstanceUID for ds in study}
        assert all(Path(path).is_file() for path in recorded.values())

        # A stopped (hung) child takes no association: the other accepts every one at once. With SO_REUSEPORT about
        # half of them were hashed to the stopped child and waited for it.
        subprocess.run(["kill", "-STOP", str(pids[1])], check=True)
        try:
            assert [_echo(port, timeout=5) for _ in range(12)] == [0] * 12
        finally:
            subprocess.run(["kill", "-CONT", str(pids[1])], check=True)

        listen_lines = len(listen.lines)
        subprocess.run(["kill", "-9", str(pids[0])], check=True)
        restarted = wait_for(
            lambda: next((line for line in listen.lines[listen_lines:] if "listening again (pid" in line), None),
            60, "the killed listener process restarted", listen, alive=True,
        )
        assert f"pid {pids[0]}" in "".join(listen.lines[listen_lines:])  # the exit was noticed ...
        new_pid = int(re.search(r"listening again \(pid (\d+)\)", restarted)[1])  # type: ignore[index]
        assert new_pid not in pids
        assert all(_echo(port) == 0 for _ in range(10))  # ... and the port answers, whichever child takes it

        later = mr_series(brain_images(6, seed=23))
        _push(port, later, tmp_path / "send-later", associations=3)
        assert set(_recorded(data_dir)) == {ds.SOPInstanceUID for ds in study + later}
        assert listen.terminate() == 0, listen.output[-3000:]
    finally:
        listen.stop()
    # The restarted child took over the killed one's marker; a clean stop leaves none.
    assert list((data_dir / "archive").glob(f"{MARKER_PREFIX}*")) == []


def test_bad_listen_processes_fails_at_start(tmp_path: Path) -> None:
    env = triage_environment(tmp_path / "models", listen_processes=0)
    done = subprocess.run(triage_command("listen", "--data-dir", str(tmp_path / "data")), env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "listen_processes [from DICOM_TRIAGE_LISTEN_PROCESSES]" in done.stderr
    assert "greater than or equal to 1" in done.stderr

    env = triage_environment(tmp_path / "models")
    done = subprocess.run(triage_command("listen", "--data-dir", str(tmp_path / "data"), "--processes", "-3"),
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "listen_processes [from command line]" in done.stderr
