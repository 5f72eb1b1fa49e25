"""uvicorn's h11 protocol with read deadlines: a connection that stalls while sending a request is closed.

uvicorn closes an *idle* keep-alive connection after ``timeout_keep_alive``, but a client that opens a connection
and sends nothing, half a header block, or half a body holds it (and a ``max_connections`` slot) forever. This
subclass arms one timer per phase of a request:

- headers: from the connection's start (or the end of the previous response) until the request's headers are
  complete: ``[server] header_timeout_s``;
- body: from the headers until the body is complete: ``[server] body_timeout_s``.

When a timer fires in its phase the connection is closed (the app sees a disconnect). Build the class with
:func:`guarded_h11_protocol` and pass it as uvicorn's ``http``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)


class GuardedH11Protocol(H11Protocol):
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        """(Re)arm the timer for the phase the client is in now."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        state = self.conn.their_state
        if state is h11.IDLE:
            self._deadline = self.loop.call_later(self.header_timeout_s, self._expire, state, "headers",
                                                  self.header_timeout_s)
        elif state is h11.SEND_BODY:
            self._deadline = self.loop.call_later(self.body_timeout_s, self._expire, state, "body",
                                                  self.body_timeout_s)

    def _expire(self, state: Any, phase: str, seconds: float) -> None:
        self._deadline = None
        if self.conn.their_state is state and not self.transport.is_closing():
            logger.info("closing a connection from %s: the request %s did not arrive within %gs",
                        self.client, phase, seconds)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        before = self.conn.their_state
        super().data_received(data)
        if self.conn.their_state is not before:
            self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)


def guarded_h11_protocol(header_timeout_s: float, body_timeout_s: float) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` subclass with these deadlines."""
    return type("ConfiguredH11Protocol", (GuardedH11Protocol,),
                {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s})
