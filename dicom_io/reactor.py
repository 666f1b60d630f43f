"""Event-driven reactor threads for the associations our Storage SCP accepts.

pynetdicom 3.0 serves each association with two polling threads: the DUL reactor sleeps 1 ms whenever a turn finds
nothing to do, and the association reactor sleeps 1 ms on every turn. Each wake-up is Python work: with 8 idle
associations a bare pynetdicom SCP used 0.55 of a core here (of 2), and each message waits for the next turn of a
poll on its way in and out. Here the two threads wait for what they serve instead:

* :class:`EventDrivenDUL` waits in ``select()`` on the peer's socket and on a wake-up socket that
  :meth:`~EventDrivenDUL.send_pdu` and :meth:`~EventDrivenDUL.kill_dul` write to, and sets
  :attr:`~EventDrivenDUL.activity` after each state-machine action (a DIMSE message, a release or an abort may then
  be waiting for the association thread);
* :class:`EventDrivenAssociation` waits on that event.

Both still wake every :data:`POLL_SECONDS` for the timers (ARTIM, network timeout) and anything nothing signals.
The loops are pynetdicom 3.0.4's own with only the waits changed, and log to pynetdicom's loggers as those do;
``tests/test_dicom_io_reactor.py`` fails when pynetdicom's change, so that these are checked against them again.
:class:`EventDrivenRequestHandler` is the ``request_handler`` an ``AssociationServer`` takes
(``AE.make_server(..., request_handler=...)``).
"""

from __future__ import annotations

import queue
import select
import socket
import ssl
import threading
from copy import deepcopy
from datetime import datetime
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import LOGGER as ASSOCIATION_LOGGER
from pynetdicom.association import Association
from pynetdicom.dul import LOGGER as DUL_LOGGER
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT, A_RELEASE, P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler

#: How often an idle thread wakes anyway: the granularity of the timers (ARTIM, network timeout), and the longest
#: a change that nothing signals waits to be noticed.
POLL_SECONDS = 0.02

_Primitive = A_ASSOCIATE | A_RELEASE | A_ABORT | A_P_ABORT | P_DATA


class EventDrivenDUL(DULServiceProvider):
    """pynetdicom's DUL service provider, its reactor waiting in ``select()`` instead of sleeping 1 ms per turn."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        #: Set after every state-machine action: the association thread may have something to serve.
        self.activity = threading.Event()
        # One byte written here ends the reactor's wait: a primitive to send, or the thread to stop.
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)

    def send_pdu(self, primitive: _Primitive) -> None:
        super().send_pdu(primitive)
        self._wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_writer.send(b"\0")
        except OSError:  # full: a wake-up is pending already; closed: the reactor has ended
            pass

    def _wait(self) -> None:
        """Until the peer sends, the association queues a primitive, the thread is told to stop, or POLL_SECONDS."""
        waitables: list[Any] = [self._wake_reader]
        wrapper = cast("AssociationSocket | None", self.socket)
        peer = wrapper.socket if wrapper is not None and wrapper._is_connected else None
        if peer is not None:
            if isinstance(peer, ssl.SSLSocket) and peer.pending():
                return  # decrypted bytes already buffered: select() would not see them
            waitables.append(peer)
        try:
            select.select(waitables, [], [], POLL_SECONDS)
        except (OSError, ValueError):  # the peer's socket closed meanwhile: the next turn finds out
            pass
        try:
            while self._wake_reader.recv(4096):
                pass
        except OSError:  # drained
            pass

    def run_reactor(self) -> None:
        """pynetdicom 3.0.4's ``DULServiceProvider.run_reactor`` with :meth:`_wait` for its sleep."""
        try:
            self._react()
        finally:
            self._wake_reader.close()
            self._wake_writer.close()
            self.activity.set()  # the association thread sees at once that the DUL has ended

    def _react(self) -> None:
        self._idle_timer.start()
        self.socket = cast("AssociationSocket", self.socket)
        sleep = False

        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True

            if sleep:
                # Nothing was processed last turn: wait for the next event (pynetdicom sleeps 1 ms here).
                self._wait()

            if self._kill_thread:
                break

            if self.artim_timer.expired:
                self.event_queue.put("Evt18")

            try:
                # Either encode and send a primitive or receive and decode a PDU, per turn.
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                DUL_LOGGER.error("Exception in DUL.run(), aborting association")
                DUL_LOGGER.exception(exc)
                # Bypass the state machine, which an exception here leaves in an unknown state.
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return

            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue

            self.state_machine.do_action(event)
            self.activity.set()
            sleep = False


class EventDrivenAssociation(Association):
    """pynetdicom's ``Association`` with an :class:`EventDrivenDUL` and a reactor that waits on its activity."""

    def __init__(self, ae: Any, mode: str) -> None:
        super().__init__(ae, mode)
        self.dul: EventDrivenDUL = EventDrivenDUL(self)  # the one Association made is never started
        # Association set these timeouts on the DUL it made: again, on ours.
        self.acse_timeout = self.ae.acse_timeout
        self.network_timeout = self.ae.network_timeout

    def _run_reactor(self) -> None:
        """pynetdicom 3.0.4's ``Association._run_reactor`` waiting on the DUL's activity instead of sleeping 1 ms."""
        self._is_paused = False
        served = False
        while not self._kill:
            if not served:
                # Cleared before the checks below: an action after them sets it again, so none is missed.
                self.dul.activity.wait(POLL_SECONDS)
                self.dul.activity.clear()

            # A service user's send_*() pauses the reactor so that it cannot take the response off the queue.
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            served = msg is not None
            if msg:
                self._serve_request(msg, cast(int, context_id))

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                ASSOCIATION_LOGGER.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                ASSOCIATION_LOGGER.info(log_msg)
                # Ensure that EVT_ACSE_RECV fires for subscribers
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                ASSOCIATION_LOGGER.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()

                self.kill()
                return


class EventDrivenRequestHandler(RequestHandler):
    """pynetdicom's request handler making an :class:`EventDrivenAssociation` for each connection."""

    def _create_association(self) -> Association:
        """pynetdicom 3.0.4's ``RequestHandler._create_association`` with our association class."""
        assoc = EventDrivenAssociation(self.ae, "acceptor")
        assoc._server = self.server

        timestamp = datetime.strftime(datetime.now(), "%Y%m%d%H%M%S")
        assoc.name = f"AcceptorThread@{timestamp}"

        sock = AssociationSocket(assoc, client_socket=self.request)
        assoc.set_socket(sock)

        # Association acceptor: the local AE.
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)

        # Association requestor: the remote AE.
        assoc.requestor.address_info = self.remote

        for event in self.server._handlers:
            if event.is_intervention and self.server._handlers[event]:
                assoc.bind(event, *self.server._handlers[event])
            elif isinstance(event, evt.NotificationEvent):
                for handler in self.server._handlers[event]:
                    handler = cast(evt._HandlerBase, handler)
                    assoc.bind(event, handler[0], handler[1])

        return assoc
