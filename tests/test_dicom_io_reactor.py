"""The event-driven association threads of our Storage SCP (``dicom_io.reactor``).

A real ``dicom-triage listen`` holds eight idle associations: its CPU while they idle stays a fraction of what
pynetdicom's polling threads cost (about 70 ms per second per association here), and after idling each association
still answers an echo at once and releases at once. The pynetdicom code that ``dicom_io.reactor`` mirrors is checked
for changes, so that an upgrade of pynetdicom is re-checked against it.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import time
from pathlib import Path

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import Verification
from pynetdicom.transport import RequestHandler

from processes import Child, free_port, serve_ready, triage_command, triage_environment

AE_TITLE = "DICOM_TRIAGE"
IDLE_ASSOCIATIONS = 8
#: The listener's CPU allowed while they idle, in ms per second: pynetdicom's own threads used 550-600 here.
IDLE_CPU_LIMIT_MS_PER_S = 200
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

#: sha256 (first 16 hex digits) of the pynetdicom 3.0.4 functions dicom_io.reactor mirrors.
MIRRORED = {
    DULServiceProvider.run_reactor: "e3a10eb3a0931e48",
    Association._run_reactor: "f28838c5559e462a",
    RequestHandler._create_association: "05c8d12b79863cdb",
}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime of all its threads


def test_mirrored_pynetdicom_code_is_unchanged() -> None:
    changed = [
        function.__qualname__
        for function, digest in MIRRORED.items()
        if hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16] != digest
    ]
    assert not changed, (
        f"pynetdicom changed {changed}: compare dicom_io/reactor.py with them, then update MIRRORED"
    )


def test_idle_associations_cost_little_cpu_and_still_answer_at_once(tmp_path: Path) -> None:
    port = free_port()
    env = triage_environment(tmp_path / "models", max_associations=IDLE_ASSOCIATIONS + 2)
    listen = Child(triage_command("listen", "--data-dir", str(tmp_path / "data"), "--dicom-port", str(port)),
                   env, name="listen")
    ae = AE(ae_title="IDLE_SCU")
    ae.add_requested_context(Verification)
    associations = []
    try:
        listen.wait_for_line(serve_ready, 120)
        for _ in range(IDLE_ASSOCIATIONS):
            association = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
            assert association.is_established, listen.output
            associations.append(association)
        time.sleep(1)  # settle: negotiation done on every association
        before = _cpu_seconds(listen.popen.pid)
        time.sleep(3)
        idle_ms_per_s = (_cpu_seconds(listen.popen.pid) - before) * 1000 / 3
        assert idle_ms_per_s < IDLE_CPU_LIMIT_MS_PER_S, f"{idle_ms_per_s:.0f} ms of CPU per second while idle"

        for association in associations:
            started = time.monotonic()
            status = association.send_c_echo()
            assert status.Status == 0x0000
            # The requestor's own polling adds a few ms; a missed wake-up would wait for the 20 ms poll, a
            # stuck thread for the 120 s DIMSE timeout.
            assert time.monotonic() - started < 0.5
        for association in associations:
            started = time.monotonic()
            association.release()
            assert association.is_released
            assert time.monotonic() - started < 0.5
        associations.clear()
    finally:
        for association in associations:
            association.abort()
        listen.stop()
