"""``serve``, ``listen --processes N`` and ``worker`` live and die with their children, stop within a bound, and one
``serve``/``listen`` runs per data directory (``worker.lifetime``, ``worker.runlock``).

Real processes throughout: dcmtk's storescu pushes bursts, ``dicom-triage`` processes are killed with SIGKILL
mid-burst or stopped with SIGTERM while a job is being classified, and every process of the old tree is looked up
by pid (and start time, as pids are reused) in ``/proc``, grandchildren included. The next start on the same data
directory must finish every series exactly once and have lost nothing that was acknowledged.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import Future, ThreadPoolExecutor
from copy import deepcopy
from functools import cache
from pathlib import Path

from pydicom import Dataset
from pydicom.uid import JPEG2000Lossless, generate_uid
from sqlalchemy import func, select

from dicom_factory import brain_images, ct_images, storescu, write_files
from dicom_io.synthesis import ct_series, encode, mr_series
from processes import ROOT, Child, free_port, triage_environment, wait_for
from test_e2e_pipeline import OUR_AE, all_final, push, report, start, wait_ready
from worker.db import Database, Instance, Job, JobState, Result, Series
from worker.lifetime import EXIT_PARENT_GONE, STOP_BOUND_SECONDS, process_start_time

#: What the README states: ``serve`` ends this long after SIGTERM at most (measured: about 1 s idle, 3 s with a job
#: being classified; the ceiling is a child killed after worker.lifetime.KILL_AFTER_SECONDS, plus the exit).
SERVE_STOP_SECONDS = STOP_BOUND_SECONDS
#: A worker started alone ends within worker.lifetime.WORKER_STOP_SECONDS (4 s) of SIGTERM, plus its exit.
WORKER_STOP_SECONDS = 5.0
#: After a SIGKILL of the supervisor, every process of its tree has ended within this: the parent-death signal is a
#: SIGTERM, which a process answers within STOP_BOUND_SECONDS (measured: under 1 s, 0.5 s on 2 cores busy with 6
#: other processes; 2-5 s there before listener processes skipped the interpreter's teardown, which broke a 5 s bound).
ORPHAN_SECONDS = STOP_BOUND_SECONDS


def tree(pid: int) -> dict[int, int]:
    """``pid`` and its descendants, each with its start time (``/proc/PID/task/*/children``)."""
    found: dict[int, int] = {}
    todo = [pid]
    while todo:
        current = todo.pop()
        started = process_start_time(current)
        if started is None:
            continue
        found[current] = started
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                pass
    return found


def still_running(processes: dict[int, int]) -> list[int]:
    """The processes of ``processes`` that run (the same pid and start time, not a zombie)."""
    return [pid for pid, started in processes.items() if process_start_time(pid) == started]


def wait_gone(processes: dict[int, int], timeout: float, what: str) -> float:
    """Seconds until none of ``processes`` runs; fails after ``timeout``."""
    begun = time.monotonic()
    while still_running(processes):
        assert time.monotonic() - begun < timeout, f"{what}: still running after {timeout} s: {still_running(processes)}"
        time.sleep(0.05)
    return time.monotonic() - begun


def wait_signal_pending(pid: int, signum: int, what: str) -> None:
    """Wait until ``signum`` is pending for (delivered to, not yet handled by) the stopped process ``pid``."""
    def pending() -> bool:
        status = Path(f"/proc/{pid}/status").read_text()
        masks = re.findall(r"^(?:SigPnd|ShdPnd):\s*([0-9a-f]+)$", status, re.MULTILINE)
        return any(int(mask, 16) >> (signum - 1) & 1 for mask in masks)

    wait_for(pending, ORPHAN_SECONDS, what, interval=0.02)


def terminate_timed(child: Child) -> tuple[int, float]:
    """SIGTERM; the exit status and the seconds until the process ended."""
    begun = time.monotonic()
    child.popen.send_signal(signal.SIGTERM)
    status = child.popen.wait(timeout=60)
    return status, time.monotonic() - begun


def burst(port: int, series: list[list[Dataset]], directory: Path, pool: ThreadPoolExecutor) -> list[Future]:
    """One storescu association per series, all at once, in the background; each future gives (files, statuses)."""
    def send(index: int) -> tuple[list[Path], list[int]]:
        files = write_files(series[index], directory / str(index))
        return files, storescu(port, files, called_ae=OUR_AE).statuses

    return [pool.submit(send, index) for index in range(len(series))]


def acknowledged(futures: list[Future]) -> set[str]:
    """The SOP Instance UIDs storescu got a success status for (it sends the files in order)."""
    from pydicom import dcmread

    uids = set()
    for future in futures:
        files, statuses = future.result(timeout=120)
        for path, status in zip(files, statuses):
            if status == 0:
                uids.add(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    return uids


def recorded(database: Database) -> set[str]:
    with database.read_session() as session:
        return set(session.scalars(select(Instance.sop_instance_uid)))


def job_of(database: Database, series_uid: str) -> Job | None:
    """The series' latest job."""
    with database.read_session() as session:
        return session.scalars(
            select(Job).join(Series, Job.series_pk == Series.id).where(Series.series_instance_uid == series_uid)
            .order_by(Job.revision.desc()).limit(1)
        ).first()


def assert_each_revision_once(database: Database, series_uids: set[str]) -> None:
    """Every revision of every series has one job and, unless not applicable, one result; the series' current
    revision is done."""
    with database.read_session() as session:
        rows = session.execute(
            select(Series.series_instance_uid, Series.revision, Job.revision, Job.state,
                   func.count(Result.id))
            .join(Job, Job.series_pk == Series.id).outerjoin(Result, Result.job_pk == Job.id)
            .where(Series.series_instance_uid.in_(series_uids))
            .group_by(Series.series_instance_uid, Series.revision, Job.id, Job.revision, Job.state)
        ).all()
        results_per_revision = session.execute(
            select(Result.series_pk, Result.revision, func.count()).group_by(Result.series_pk, Result.revision)
        ).all()
    assert {uid for uid, *_ in rows} == series_uids
    revisions = [(uid, job_revision) for uid, _, job_revision, _, _ in rows]
    assert len(revisions) == len(set(revisions)), f"a series revision has two jobs: {rows}"
    assert all(count == 1 for *_, count in results_per_revision), f"a revision has two results: {results_per_revision}"
    for uid, current, job_revision, state, results in rows:
        if job_revision == current:
            assert state == JobState.DONE and results == 1, (uid, state, results)


@cache
def _encoded_slices() -> tuple[Dataset, ...]:
    return tuple(encode(ds, JPEG2000Lossless) for ds in ct_series(ct_images(60, seed=12)))


def long_series(copies: int = 4) -> list[Dataset]:
    """A new CT series of 60 JPEG 2000 slices repeated ``copies`` times (new instances, further along the axis): with
    batches of one, 240 slices take 5-7 s to classify on 2 busy cores (JPEG 2000 decoding is most of it; 60 take
    1.5 s), past a stopping worker's grace (worker.lifetime.TASK_GRACE_SECONDS) on a faster machine too."""
    slices, series_uid = _encoded_slices(), generate_uid()
    series = []
    for copy in range(copies):
        for index, original in enumerate(slices):
            ds = deepcopy(original)
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = copy * len(slices) + index + 1
            x, y, z = ds.ImagePositionPatient
            ds.ImagePositionPatient = [x, y, float(z) - copy * len(slices) * float(ds.SliceThickness)]
            series.append(ds)
    return series


def wait_running(database: Database, series_uid: str, *children: Child) -> Job:
    return wait_for(lambda: (job := job_of(database, series_uid)) is not None and job.state == JobState.RUNNING
                    and job, 180, "the long series' job running", *children, interval=0.02)


def test_serve_killed_mid_burst_and_terminated_mid_job(models_dir: Path, tmp_path: Path,
                                                       processes: list[Child]) -> None:
    data_dir, port = tmp_path / "data", free_port()
    env = triage_environment(models_dir, inference_batch_size="1")
    args = ["serve", "--data-dir", str(data_dir), "--dicom-port", str(port), "--web-port", str(free_port())]
    database = Database(f"sqlite:///{data_dir / 'triage.sqlite3'}")
    try:
        # 1. SIGKILL during a burst: no process of the tree (listener processes, the resource tracker, the three
        # Celery workers) outlives it by more than a few seconds.
        first = start([*args, "--processes", "2"], env)
        processes.append(first)
        wait_ready(first)
        # 360 instances, so that the kill, sent once 20 are recorded, lands while most are still on their way
        # (150 were all stored before the kill on a loaded CI machine).
        series = [mr_series(brain_images(60, seed=30 + i)) if i % 2 else ct_series(ct_images(60, seed=30 + i))
                  for i in range(6)]
        uids = {s[0].SeriesInstanceUID for s in series}
        with ThreadPoolExecutor(len(series)) as pool:
            futures = burst(port, series, tmp_path / "burst", pool)
            wait_for(lambda: len(recorded(database)) >= 20, 60, "the burst under way", first, interval=0.02)
            old = tree(first.popen.pid)
            assert len(old) >= 7, old  # serve, 2 listeners, resource tracker, inference, delivery, training
            first.kill()
            orphan_seconds = wait_gone(old, ORPHAN_SECONDS, "the killed serve's processes")
            acked = acknowledged(futures)
        assert 20 <= len(acked) < sum(map(len, series)), "the kill did not land during the burst"
        assert acked <= recorded(database)  # nothing acknowledged is lost

        # 2. The next serve on the data directory: the PACS sends the series again; each is classified once.
        second = start(args, env)
        processes.append(second)
        wait_ready(second)
        for index, datasets in enumerate(series):
            push(port, datasets, tmp_path / f"again-{index}")
        url = f"sqlite:///{data_dir / 'triage.sqlite3'}"
        wait_for(lambda: all_final(report(url), uids), 180, "every series classified", second)
        assert_each_revision_once(database, uids)

        # 3. SIGTERM while a job is being classified: serve ends within its bound, the job goes back to the queue.
        slow = long_series()
        push(port, slow, tmp_path / "slow")
        slow_uid = slow[0].SeriesInstanceUID
        wait_running(database, slow_uid, second)
        old = tree(second.popen.pid)
        status, stop_seconds = terminate_timed(second)
        assert status == 0, second.output[-3000:]
        assert stop_seconds < SERVE_STOP_SECONDS, second.output[-3000:]
        wait_gone(old, ORPHAN_SECONDS, "the stopped serve's processes")
        handed_back = job_of(database, slow_uid)
        assert handed_back is not None and handed_back.state != JobState.DONE, "the job ended before the stop"
        assert handed_back.worker_pk is None and "handing its work back" in second.output

        # 4. The next serve finishes it, once.
        third = start(args, env)
        processes.append(third)
        wait_ready(third)
        wait_for(lambda: all_final(report(url), {slow_uid}), 180, "the handed-back job finished", third)
        assert_each_revision_once(database, uids | {slow_uid})
        finished = job_of(database, slow_uid)
        assert finished is not None and finished.attempts == 2
        status, idle_seconds = terminate_timed(third)
        assert status == 0 and idle_seconds < SERVE_STOP_SECONDS
        print(f"\nserve: tree gone {orphan_seconds:.2f} s after SIGKILL; SIGTERM to exit {stop_seconds:.2f} s with a "
              f"job in flight, {idle_seconds:.2f} s idle")
    finally:
        database.dispose()


def test_listen_processes_killed_terminated_refused_and_leftovers_stopped(
    tmp_path: Path, processes: list[Child]
) -> None:
    data_dir, port = tmp_path / "data", free_port()
    env = triage_environment(tmp_path / "models")
    args = ["listen", "--data-dir", str(data_dir), "--dicom-port", str(port), "--processes", "2"]
    database = Database(f"sqlite:///{data_dir / 'triage.sqlite3'}")
    series = [mr_series(brain_images(25, seed=50 + i)) for i in range(4)]
    sent: set[str] = set()
    try:
        # SIGKILL mid-burst: both listener processes and the resource tracker end with it.
        first = start(args, env)
        processes.append(first)
        wait_ready(first)
        with ThreadPoolExecutor(len(series)) as pool:
            futures = burst(port, series, tmp_path / "burst", pool)
            wait_for(lambda: len(recorded(database)) >= 10, 60, "the burst under way", first, interval=0.02)
            old = tree(first.popen.pid)
            assert len(old) == 4, old
            first.kill()
            orphan_seconds = wait_gone(old, ORPHAN_SECONDS, "the killed listen's processes")
            sent |= acknowledged(futures)

        # The next listen has every acknowledged instance; a second one on the same data directory is refused.
        second = start(args, env)
        processes.append(second)
        wait_ready(second)
        assert sent <= recorded(database)
        refused = subprocess.run([sys.executable, "-m", "worker.cli", "listen", "--data-dir", str(data_dir),
                                  "--dicom-port", str(free_port())], cwd=ROOT, env=env, capture_output=True,
                                 text=True, timeout=60)
        assert refused.returncode == 1
        assert (f"another dicom-triage listen (pid {second.popen.pid}) is running on data directory {data_dir}"
                in refused.stderr), refused.stderr

        # SIGTERM mid-burst: within the bound, every acknowledged instance recorded, no process left.
        more = [mr_series(brain_images(25, seed=60 + i)) for i in range(4)]
        with ThreadPoolExecutor(len(more)) as pool:
            futures = burst(port, more, tmp_path / "burst-2", pool)
            wait_for(lambda: len(recorded(database)) >= len(sent) + 10, 60, "the second burst under way", second,
                     interval=0.02)
            old = tree(second.popen.pid)
            status, stop_seconds = terminate_timed(second)
            sent |= acknowledged(futures)
        assert status == 0 and stop_seconds < SERVE_STOP_SECONDS, second.output[-3000:]
        wait_gone(old, ORPHAN_SECONDS, "the stopped listen's processes")
        assert sent <= recorded(database)

        # Children the parent-death signal could not stop (stopped with SIGSTOP here: they act on it only when
        # continued) are stopped by the next start, which finds them in the data directory's record.
        third = start(args, env)
        processes.append(third)
        match = re.search(r"2 listener processes, pids (\d+), (\d+)\)", wait_ready(third))
        assert match, third.output
        listeners = {int(pid): process_start_time(int(pid)) for pid in match.groups()}
        for pid in listeners:
            os.kill(pid, signal.SIGSTOP)
        third.kill()
        for pid in listeners:  # the kernel has sent the parent-death SIGTERM, which waits for a SIGCONT
            wait_signal_pending(pid, signal.SIGTERM, f"the parent-death signal of stopped listener {pid}")
        assert len(still_running(listeners)) == 2  # type: ignore[arg-type]
        fourth = start(args, env)
        processes.append(fourth)
        wait_ready(fourth)
        assert "stopping 2 process(es) left running by an earlier dicom-triage listen" in fourth.output
        wait_gone(listeners, ORPHAN_SECONDS, "the leftover listener processes")  # type: ignore[arg-type]
        push(port, series[0], tmp_path / "after")
        status, _ = terminate_timed(fourth)
        assert status == 0
        print(f"\nlisten: tree gone {orphan_seconds:.2f} s after SIGKILL, {stop_seconds:.2f} s after SIGTERM")
    finally:
        database.dispose()


def test_worker_alone_terminated_mid_job_then_killed(models_dir: Path, tmp_path: Path,
                                                     processes: list[Child]) -> None:
    data_dir, port = tmp_path / "data", free_port()
    env = triage_environment(models_dir, inference_batch_size="1")
    database = Database(f"sqlite:///{data_dir / 'triage.sqlite3'}")
    try:
        listen = start(["listen", "--data-dir", str(data_dir), "--dicom-port", str(port)], env)
        first = start(["worker", "--data-dir", str(data_dir)], env)
        processes += [listen, first]
        wait_ready(listen)
        wait_ready(first)
        slow = long_series()
        push(port, slow, tmp_path / "slow")
        slow_uid = slow[0].SeriesInstanceUID
        wait_running(database, slow_uid, listen, first)
        status, stop_seconds = terminate_timed(first)
        assert status == 0 and stop_seconds < WORKER_STOP_SECONDS, first.output[-3000:]
        handed_back = job_of(database, slow_uid)
        assert handed_back is not None and handed_back.state != JobState.DONE, "the job ended before the stop"
        assert handed_back.worker_pk is None

        second = start(["worker", "--data-dir", str(data_dir)], env)
        processes.append(second)
        wait_ready(second)
        url = f"sqlite:///{data_dir / 'triage.sqlite3'}"
        wait_for(lambda: all_final(report(url), {slow_uid}), 180, "the handed-back job finished", listen, second)
        assert_each_revision_once(database, {slow_uid})
        finished = job_of(database, slow_uid)
        assert finished is not None and finished.attempts == 2

        # SIGKILL mid-job: nothing of its tree remains (its pool is threads: no pool processes either).
        again = long_series(copies=1)
        push(port, again, tmp_path / "again")
        wait_running(database, again[0].SeriesInstanceUID, listen, second)
        old = tree(second.popen.pid)
        second.kill()
        wait_gone(old, ORPHAN_SECONDS, "the killed worker's processes")
        assert listen.terminate() == 0
        print(f"\nworker: SIGTERM to exit {stop_seconds:.2f} s with a job in flight")
    finally:
        database.dispose()


# The parent-death contract itself, on small Python processes: a parent that starts a child, then is killed.
_PARENT = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
    print(child.pid, flush=True)
    time.sleep(60)
""")
_CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from worker.lifetime import die_with_parent
    signal.signal(signal.SIGTERM, lambda *_: (print("SIGTERM", flush=True), os._exit(0)))
    print(die_with_parent(os.getppid(), use_prctl=sys.argv[1] == "prctl"), flush=True)
    time.sleep(60)
""")


def _orphan_ends(mode: str) -> float:
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, _CHILD, mode], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    assert parent.stdout is not None
    child_pid = int(parent.stdout.readline())
    try:
        assert parent.stdout.readline().strip() == mode  # the child's own line: how it watches
        started = {child_pid: process_start_time(child_pid)}
        parent.kill()
        parent.wait()
        return wait_gone(started, ORPHAN_SECONDS, f"the orphan ({mode})")  # type: ignore[arg-type]
    finally:
        if process_start_time(child_pid) is not None:
            os.kill(child_pid, signal.SIGKILL)


def test_a_child_ends_with_its_killed_parent_by_prctl_or_by_watching() -> None:
    assert _orphan_ends("prctl") < 1.0
    assert _orphan_ends("watch") < 2.0


def test_a_child_whose_parent_died_before_it_started_exits_at_once() -> None:
    # The expected parent is not our parent: as if it had died (and we were re-parented) before prctl.
    code = "import sys; from worker.lifetime import die_with_parent; die_with_parent(1); print('ran on')"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_PARENT_GONE
    assert "ran on" not in done.stdout
    assert "the supervising process 1 is gone before this one started" in done.stderr
