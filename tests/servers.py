"""Real servers for the remote-shard tests, on 127.0.0.1 only, stopped by the tests that start them.

- `Nginx`: Debian's nginx serving a folder over HTTP (with range requests), its access log recording
  every request's URI, status and body bytes (what a test counts fetches with). Stoppable and
  restartable on the same port, for an outage mid-epoch.
- `MotoS3`: moto's standalone S3 server (`moto[server]`), as s3fs's own tests use it.
- `FaultyProxy`: HTTP in front of another server that answers 503, or cuts the connection mid-body, for
  the requests a test chooses.
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from conftest import kill_tagged, started

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout} s")


class Server:
    """A server process that can be stopped and started again on the same port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._context: contextlib.ExitStack | None = None
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        self._context = contextlib.ExitStack()
        self.process = self._context.enter_context(
            started(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
        wait_for_port(self.port, self.process, type(self).__name__)

    def stop(self) -> None:
        if self._context is not None:
            kill_tagged(self.process.tag)
            self._context.close()
            self._context = None

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class Nginx(Server):
    def __init__(self, root: Path, work: Path) -> None:
        super().__init__(free_port())
        self.root, self.work = root, work
        work.mkdir(parents=True, exist_ok=True)
        self.access_log = work / "access.log"
        temp = work / "temp"
        temp.mkdir(exist_ok=True)
        (work / "nginx.conf").write_text(
            f"""daemon off;
master_process off;
pid {work}/nginx.pid;
error_log {work}/error.log;
events {{ worker_connections 256; }}
http {{
    log_format fetches '$request_method $uri $status $body_bytes_sent';
    access_log {self.access_log} fetches;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    server {{
        listen 127.0.0.1:{self.port};
        root {root};
        location /forbidden/ {{ deny all; }}
    }}
}}
"""
        )

    def command(self) -> list[str]:
        return [NGINX, "-c", str(self.work / "nginx.conf"), "-p", str(self.work)]

    def requests(self) -> list[tuple[str, str, int, int]]:
        """(method, path, status, body bytes) of every request so far."""
        if not self.access_log.exists():
            return []
        found = []
        for line in self.access_log.read_text().splitlines():
            method, path, status, sent = line.split(" ")
            found.append((method, path, int(status), int(sent)))
        return found


class MotoS3(Server):
    def __init__(self) -> None:
        super().__init__(free_port())

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def environment(self) -> dict[str, str]:
        """What a process needs to reach this server with the store's own tools (no file written)."""
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.url,
        }


def moto_available() -> bool:
    with contextlib.suppress(ImportError):
        import moto.server  # noqa: F401

        return True
    return False


# what a FaultyProxy does with one request: None (forward it), "503", "429" or "404", "cut" (half the body,
# then close), "corrupt" (one byte of the body changed), "trickle" (the right headers, then a byte every
# 0.2 s), "gzip-bomb" (Content-Encoding: gzip, 16 KB on the wire for 16 MB inflated), "oversize" (206 with
# the whole file and 1 MB more, whatever the range asked), or "redirect:URL" (302 to URL + the path)
Fault = Callable[[str, str, int], str | None]  # (method, path, how many such requests came before)


class FaultyProxy(Server):
    """Forwards GET and HEAD (with their Range header) to `upstream`; `fault` picks the ones to fail."""

    def __init__(self, upstream_port: int, fault: Fault) -> None:
        super().__init__(free_port())
        self.upstream_port, self.fault = upstream_port, fault
        self.seen: dict[tuple[str, str], int] = {}
        self.faults: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self.forward("HEAD")

            def do_GET(self) -> None:
                self.forward("GET")

            def forward(self, method: str) -> None:
                with proxy.lock:
                    asked = proxy.seen.get((method, self.path), 0)
                    proxy.seen[(method, self.path)] = asked + 1
                    fault = proxy.fault(method, self.path, asked)
                    if fault:
                        proxy.faults.append((fault, self.path))
                if fault in ("503", "429", "404"):
                    self.send_response(int(fault))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if fault and fault.startswith("redirect:"):
                    self.send_response(302)
                    self.send_header("Location", fault.removeprefix("redirect:") + self.path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if fault == "gzip-bomb" and method == "GET":
                    self.answer(206, gzip.compress(bytes(16 * 2**20)), {"Content-Encoding": "gzip"})
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
                # the range (unless the fault ignores it) and what S3 requests are signed with
                headers = {
                    key: value
                    for key, value in self.headers.items()
                    if (key.lower() == "range" and fault != "oversize")
                    or key.lower() == "authorization"
                    or key.lower().startswith("x-amz-")
                }
                upstream.request(method, self.path, headers=headers)
                answer = upstream.getresponse()
                body = answer.read()
                upstream.close()
                if fault == "corrupt" and body:
                    body = bytes([body[0] ^ 1]) + body[1:]
                if fault == "oversize" and method == "GET":
                    self.answer(206, body + bytes(2**20), {})
                    return
                if fault == "trickle" and method == "GET":
                    self.send_response(answer.status)
                    for key, value in answer.getheaders():
                        if key.lower() not in ("connection", "keep-alive", "transfer-encoding"):
                            self.send_header(key, value)
                    self.end_headers()
                    with contextlib.suppress(OSError):  # the client gave up: the connection is gone
                        for byte in body:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            time.sleep(0.2)
                    self.close_connection = True
                    return
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("connection", "keep-alive", "transfer-encoding"):
                        self.send_header(key, value)
                self.end_headers()
                if fault == "cut" and method == "GET":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if method == "GET":
                    self.wfile.write(body)

            def answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(key, value)
                self.end_headers()
                with contextlib.suppress(OSError):
                    self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
