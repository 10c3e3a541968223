"""The web server against hostile clients, measured: what a 100 MB body, a wrong key with a 30 MB
body, a foreign Host header and 500 slow connections cost it. The server (a tiny random-init
model behind nanochat.server, the limits chat_web uses by default) runs in its own process so its
memory is measured alone (VmHWM, the peak resident set, read from /proc).

    python -m bench.serve_abuse
    python -m bench.serve_abuse --slow 2000 --hold 8

Prints a table and a final JSON line. Times are wall-clock on loopback with the clients in this
process; on a busy machine they are indicative only.
"""

import argparse
import asyncio
import json
import multiprocessing
import socket
import time

KEY = "bench-key"


def serve(queue, args):
    """Child process: build the app, serve it on a free loopback port, report (pid, port)."""
    import logging
    import os

    from bench.serve import build_engine
    from nanochat.server import BackgroundServer, create_app

    logging.getLogger("nanochat.server").setLevel(logging.WARNING)
    engine, tok, _ = build_engine(argparse.Namespace(depth=1, vocab=300, seq_len=256, device="cpu", compile=0))
    app = create_app([engine], tok, model_name="bench", api_key=KEY, max_tokens=8)
    with BackgroundServer(app, max_connections=args.max_connections, header_timeout=args.header_timeout) as server:
        queue.put((os.getpid(), server.port))
        while True:
            time.sleep(1)


def memory_kb(pid, field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


def send_body(port, head, body, chunked=False):
    """Send head + body as fast as the server takes it; stop at its answer.
    -> (status line, ms from the first byte to the answer, bytes of the body sent)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.setblocking(False)
    t = time.perf_counter()
    pending, sent, answer, can_send = head, 0, b"", True
    view = memoryview(body)
    while time.perf_counter() - t < 60:
        try:
            chunk = s.recv(65536)
            answer += chunk
            if b"\r\n" in answer or not chunk:
                break
        except BlockingIOError:
            pass
        except OSError:  # reset by the server
            break
        if can_send and not pending and sent < len(body):
            piece = view[sent:sent + 65536]
            pending = (b"%x\r\n" % len(piece) + bytes(piece) + b"\r\n") if chunked else bytes(piece)
            sent += len(piece)
        if can_send and pending:
            try:
                pending = pending[s.send(pending):]
            except BlockingIOError:
                time.sleep(0.0005)
            except OSError:  # the server closed its side: its answer may still be readable
                can_send = False
        else:
            time.sleep(0.0005)
    ms = (time.perf_counter() - t) * 1000
    s.close()
    return answer.split(b"\r\n")[0].decode(errors="replace"), ms, sent


def get(port, path, headers=""):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{headers}\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head = data.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    return head[0], {line.split(": ")[0].lower(): line.split(": ", 1)[1] for line in head[1:]}


async def slow_load(port, slow, hold):
    """`slow` connections trickling request heads while /health is polled -> latencies (s)."""
    opened, stop = [], asyncio.Event()

    async def slow_client():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        opened.append(1)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        try:
            while not stop.is_set():
                writer.write(b"X-Slow: 1\r\n")
                try:
                    if await asyncio.wait_for(reader.read(1), 1.0) == b"":
                        return
                except asyncio.TimeoutError:
                    pass
        except OSError:
            pass
        finally:
            writer.close()

    async def health():
        t = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        return time.perf_counter() - t if data.startswith(b"HTTP/1.1 200") else float("inf")

    tasks = [asyncio.create_task(slow_client()) for _ in range(slow)]
    while len(opened) < slow and not all(t.done() for t in tasks):
        await asyncio.sleep(0.05)
    times, end = [], time.monotonic() + hold
    while time.monotonic() < end:
        times.append(await health())
        await asyncio.sleep(0.03)
    held = sum(not t.done() for t in tasks)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    return times, held


def p99(xs):
    xs = sorted(xs)
    return xs[int(0.99 * (len(xs) - 1))]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slow", type=int, default=500, help="slow connections held open during the /health probe")
    p.add_argument("--hold", type=float, default=5.0, help="seconds of /health polling while they are held")
    p.add_argument("--max-connections", type=int, default=1000)
    p.add_argument("--header-timeout", type=float, default=10.0)
    args = p.parse_args(argv)
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < args.slow + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.slow + 256), hard))

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=serve, args=(queue, args), daemon=True)
    child.start()
    pid, port = queue.get(timeout=120)
    results = {}
    try:
        auth = f"Authorization: Bearer {KEY}\r\n"
        for name, size, key, chunked in [("100 MB body", 100 * 2**20, auth, False),
                                         ("100 MB chunked body", 100 * 2**20, auth, True),
                                         ("wrong key + 30 MB body", 30 * 2**20, "Authorization: Bearer wrong\r\n", False)]:
            body = b'{"messages": [' + b'{"role": "user", "content": "x"},' * (size // 33)
            framing = "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {len(body)}\r\n"
            head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    f"{framing}{key}\r\n").encode()
            hwm = memory_kb(pid, "VmHWM")
            status, ms, sent = send_body(port, head, body, chunked)
            results[name] = {"status": status, "ms": round(ms, 1), "body_bytes_sent": sent,
                             "server_peak_rss_growth_mb": round((memory_kb(pid, "VmHWM") - hwm) / 1024, 2)}
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
            results["Host: evil.example"] = {"status": s.recv(65536).split(b"\r\n")[0].decode()}
        wanted = ("x-content-type-options", "content-security-policy", "referrer-policy")
        headers = {}
        for path in ("/", "/static/app.js", "/static/style.css", "/logo.svg", "/health", "/v1/models", "/nope"):
            status, h = get(port, path, auth)
            headers[path] = {"status": status.split()[1], "security_headers": all(k in h for k in wanted)}
        results["security headers"] = headers
        times, held = asyncio.run(slow_load(port, args.slow, args.hold))
        after, _ = asyncio.run(slow_load(port, 0, 1.0))
        results["slow connections"] = {"held_open": held, "health_polls": len(times),
                                       "health_p99_ms": round(p99(times) * 1000, 1),
                                       "health_max_ms": round(max(times) * 1000, 1),
                                       "after_p99_ms": round(p99(after) * 1000, 1)}
    finally:
        child.kill()
    print(f"\nserve abuse bench (server pid {pid}, max_connections {args.max_connections}, "
          f"header_timeout {args.header_timeout:g} s)")
    for name in ("100 MB body", "100 MB chunked body", "wrong key + 30 MB body"):
        r = results[name]
        print(f"{name:24s} {r['status']:40s} {r['ms']:8.1f} ms  server peak RSS +{r['server_peak_rss_growth_mb']:.1f} MB"
              f"  ({r['body_bytes_sent'] / 2**20:.1f} MB of the body sent before the answer)")
    print(f"{'Host: evil.example':24s} {results['Host: evil.example']['status']}")
    print("security headers on:", ", ".join(f"{k} ({v['status']})" for k, v in headers.items() if v["security_headers"]))
    s = results["slow connections"]
    print(f"/health with {s['held_open']} slow connections open: p99 {s['health_p99_ms']} ms, max {s['health_max_ms']} ms "
          f"over {s['health_polls']} polls; after they left: p99 {s['after_p99_ms']} ms")
    print(json.dumps({"bench": "serve_abuse", "config": vars(args), "results": results}))


if __name__ == "__main__":
    main()
