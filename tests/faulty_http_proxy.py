"""An HTTP proxy in front of a real DICOMweb server that breaks chosen WADO-RS responses mid-body (test helper).

    python faulty_http_proxy.py PORT UPSTREAM_URL [ONCE_UID ...] [--always UID ...]

Every request is forwarded to UPSTREAM_URL and logged on stdout as ``GET <path> <accept>``. A WADO-RS response
(Accept multipart/related) whose path names a ``ONCE_UID`` is cut the first time only, one named after ``--always``
every time: the status line and headers (with the full Content-Length) are sent, then the body up to the middle of
its second part (of its only part), then the connection is closed, as a server or network failing mid-retrieve would.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    port, upstream = int(sys.argv[1]), sys.argv[2].rstrip("/")
    rest = sys.argv[3:]
    split = rest.index("--always") if "--always" in rest else len(rest)
    once, always = set(rest[:split]), set(rest[split + 1:])
    cut_already: set[str] = set()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            accept = self.headers.get("Accept", "")
            print(f"GET {self.path} {accept}", flush=True)
            request = urllib.request.Request(upstream + self.path, headers={"Accept": accept})
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    status, headers, body = response.status, response.headers, response.read()
            except urllib.error.HTTPError as exc:
                status, headers, body = exc.code, exc.headers, exc.read()
            named = [uid for uid in once | always if uid in self.path]
            cut = "multipart/related" in accept and any(
                uid in always or uid not in cut_already for uid in named)
            cut_already.update(named)
            self.send_response(status)
            self.send_header("Content-Type", headers.get("Content-Type", "application/octet-stream"))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not cut:
                self.wfile.write(body)
                return
            boundary = body[: body.index(b"\r\n")] if body.startswith(b"--") else body[:40]
            second = body.find(boundary, len(boundary))
            third = body.find(boundary, second + len(boundary)) if second > 0 else -1
            # Halfway through the second part: the first arrives whole. One part only: cut it in the middle.
            end = (second + third) // 2 if third > 0 else len(body) // 2
            self.wfile.write(body[:end])
            self.wfile.flush()
            print(f"CUT {self.path} after {end} of {len(body)} bytes", flush=True)
            self.close_connection = True

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"proxy listening on {port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
