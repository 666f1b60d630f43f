"""Ingest throughput: our listener vs a bare pynetdicom SCP vs dcmtk's storescp, side by side in one run.

    .venv/bin/python bench/ingest.py [--instances 1000] [--concurrency 1 8] [--repeat 1] [--processes 2]
        [--database-url 'postgresql://postgres@/test?host=/var/run/postgresql']

Makes ``--instances`` MR and CT instances (alternating) from the images in ../shared/data, then for each
concurrency and each receiver pushes all of them with ``--concurrency`` parallel dcmtk ``storescu`` processes
(one association each, TCP_NODELAY=1) and times first byte to last response. Receivers, each in its own process
and its own network namespace (``unshare -n``: loopback only, nothing else can reach them):

* ``triage``   ``dicom-triage listen`` (StorageListener + archive + SQLite rows): the product. With
  ``--database-url`` (PostgreSQL, through its Unix socket: the namespace has no route to a TCP port outside it),
  the ``listen`` receivers record their rows there instead, each run in a database of its own made for it.
* ``triage-N`` ``dicom-triage listen --processes N`` (``--processes``, default 2): N listener processes accepting
  on one listening socket, each with its own sink, one SQLite database.
* ``triage-cold`` (only when named in ``--receivers``) ``dicom-triage listen`` with ``archive_files_ahead`` 0: each
  store creates its archive file, as before the archive made them ahead.
* ``listener`` dicom_io's StorageListener with a sink that only archives (fsynced files).
* ``bare``     a pynetdicom SCP with the same contexts, PDU size and TCP_NODELAY whose handler discards.
* ``storescp`` dcmtk's storescp writing files (``--fork`` so it serves parallel associations).

Prints instances/s, the receiver's CPU per instance (its processes and their children together; less distorted
by machine load than wall time), the 1-minute load average at each run's start, and the ratios the issue's targets
ask for (triage/bare >= 0.8, triage/storescp, and the same for triage-N).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED_DATA = ROOT.parent / "shared" / "data"
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
AE_TITLE = "BENCH_SCP"
PORT = 11112
RECEIVERS = ("triage", "triage-N", "listener", "bare", "storescp")
OPTIONAL_RECEIVERS = ("triage-cold",)
LISTEN_RECEIVERS = ("triage", "triage-N", "triage-cold")  # dicom-triage listen
DCMTK_ENV = {"PATH": "/usr/bin:/bin", "TCP_NODELAY": "1"}


def make_instances(count: int, directory: Path) -> list[Path]:
    """Alternate MR (224x224, 12-bit) and CT (HU, ~300-500 px) instances from the shared images."""
    from dicom_io import synthesis

    mr_images = sorted(SHARED_DATA.glob("brain-tumor-mri/Testing/*/*.jpg"))
    ct_images = sorted(SHARED_DATA.glob("covid-ct/*/*.png"))
    if not mr_images or not ct_images:
        raise SystemExit(f"no images under {SHARED_DATA}")
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    per_series = 50
    for start in range(0, count, per_series):
        size = min(per_series, count - start)
        mr = synthesis.mr_series(mr_images[start // 2 : start // 2 + (size + 1) // 2])
        ct = synthesis.ct_series(ct_images[start // 2 : start // 2 + size // 2])
        for index in range(size):
            ds = (mr if index % 2 == 0 else ct)[index // 2]
            path = directory / f"{start + index:06d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths


# Receivers (run with --serve inside the namespace).


def serve(kind: str, port: int, directory: Path) -> None:
    """Run a Python receiver until SIGTERM."""
    import threading

    from pynetdicom import AE, evt

    from config import Settings
    from dicom_io.archive import Archive
    from dicom_io.listener import (
        COMPRESSED_TRANSFER_SYNTAXES,
        IMAGE_STORAGE_SOP_CLASSES,
        NATIVE_TRANSFER_SYNTAXES,
        StorageListener,
        received_file,
    )
    from dicom_io.network import TCP_NODELAY_HANDLER

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if kind == "listener":

        class ArchiveSink:
            def __init__(self) -> None:
                # Files made ahead as the product's listener makes them (the setting's default).
                self.archive = Archive(directory, files_ahead=Settings().archive_files_ahead)

            def accept(self, ds, calling_ae):  # type: ignore[no-untyped-def]
                self.archive.store(ds, encoded=received_file(ds))
                return 0x0000

            def reject(self, calling_ae, sop_instance_uid, reason):  # type: ignore[no-untyped-def]
                print(f"rejected {sop_instance_uid}: {reason}", file=sys.stderr)

        listener = StorageListener(AE_TITLE, "127.0.0.1", port, ArchiveSink(), max_associations=16)
        listener.start()
        stop.wait()
        listener.stop()
        return
    # bare: the same AE settings as StorageListener, a handler that discards.
    ae = AE(ae_title=AE_TITLE)
    ae.maximum_associations = 16
    ae.maximum_pdu_size = 0
    syntaxes = list(NATIVE_TRANSFER_SYNTAXES + COMPRESSED_TRANSFER_SYNTAXES)
    for uid in IMAGE_STORAGE_SOP_CLASSES:
        ae.add_supported_context(uid, syntaxes)
    ae.add_supported_context("1.2.840.10008.1.1")
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[TCP_NODELAY_HANDLER, (evt.EVT_C_STORE, lambda event: 0x0000)],
    )
    stop.wait()
    server.shutdown()


def _start_receiver(  # type: ignore[no-untyped-def]
    kind: str, port: int, directory: Path, log, processes: int, database_url: str | None = None
) -> subprocess.Popen:
    if kind == "storescp":
        command = [STORESCP, "--fork", "-pdu", "131072", "-aet", AE_TITLE, "-od", str(directory), str(port)]
        return subprocess.Popen(command, env=DCMTK_ENV, stdout=log, stderr=log)
    if kind in LISTEN_RECEIVERS:
        command = [
            sys.executable, "-m", "worker.cli", "listen", "--data-dir", str(directory),
            "--dicom-host", "127.0.0.1", "--dicom-port", str(port), "--ae-title", AE_TITLE,
        ]  # fmt: skip
        if kind == "triage-N":
            command += ["--processes", str(processes)]
        # 16 per process (each listen process takes the whole limit), as the other receivers have.
        env = {**os.environ, "DICOM_TRIAGE_MAX_ASSOCIATIONS": "16", "DICOM_TRIAGE_MIN_FREE_DISK_MB": "0"}
        if kind == "triage-cold":
            env["DICOM_TRIAGE_ARCHIVE_FILES_AHEAD"] = "0"
        if database_url:
            env["DICOM_TRIAGE_DATABASE_URL"] = database_url
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
    command = [sys.executable, __file__, "--serve", kind, "--port", str(port), "--directory", str(directory)]
    return subprocess.Popen(command, stdout=log, stderr=log)


def _wait_ready(  # type: ignore[type-arg]
    port: int, process: subprocess.Popen, ready_log: Path | None, timeout: float = 60
) -> None:
    """Until the receiver answers an echo and, with ``ready_log`` (``listen``), has printed its ready line: with
    --processes, one process answers echoes before all of them listen, and associations opened then all land on
    it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"receiver exited with {process.returncode} before it was ready")
        if ready_log is not None and "dicom-triage ready:" not in ready_log.read_text():
            time.sleep(0.1)
            continue
        done = subprocess.run([ECHOSCU, "-aec", AE_TITLE, "127.0.0.1", str(port)], capture_output=True, env=DCMTK_ENV)
        if done.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError("receiver not ready in time")


