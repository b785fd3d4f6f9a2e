"""The connections of ``graft serve``: a cap on how many are open, and a deadline for headers.

uvicorn cancels its keep-alive timer whenever a byte arrives and has no deadline for a request's
headers, so a client that sends them a byte at a time holds its connection (and a file
descriptor) for ever: 2,000 such clients were all kept. This subclass of uvicorn's h11 protocol
closes a connection whose request headers are not complete ``header_timeout`` seconds after it
opened (or after its last response), and closes new connections at once while ``max_connections``
are open. Bodies that stall are ``graftkit.serve.guard.BodyLimit``'s business.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a connection cap and a header deadline."""

    max_connections = 256
    header_timeout = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.close()  # overloaded: refuse before reading anything
            return
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expire(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()  # headers still incomplete: a slow or idle client

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()  # the request head is in: the body has its own deadline

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection gets the same deadline

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


def guarded_protocol(max_connections: int, header_timeout: float) -> type[GuardedH11Protocol]:
    """A protocol class with these limits, for ``uvicorn.Config(http=...)``."""
    return type("GraftServeProtocol", (GuardedH11Protocol,),
                {"max_connections": max_connections, "header_timeout": header_timeout})
