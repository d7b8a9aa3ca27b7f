"""serving.connections over a real uvicorn on loopback: slow clients are disconnected at their
deadline, the connection cap sheds waiting connections first, and real clients are served."""

import asyncio
import contextlib
import json
import socket
import time

import httpx
import portpicker
import uvicorn

from conftest import body_length_app, run_in_thread
from serving.connections import ConnectionLimits, guarded_protocol

PARTIAL_HEADERS = b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


async def app(scope, receive, send):
  """/sleep answers after 1 s; any other path answers with its body's length."""
  if scope["type"] != "http":
    return
  if scope["path"] == "/sleep":
    await asyncio.sleep(1)
  await body_length_app(scope, receive, send)


@contextlib.contextmanager
def serving(limits: ConnectionLimits):
  port = portpicker.pick_unused_port()
  server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="error",
                                         http=guarded_protocol(limits)))
  thread = run_in_thread(server)
  try:
    yield port
  finally:
    server.should_exit = True
    thread.join(timeout=10)


def slow_clients(port: int, count: int, request: bytes = PARTIAL_HEADERS) -> list[socket.socket]:
  clients = []
  for _ in range(count):
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(request)
    clients.append(client)
  return clients


def closed_by_server(client: socket.socket, wait_s: float) -> bool:
  """Whether the server closed `client` within `wait_s` (whatever it answered first)."""
  client.settimeout(wait_s)
  try:
    while client.recv(65536):
      pass
    return True
  except ConnectionResetError:
    return True
  except TimeoutError:
    return False
  finally:
    client.close()


def real_request(port: int, body: bytes = b"hello") -> httpx.Response:
  return httpx.post(f"http://127.0.0.1:{port}/echo", content=body, timeout=5)


def still_open(client: socket.socket) -> bool:
  """Whether the server has neither answered nor closed `client` yet (reads nothing)."""
  client.setblocking(False)
  try:
    client.recv(1, socket.MSG_PEEK)  # b"" when closed, bytes when answered
    return False
  except BlockingIOError:
    return True
  except ConnectionResetError:
    return False
  finally:
    client.setblocking(True)


def test_a_slowloris_is_shed_while_a_real_client_is_served():
  with serving(ConnectionLimits(max_connections=1000, header_timeout_s=2.0)) as port:
    started = time.monotonic()
    slow = slow_clients(port, 300)
    response = real_request(port)
    assert response.status_code == 200 and response.text == "5"
    assert still_open(slow[0]), "the real client was served only after the slow ones were shed"
    closed = [closed_by_server(client, wait_s=4.0) for client in slow]
    assert all(closed), f"{closed.count(False)} of 300 slow clients still open"
    assert time.monotonic() - started < 6.0


def test_at_the_connection_cap_the_oldest_waiting_connection_makes_room():
  with serving(ConnectionLimits(max_connections=50, header_timeout_s=30.0)) as port:
    slow = slow_clients(port, 120)
    assert real_request(port).text == "5"
    time.sleep(0.3)
    closed = [closed_by_server(client, wait_s=0.01) for client in slow]
    assert all(closed[:70]), "the oldest waiting connections were kept"
    assert not any(closed[-40:]), "the newest waiting connections were dropped"


def test_a_body_sent_too_slowly_is_cut_off():
  with serving(ConnectionLimits(header_timeout_s=30.0, body_timeout_s=0.5)) as port:
    started = time.monotonic()
    slow = slow_clients(port, 20, b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nab")
    assert all(closed_by_server(client, wait_s=3.0) for client in slow)
    assert time.monotonic() - started < 2.0
    assert real_request(port, b"x" * 10).text == "10"


def test_a_kept_alive_connection_must_finish_its_next_request_in_time():
  with serving(ConnectionLimits(header_timeout_s=0.5)) as port:
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n")
    assert client.recv(65536).startswith(b"HTTP/1.1 200")
    client.sendall(PARTIAL_HEADERS)  # uvicorn's keep-alive timer stops at the first byte
    started = time.monotonic()
    assert closed_by_server(client, wait_s=3.0)
    assert time.monotonic() - started < 1.5


def test_when_every_connection_runs_a_request_a_new_one_is_told_503():
  with serving(ConnectionLimits(max_connections=2)) as port:
    busy = slow_clients(port, 2, b"GET /sleep HTTP/1.1\r\nHost: a\r\n\r\n")
    time.sleep(0.2)
    refused = socket.create_connection(("127.0.0.1", port))
    refused.settimeout(3)
    answer = b""
    while chunk := refused.recv(65536):
      answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503")
    assert "--max_connections" in json.loads(body)["error"]["message"]
    for client in busy:
      client.settimeout(3)
      assert client.recv(65536).startswith(b"HTTP/1.1 200")
      client.close()