def _children(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:  # the thread ended since the listing
            continue
    return children


def _cpu_seconds(pid: int) -> float:
    """User+system CPU so far of a process, its reaped children (storescp --fork) and its live descendants
    (``listen --processes``' listener processes), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = _children(pid)
    except FileNotFoundError:  # exited meanwhile: its parent counts it once reaped
        return 0.0
    own = sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return own + sum(_cpu_seconds(child) for child in children)


def run_one(kind: str, concurrency: int, files: list[Path], work: Path, processes: int,
            database_url: str | None = None) -> dict[str, object]:
    """Inside a fresh network namespace: start ``kind``, push ``files`` over ``concurrency`` associations."""
    directory = work / f"{kind}-{concurrency}"
    directory.mkdir(parents=True)
    log_path = work / f"{kind}-{concurrency}.log"
    with log_path.open("w") as log:
        receiver = _start_receiver(kind, PORT, directory, log, processes, database_url)
        try:
            _wait_ready(PORT, receiver, log_path if kind in LISTEN_RECEIVERS else None)
            cpu_at_start = _cpu_seconds(receiver.pid)
            children_at_start = {child: _cpu_seconds(child) for child in _children(receiver.pid)}
            load = os.getloadavg()[0]  # other work on the machine skews wall time: report it beside each run
            chunks = [files[i::concurrency] for i in range(concurrency)]
            started = time.perf_counter()
            senders = [
                subprocess.Popen(
                    [STORESCU, "-v", "-aec", AE_TITLE, "127.0.0.1", str(PORT), *map(str, chunk)],
                    env=DCMTK_ENV,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                for chunk in chunks
            ]
            outputs = [sender.communicate()[0] for sender in senders]
            elapsed = time.perf_counter() - started
            time.sleep(0.5)  # storescp reaps its forked children (and so counts their CPU) asynchronously
            cpu_seconds = _cpu_seconds(receiver.pid) - cpu_at_start
            # How the work spread over the listener processes (whichever was free took each association).
            split = sorted(
                (round(_cpu_seconds(child) - cpu, 2) for child, cpu in children_at_start.items()), reverse=True
            )
        finally:
            receiver.send_signal(signal.SIGTERM if kind != "storescp" else signal.SIGINT)
            try:
                receiver.wait(timeout=30)
            except subprocess.TimeoutExpired:
                receiver.kill()
                receiver.wait()
    successes = sum(output.count("Received Store Response (Success)") for output in outputs)
    written = sum(1 for p in directory.rglob("*") if p.is_file() and (kind == "storescp" or p.suffix == ".dcm"))
    return {
        "receiver": kind,
        "processes": processes if kind == "triage-N" else 1,
        "concurrency": concurrency,
        "instances": len(files),
        "acknowledged": successes,
        "files_written": written if kind != "bare" else None,
        "seconds": round(elapsed, 3),
        "instances_per_second": round(successes / elapsed, 1),
        # CPU the receiver used while receiving: machine load distorts it far less than wall time.
        "receiver_cpu_ms_per_instance": round(cpu_seconds * 1000 / max(successes, 1), 2),
        "load_1min": round(load, 2),
        **({"database": "postgresql"} if database_url and kind in LISTEN_RECEIVERS else {}),
        **({"process_cpu_seconds": [s for s in split if s > 0.05]} if kind == "triage-N" else {}),
    }


def _in_namespace(kind: str, concurrency: int, list_file: Path, work: Path, processes: int,
                  database_url: str | None = None) -> dict[str, object]:
    with _fresh_database(database_url if kind in LISTEN_RECEIVERS else None) as run_url:
        inner = (
            f"ip link set lo up && exec {sys.executable} {__file__} --run-one {kind} --concurrency {concurrency} "
            f"--files {list_file} --work {work} --processes {processes}"
            + (f" --database-url {shlex.quote(run_url)}" if run_url else "")
        )
        done = subprocess.run(["unshare", "-n", "sh", "-c", inner], capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"{kind} x{concurrency} failed:\n{done.stdout}\n{done.stderr}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        if run_url:
            result["rows"] = _count_instances(run_url)  # proof the rows went there, not to a SQLite file
    return result


def _count_instances(url: str) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)  # _fresh_database's URL names the driver already
    try:
        with engine.connect() as connection:
            return int(connection.execute(text("SELECT count(*) FROM instances")).scalar_one())
    finally:
        engine.dispose()


def _unix_socket_url(url: str) -> None:
    """Refuse a URL the receivers could not reach from their namespace (only loopback inside it)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if not parsed.drivername.startswith("postgresql"):
        raise SystemExit(f"--database-url {url}: PostgreSQL only (SQLite is the default)")
    host = parsed.query.get("host") or parsed.host
    if host and not str(host).startswith("/"):
        raise SystemExit(f"--database-url {url}: the receivers run in a network namespace with only its own "
                         "loopback; give the server's Unix socket, e.g. "
                         "postgresql://postgres@/test?host=/var/run/postgresql")


@contextlib.contextmanager
def _fresh_database(url: str | None) -> Iterator[str | None]:
    """A new, empty database on ``url``'s server for one run (the same SOP Instance UIDs go to every run), dropped
    after it."""
    if url is None:
        yield None
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    server = make_url(url).set(drivername="postgresql+psycopg")
    name = f"bench_ingest_{os.getpid()}_{time.monotonic_ns()}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield server.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--receivers", nargs="+", choices=RECEIVERS + OPTIONAL_RECEIVERS, default=list(RECEIVERS))
    parser.add_argument("--repeat", type=int, default=1, help="runs per receiver; the median is reported")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--processes", type=int, default=2, help="listener processes of the triage-N receiver")
    parser.add_argument("--database-url", help="PostgreSQL (its Unix socket) for the listen receivers' rows")
    # Internal modes.
    parser.add_argument("--serve", choices=("listener", "bare"), help=argparse.SUPPRESS)
    parser.add_argument("--run-one", choices=RECEIVERS + OPTIONAL_RECEIVERS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=PORT, help=argparse.SUPPRESS)
    parser.add_argument("--directory", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--files", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve:
        serve(args.serve, args.port, args.directory)
        return 0
    if args.run_one:
        files = [Path(line) for line in args.files.read_text().splitlines()]
        work = Path(tempfile.mkdtemp(prefix=f"run-{args.run_one}-", dir=args.work))
        print(json.dumps(run_one(args.run_one, args.concurrency[0], files, work, args.processes, args.database_url)))
        return 0

    if args.database_url:
        _unix_socket_url(args.database_url)
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        print(f"making {args.instances} instances in {work} ...", flush=True)
        files = make_instances(args.instances, work / "in")
        size = sum(p.stat().st_size for p in files)
        print(f"{len(files)} files, {size / len(files) / 1024:.0f} KiB each on average", flush=True)
        list_file = work / "files.txt"
        list_file.write_text("\n".join(map(str, files)))
        results = []
        for concurrency in args.concurrency:
            for _ in range(args.repeat):
                for kind in args.receivers:  # interleaved so drifting machine load hits all alike
                    result = _in_namespace(kind, concurrency, list_file, work, args.processes, args.database_url)
                    print(json.dumps(result), flush=True)
                    results.append(result)
        summary = _summarise(results, args.concurrency, args.receivers, args.processes)
        print(summary)
        if args.json:
            args.json.write_text(json.dumps({"runs": results, "summary": summary}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _summarise(
    results: list[dict[str, object]], concurrencies: list[int], receivers: list[str], processes: int
) -> str:
    label = {kind: kind.replace("-N", f"-{processes}") for kind in receivers}
    lines = [
        f"{'associations':>12} " + " ".join(f"{label[kind]:>10}" for kind in receivers)
        + "   load   ratios (instances/s)",
    ]
    for concurrency in concurrencies:
        rate = {
            kind: statistics.median(
                float(r["instances_per_second"])  # type: ignore[arg-type]
                for r in results
                if r["receiver"] == kind and r["concurrency"] == concurrency
            )
            for kind in receivers
        }
        pairs = (
            ("listener", "bare"), ("triage", "bare"), ("triage-N", "bare"), ("triage-cold", "bare"),
            ("listener", "storescp"), ("triage", "storescp"), ("triage-N", "storescp"), ("triage", "triage-cold"),
        )
        ratios = [
            f"{label[a]}/{label[b]} {rate[a] / rate[b]:.2f}"
            for a, b in pairs
            if a in rate and b in rate and rate[b] > 0
        ]
        load = statistics.median(
            float(r["load_1min"]) for r in results if r["concurrency"] == concurrency  # type: ignore[arg-type]
        )
        lines.append(
            f"{concurrency:>12} " + " ".join(f"{rate[kind]:>10.1f}" for kind in receivers)
            + f"   {load:4.1f}   " + ", ".join(ratios)
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
