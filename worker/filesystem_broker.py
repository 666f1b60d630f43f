"""Celery's filesystem broker, made safe for several processes sharing one queue folder.

kombu's filesystem transport (5.x) creates a message file and then writes it, while a consumer in another process
may already take that file: it reads it empty, deletes it and its worker dies on the JSON error (CI saw an SR
delivery worker die so; the message was gone). The exchange table has the same gap: a second process can read the
file another has just created and not yet written. This transport keeps kombu's folder layout and file names and
changes only how files appear and are taken:

- a message is written whole under a name no consumer looks at, then renamed into the queue folder (rename is
  atomic within one file system, so a consumer sees the whole file or none);
- a consumer takes a message by renaming it into its ``taken`` folder (exactly one consumer wins the rename), reads
  it there and deletes it; a file that still cannot be decoded is set aside in ``rejected`` with a logged reason,
  and the consumer goes on;
- an exchange table is created whole (linked into place from a written temporary file) before kombu updates it
  under its lock, and bindings are remembered per broker folder, not once per process.

Messages are not fsynced: every job and delivery message is sent again from the database's state when a worker
starts (:mod:`worker.workers`, :mod:`worker.delivery`), so the database, not this folder, is what must survive a
power cut.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from functools import cached_property
from pathlib import Path
from queue import Empty
from time import monotonic
from typing import Any, ClassVar

from kombu.exceptions import ChannelError
from kombu.transport import filesystem, virtual
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads

logger = logging.getLogger(__name__)

#: The transport's name for :setting:`broker_transport` (a ``module:Class`` path kombu resolves).
TRANSPORT = f"{__name__}:Transport"


def _write_whole(folder: Path, data: bytes) -> Path:
    """``data`` in a new file in ``folder`` under a hidden name no queue matches; return its path."""
    path = folder / f".writing-{uuid.uuid4().hex}"
    with open(path, "xb", buffering=0) as file:
        file.write(data)
    return path


class Channel(filesystem.Channel):
    """kombu's filesystem channel with whole-file puts, rename-to-take gets and atomically created exchanges."""

    @cached_property
    def taken_folder(self) -> Path:
        """Where this host's consumers move a message they take (on the queue folder's file system)."""
        return Path(self.transport_options.get("taken_folder") or Path(self.data_folder_in).parent / "taken")

    @cached_property
    def rejected_folder(self) -> Path:
        """Where a message file that cannot be decoded is kept for an admin to look at."""
        return Path(self.transport_options.get("rejected_folder") or Path(self.data_folder_in).parent / "rejected")

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        """Write ``payload`` whole, then rename it into the queue folder under kombu's name for it."""
        folder = Path(self.data_folder_out)
        # kombu's name: milliseconds first, so a sorted listing is (roughly) first in, first out.
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        try:
            written = _write_whole(folder, str_to_bytes(dumps(payload)))
            os.replace(written, folder / name)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {name!r} to directory {folder}") from exc

    def _get(self, queue: str) -> Any:
        """Take the oldest message of ``queue`` that no other consumer took first."""
        wanted = f"{queue}.msg"
        folder = Path(self.data_folder_in)
        self.taken_folder.mkdir(parents=True, exist_ok=True)
        for name in sorted(os.listdir(folder)):
            if name.partition(".")[2] != wanted:
                continue
            taken = self.taken_folder / name
            try:
                os.rename(folder / name, taken)
            except FileNotFoundError:
                continue  # another consumer took it
            try:
                payload = taken.read_bytes()
            except OSError as exc:
                raise ChannelError(f"Cannot read file {str(taken)!r} from queue.") from exc
            try:
                message = loads(bytes_to_str(payload))
            except ValueError as exc:
                self._reject(taken, exc)
                continue
            taken.unlink()
            return message
        raise Empty()

    def _reject(self, path: Path, error: Exception) -> None:
        self.rejected_folder.mkdir(parents=True, exist_ok=True)
        os.replace(path, self.rejected_folder / path.name)
        logger.error("broker message %s could not be decoded (%s): kept in %s", path.name, error,
                     self.rejected_folder)

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        """Create the exchange's table whole if it is missing, then let kombu add the binding under its lock."""
        table = self._exchange_file(exchange)
        if not table.exists():
            self.control_folder.mkdir(parents=True, exist_ok=True)
            written = _write_whole(self.control_folder, str_to_bytes(dumps([])))
            try:
                os.link(written, table)  # fails if another process created it first: theirs is as good
            except FileExistsError:
                pass
            finally:
                written.unlink()
        super()._queue_bind(exchange, routing_key, pattern, queue)


class Transport(filesystem.Transport):
    """The filesystem transport with :class:`Channel`, and its exchange bindings remembered per broker folder."""

    Channel = Channel
    # kombu remembers declared bindings once per process for this transport and then skips writing them: a process
    # opening a second broker folder (tests, admin tools) would route its messages to no queue there.
    _states: ClassVar[dict[str, virtual.BrokerState]] = {}
    _states_lock = threading.Lock()

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        folder = os.path.abspath(client.transport_options.get("control_folder", "control"))
        with self._states_lock:
            self.state = self._states.setdefault(folder, virtual.BrokerState())
