"""Connection-level limits under a real uvicorn on loopback (nanochat.server.run): oversized and
unauthorized bodies answered from the headers alone, request heads and bodies that arrive too
slowly, the connection cap, and a load test: 500 slow connections held open while /health is
polled. Every socket operation has a timeout, so each test is bounded in time."""

import asyncio
import json
import resource
import socket
import time

import pytest
from server_fakes import FakeEngine, tiny_tokenizer

from nanochat.server import BackgroundServer, create_app
from nanochat.server.run import FD_RESERVE, connection_limit


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def connect(server, timeout=10):
    s = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    return s


def read_response(sock):
    """-> (status line, headers dict, body) of one response on `sock`, reading until it is complete."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    headers = {k.lower(): v for k, v in headers.items()}
    length = int(headers.get("content-length", 0))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return lines[0], headers, body


def closed_by_server(sock, within):
    """True if the server closes `sock` within `within` seconds (EOF or reset)."""
    sock.settimeout(within)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def post_head(length, extra=""):
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n{extra}\r\n").encode()


# -----------------------------------------------------------------------------
# Answered from the headers: the body is never read


def test_oversized_body_and_wrong_key_answered_from_the_headers(tok):
    """Only the request head is sent (the body never is): the server answers at once, which it
    could not do if it waited for the body, and closes the connection rather than read it."""
    engine = FakeEngine(tok)
    with BackgroundServer(create_app([engine], tok, api_key="k")) as server:
        cases = [(post_head(100 * 2**20, "Authorization: Bearer k\r\n"), "413", "request_too_large"),
                 (post_head(30 * 2**20, "Authorization: Bearer wrong\r\n"), "401", "invalid_api_key"),
                 (post_head(30 * 2**20), "401", "invalid_api_key")]
        for head, status, code in cases:
            with connect(server) as s:
                s.sendall(head)
                line, headers, body = read_response(s)
                assert line.split()[1] == status and json.loads(body)["error"]["code"] == code
                assert headers["connection"] == "close" and headers["x-content-type-options"] == "nosniff"
                assert closed_by_server(s, 5)
        # a chunked body is cut off as soon as it passes the limit, not when it ends
        with connect(server) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer k\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n")
            for _ in range(20):
                s.sendall(b"10000\r\n" + b" " * 0x10000 + b"\r\n")  # 20 x 64 KiB, never terminated
            line, headers, body = read_response(s)
            assert line.split()[1] == "413" and headers["connection"] == "close"
    assert engine.calls == []


# -----------------------------------------------------------------------------
# Slow clients


def test_slow_request_head_is_closed(tok):
    app = create_app([FakeEngine(tok)], tok)
    with BackgroundServer(app, header_timeout=1.0) as server:
        # trickling a head, a byte at a time: closed about header_timeout after connecting
        with connect(server) as s:
            t = time.monotonic()
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            closed = False
            for _ in range(40):
                try:
                    s.sendall(b"X")
                except OSError:
                    closed = True
                    break
                s.settimeout(0.25)
                try:
                    if s.recv(1) == b"":
                        closed = True
                        break
                except TimeoutError:
                    pass
            assert closed and 0.9 < time.monotonic() - t < 8
        # a connection that sends nothing at all
        with connect(server) as s:
            assert closed_by_server(s, 8)
        # the deadline runs again for the next head on a kept-alive connection
        with connect(server) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            line, _, body = read_response(s)
            assert line.split()[1] == "200" and json.loads(body)["status"] == "ok"
            s.sendall(b"GET /health HTTP/1.1\r\n")
            assert closed_by_server(s, 8)
        # a prompt client is unaffected
        with connect(server) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert read_response(s)[0].split()[1] == "200"


def test_slow_body_is_408(tok):
    engine = FakeEngine(tok)
    app = create_app([engine], tok, body_timeout=1.0)
    with BackgroundServer(app) as server:
        with connect(server) as s:
            t = time.monotonic()
            s.sendall(post_head(100) + b'{"messages": ')  # 13 of the 100 bytes, then nothing
            line, headers, body = read_response(s)
            assert line.split()[1] == "408" and json.loads(body)["error"]["code"] == "request_timeout"
            assert 0.9 < time.monotonic() - t < 8 and headers["connection"] == "close"
            assert closed_by_server(s, 5)
    assert engine.calls == []


def test_connection_cap_refuses_at_connect_and_recovers(tok):
    app = create_app([FakeEngine(tok)], tok)
    with BackgroundServer(app, max_connections=6, header_timeout=30) as server:
        idle = [connect(server) for _ in range(5)]  # the cap counts the connection being made: 5 fit
        time.sleep(0.2)
        with connect(server) as s:  # refused at once, before it sends anything
            s.settimeout(5)
            line, headers, _ = read_response(s)
            assert line.split()[1] == "503" and headers["connection"] == "close"
            assert closed_by_server(s, 5)
        for s in idle:
            s.close()
        deadline = time.monotonic() + 10
        while True:  # the server notices the closed sockets within a moment
            with connect(server) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                status = read_response(s)[0].split()[1]
            if status == "200" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert status == "200"


def test_connection_cap_fits_the_open_file_limit(monkeypatch):
    from nanochat.server import run

    monkeypatch.setattr(run.resource, "getrlimit", lambda what: (512, 4096))
    assert connection_limit(1000) == 512 - FD_RESERVE and connection_limit(100) == 100
    monkeypatch.setattr(run.resource, "getrlimit", lambda what: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert connection_limit(1000) == 1000


# -----------------------------------------------------------------------------
# Load: 500 slow connections and the health probe


SLOW = 500


def raise_fd_limit(needed):
    """Each loopback connection costs two descriptors here (client and server in one process)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"the open-file hard limit ({hard}) is below the {needed} this test needs")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return soft, hard


