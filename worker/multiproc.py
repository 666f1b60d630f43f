"""Where a process tree's metric files go: ``serve`` and ``listen`` set ``PROMETHEUS_MULTIPROC_DIR`` before
``prometheus_client`` is imported (it reads the variable once, at import), and their children inherit it. Nothing
here imports ``prometheus_client``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def use_multiprocess_dir(run_dir: Path) -> Path:
    """Make this process and every child it starts write metrics under ``run_dir/metrics/<host>-<pid>`` (call before
    this module is imported; a folder already given in the environment is kept). Returns the folder."""
    if os.environ.get(MULTIPROC_ENV):
        return Path(os.environ[MULTIPROC_ENV])
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"
    folder = run_dir / "metrics" / f"{host}-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(folder)
    return folder


def remove_stale_multiprocess_dirs(run_dir: Path) -> None:
    """Remove the metric folders of this host's earlier supervisors (call once holding the supervisor lock, so none
    of them runs): their counters belong to processes that are gone, and a restart counts from zero again, which
    Prometheus' ``rate`` expects."""
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"
    current = os.environ.get(MULTIPROC_ENV)
    for folder in (run_dir / "metrics").glob(f"{host}-*"):
        if str(folder) != current:
            shutil.rmtree(folder, ignore_errors=True)
