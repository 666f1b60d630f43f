"""``min_free_disk_mb`` from a real configuration file reaches the listener (issue 24): ``dicom-triage listen
--config`` with its data directory on an 8 MiB tmpfs of its own (``unshare -m``) takes instances from dcmtk's
storescu until the archive's file system is below the watermark, then answers 0xA700 (out of resources) to every
one after; every instance it acknowledged is in the archive, none it refused is.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from dicom_factory import ct_images, storescu, write_files
from dicom_io.synthesis import ct_series
from processes import Child, free_port, serve_ready, triage_command, triage_environment

ROOT = Path(__file__).resolve().parents[1]
OUR_AE = "DICOM_TRIAGE"
SUCCESS, OUT_OF_RESOURCES = 0x0000, 0xA700  # PS3.4 Annex B.2.3: Refused, Out of Resources
TMPFS_MB, WATERMARK_MB = 8, 4


def test_the_listener_refuses_instances_below_the_configured_disk_watermark(tmp_path: Path,
                                                                             processes: list[Child]) -> None:
    data_dir, port = tmp_path / "data", free_port()
    data_dir.mkdir()
    config = tmp_path / "triage.toml"
    config.write_text(f'ae_title = "{OUR_AE}"\nmin_free_disk_mb = {WATERMARK_MB}\n')
    env = triage_environment(tmp_path / "no-models")
    del env["DICOM_TRIAGE_MIN_FREE_DISK_MB"]  # the tests' default of 0 would override the file
    listen = triage_command("listen", "--config", str(config), "--data-dir", str(data_dir), "--dicom-port", str(port))
    script = f'mount -t tmpfs -o size={TMPFS_MB}m tmpfs "{data_dir}" && exec "$@"'
    child = Child(["unshare", "-m", "sh", "-c", script, "sh", *listen], env, name="listen")
    processes.append(child)
    child.wait_for_line(serve_ready, 120)

    # CT slices of about 170 kB each: more in all than the space above the watermark.
    series = ct_series(ct_images(40, seed=3))
    files = write_files(series, tmp_path / "push")
    assert sum(f.stat().st_size for f in files) > (TMPFS_MB - WATERMARK_MB) * 2**20
    sent = storescu(port, files, calling_ae="PACS", called_ae=OUR_AE)
    assert len(sent.statuses) == len(files), sent.output[-3000:]
    accepted = sent.statuses.count(SUCCESS)
    assert accepted >= 1, sent.statuses
    assert sent.statuses == [SUCCESS] * accepted + [OUT_OF_RESOURCES] * (len(files) - accepted), sent.statuses

    seen = Path(f"/proc/{child.popen.pid}/root") / str(data_dir).lstrip("/")  # its tmpfs, from here
    archived = {p.stem for p in seen.rglob("*.dcm")}
    assert archived == {ds.SOPInstanceUID for ds in series[:accepted]}
    # Refused for the configured watermark (not for a full disk, which also answers 0xA700): what `results` says,
    # run in the listener's mount namespace, where its data directory is.
    completed = subprocess.run(
        ["nsenter", f"--mount=/proc/{child.popen.pid}/ns/mnt",
         *triage_command("results", "--json", "--config", str(config), "--data-dir", str(data_dir))],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    refused = [(r["sop_instance_uid"], r["reason"]) for r in json.loads(completed.stdout)["rejected"]]
    assert {uid for uid, _ in refused} == {ds.SOPInstanceUID for ds in series[accepted:]}
    assert all(f"below the {WATERMARK_MB * 2**20} byte watermark" in reason for _, reason in refused), refused
    assert child.terminate() == 0
