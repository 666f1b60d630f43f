"""Helpers for tests that start real processes: free loopback ports, a network namespace, children whose output
is kept (and shown when a test fails), waiting for a condition."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def triage_command(*args: str) -> list[str]:
    """The command line of ``dicom-triage ARGS`` run from this checkout."""
    return [sys.executable, "-m", "worker.cli", *args]


def triage_environment(models_dir: Path, **settings: object) -> dict[str, str]:
    """This process's environment without its DICOM_TRIAGE_* variables, plus what children under test need:
    ``models_dir``, a one-second series quiet time, loopback only, no free-disk floor, the CPU, and
    ``settings`` as DICOM_TRIAGE_<NAME> variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_TRIAGE_")}
    env.update(
        DICOM_TRIAGE_MODELS_DIR=str(models_dir),
        DICOM_TRIAGE_SERIES_QUIET_SECONDS="1",
        DICOM_TRIAGE_DICOM_HOST="127.0.0.1",
        DICOM_TRIAGE_MIN_FREE_DISK_MB="0",
        CUDA_VISIBLE_DEVICES="",  # the tests' tiny models run on the CPU
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    env.update({f"DICOM_TRIAGE_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def serve_ready(line: str) -> bool:
    """The line ``serve`` and ``listen`` print once they accept associations."""
    return line.startswith("dicom-triage ready:")


def celery_ready(line: str) -> bool:
    """The line a Celery worker prints once it takes tasks."""
    return line.rstrip().endswith(" ready.")


class NetworkNamespace:
    """A fresh network namespace with only loopback up, held by a sleeping process; run commands in it."""

    def __init__(self) -> None:
        self.holder = subprocess.Popen(
            ["unshare", "-n", "sh", "-c", "ip link set lo up && echo up && exec sleep 86400"],
            stdout=subprocess.PIPE, text=True,
        )
        assert self.holder.stdout is not None and self.holder.stdout.readline().strip() == "up"

    def command(self, args: list[str]) -> list[str]:
        return ["nsenter", f"--net=/proc/{self.holder.pid}/ns/net", *args]

    def run(self, args: list[str], **options: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(args), capture_output=True, text=True, timeout=60, **options)

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait()


class Child:
    """A subprocess whose output (stdout and stderr) is collected by a thread, to show when a test fails."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None, *, name: str | None = None,
                 netns: NetworkNamespace | None = None, cwd: Path = ROOT) -> None:
        self.name = name or Path(command[0]).name
        self.popen = subprocess.Popen(netns.command(command) if netns else command, cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, predicate: Callable[[str], bool], timeout: float, what: str | None = None) -> str:
        """The first output line ``predicate`` accepts; fails at once if the child exits first."""
        what = what or self.name
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if predicate(line):
                    return line
            if self.popen.poll() is not None:
                raise AssertionError(f"{what}: exited with {self.popen.returncode}:\n{self.output[-5000:]}")
            time.sleep(0.05)
        raise AssertionError(f"{what}: not seen after {timeout} s:\n{self.output[-5000:]}")

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit status; a child that ignores it for ``timeout`` s is killed and fails the test."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise AssertionError(f"{self.name} ignored SIGTERM for {timeout} s:\n{self.output[-5000:]}")

    def stop(self, timeout: float = 60) -> None:
        """Clean-up: SIGTERM if still running, SIGKILL if it has not exited after ``timeout`` s."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def kill(self) -> None:
        self.popen.kill()
        self.popen.wait()


def wait_for(condition: Callable[[], Any], timeout: float, what: str, *children: Child, interval: float = 0.2,
             alive: bool = False) -> Any:
    """Poll ``condition`` until it returns something true, and return that; on time-out show the children's
    output. With ``alive``, fail as soon as one of the children has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        if alive:
            for child in children:
                assert child.popen.poll() is None, f"{what}: {child.name} exited:\n{child.output[-4000:]}"
        time.sleep(interval)
    logs = "\n".join(f"--- {child.name}:\n{child.output[-4000:]}" for child in children)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")
