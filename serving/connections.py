"""Connection limits uvicorn lacks: how long a client may take to send a request, and how many
connections may be open at once.

uvicorn's `timeout_keep_alive` only runs between requests: a client that opens a connection and
sends half its headers (slowloris) is held forever, and `limit_concurrency` answers 503 only once
headers are complete, so such connections pile up until the file descriptors run out and new
clients are dropped. `guarded_protocol` subclasses uvicorn's httptools protocol (the one
`uvicorn[standard]` runs) with a deadline per request and a cap on connections:

- headers must be complete within `header_timeout_s` of the connection opening or of the last
  response ending (a kept-alive connection's next request); the body within `body_timeout_s` of
  the headers. A client past its deadline is disconnected.
- at `max_connections`, a new connection first evicts the oldest one still waiting for headers
  (slow or idle, with no request running); a real client sends its headers at once, so slow ones
  are shed while real ones are served. When every connection runs a request, the new one is
  answered 503 and closed.
"""

import dataclasses
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


@dataclasses.dataclass(frozen=True)
class ConnectionLimits:
  max_connections: int = 1024
  header_timeout_s: float = 10.0
  body_timeout_s: float = 60.0


def busy_response() -> bytes:
  body = json.dumps({"error": {
      "message": "the server is at its connection limit (--max_connections); retry shortly",
      "type": "server_error", "param": None, "code": "service_unavailable"}}).encode()
  return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
          b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))


def guarded_protocol(limits: ConnectionLimits) -> type[HttpToolsProtocol]:
  """A protocol class for `uvicorn.Config(http=...)`, sharing one `limits` and one waiting line
  among the connections of one server."""
  # Connections waiting for headers, oldest first (a dict keeps insertion order).
  waiting: dict[HttpToolsProtocol, None] = {}

  class GuardedProtocol(HttpToolsProtocol):
    deadline = None

    def connection_made(self, transport):
      super().connection_made(transport)
      if len(self.connections) > limits.max_connections:
        if not waiting:
          transport.write(busy_response())
          transport.close()
          return
        oldest = next(iter(waiting))
        oldest.disarm()
        oldest.transport.close()
      self.await_headers()

    def connection_lost(self, exc):
      self.disarm()
      super().connection_lost(exc)

    def on_headers_complete(self):
      super().on_headers_complete()
      self.arm(limits.body_timeout_s)

    def on_message_complete(self):
      super().on_message_complete()
      self.disarm()

    def on_response_complete(self):
      super().on_response_complete()
      if not self.transport.is_closing() and self.cycle.response_complete:
        self.await_headers()

    def await_headers(self):
      self.arm(limits.header_timeout_s)
      waiting[self] = None

    def arm(self, timeout_s: float):
      self.disarm()
      self.deadline = self.loop.call_later(timeout_s, self.transport.close)

    def disarm(self):
      waiting.pop(self, None)
      if self.deadline is not None:
        self.deadline.cancel()
        self.deadline = None

  return GuardedProtocol