def test_health_stays_fast_under_500_slow_connections(tok):
    """500 clients trickle request heads (a header line a second, never finishing) while /health
    is polled on fresh connections: p99 under 500 ms. The server then closes the slow ones at the
    header deadline and /health is as fast as before."""
    soft, hard = raise_fd_limit(2 * SLOW + 1024)
    header_timeout = 6.0
    app = create_app([FakeEngine(tok)], tok)

    async def health(port):
        t = time.perf_counter()
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert data.startswith(b"HTTP/1.1 200"), data[:100]
        return time.perf_counter() - t

    async def poll(port, seconds):
        times, end = [], time.monotonic() + seconds
        while time.monotonic() < end:
            times.append(await health(port))
            await asyncio.sleep(0.03)
        return times

    async def slow_client(port, opened, stop):
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 20)
        opened.append(1)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        t = time.monotonic()
        try:
            while not stop.is_set():
                writer.write(b"X-Slow: 1\r\n")
                try:  # the server's answer to a slow head is to close the connection
                    if await asyncio.wait_for(reader.read(1), 1.0) == b"":
                        return time.monotonic() - t
                except asyncio.TimeoutError:
                    pass
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - t
        finally:
            writer.close()
        return None

    async def run(port):
        before = await poll(port, 1.0)
        opened, stop = [], asyncio.Event()
        slow = [asyncio.create_task(slow_client(port, opened, stop)) for _ in range(SLOW)]
        while len(opened) < SLOW:
            await asyncio.sleep(0.05)
        during = await poll(port, 3.0)  # all 500 are open and trickling
        held = sum(not t.done() for t in slow)
        closed_after = await asyncio.wait_for(asyncio.gather(*slow), header_timeout + 20)
        stop.set()
        after = await poll(port, 1.0)
        return before, during, held, closed_after, after

    try:
        with BackgroundServer(app, header_timeout=header_timeout) as server:
            before, during, held, closed_after, after = asyncio.run(run(server.port))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    p99 = sorted(during)[int(0.99 * (len(during) - 1))]
    print(f"/health p99 {p99 * 1000:.1f} ms over {len(during)} polls with {held} slow connections open "
          f"(before: max {max(before) * 1000:.1f} ms; after: max {max(after) * 1000:.1f} ms)")
    assert held == SLOW  # they really were held open while polling
    assert len(during) >= 20 and p99 < 0.5
    assert all(t is not None and t < header_timeout + 10 for t in closed_after)  # closed by the server
    assert len(after) >= 10 and max(after) < 0.5
