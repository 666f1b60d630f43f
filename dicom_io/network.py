"""Socket settings shared by every association we open or accept."""

from __future__ import annotations

import socket

from pynetdicom import evt
from pynetdicom.events import Event


def _set_tcp_nodelay(event: Event) -> None:
    # DIMSE is request/response: Nagle's algorithm would hold each small response (and the last PDU of each
    # dataset) back for a delayed ACK, costing up to 40 ms per instance on loopback.
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


#: pynetdicom event handler that sets TCP_NODELAY as soon as a connection opens (either side).
TCP_NODELAY_HANDLER = (evt.EVT_CONN_OPEN, _set_tcp_nodelay)
