"""A stand-in for the Hugging Face Hub's file-download endpoints, on 127.0.0.1, for `loopgolf data` tests.

It answers what huggingface_hub's hf_hub_download asks, the way the Hub answers it:

- HEAD/GET {hub}/datasets/{repo}/resolve/{revision}/{path}, revision "main" or the repo's commit:
  - a small (non-LFS) file: 200 with X-Repo-Commit, ETag (the git blob SHA-1) and Content-Length;
  - an LFS file (.bin, .model): 302 to the "CDN" with X-Repo-Commit, X-Linked-Etag (the SHA-256),
    X-Linked-Size and Location. The CDN is a second server on another port, so, as with the Hub's real
    CDN, huggingface_hub takes the metadata from the 302 itself and sends only the GET there;
  - errors carry X-Error-Code as the Hub's do: RepoNotFound, RevisionNotFound, EntryNotFound (404).
- GET {cdn}/blobs/{sha256}: the bytes, honouring `Range: bytes=N-` with 206 and Content-Range.

Faults for tests: `missing` (paths answered 404 though listed), `drop_after` (path -> bytes: the first GET
of that file closes the connection after that many body bytes), `serve_instead` (path -> other bytes).
Every request is recorded in `requests` as (method, path, Range header). The servers run in daemon threads
with short socket timeouts; `stop()` shuts them down.
"""

from __future__ import annotations

import hashlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".bin", ".model")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self, repo_id: str, files: dict[str, bytes]):
        self.repo_id = repo_id
        self.files = dict(files)
        self.missing: set[str] = set()
        self.drop_after: dict[str, int] = {}
        self.serve_instead: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.revisions: list[str] = []  # the revision each resolve request named
        self._lock = threading.Lock()
        self._hub = self._serve(self._hub_handler())
        self._cdn = self._serve(self._cdn_handler())
        self.endpoint = f"http://127.0.0.1:{self._hub.server_address[1]}"
        self.cdn = f"http://127.0.0.1:{self._cdn.server_address[1]}"

    # ------------------------------------------------------------------ bookkeeping

    def content(self, path: str) -> bytes:
        return self.serve_instead.get(path, self.files[path])

    def gets(self) -> list[str]:
        """Paths whose bytes were sent (GETs of the hub's small files and of CDN blobs)."""
        return [p for m, p, _ in self.requests if m == "GET"]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self.revisions.clear()

    def stop(self) -> None:
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()

    def _record(self, method: str, path: str, range_header: str | None) -> None:
        with self._lock:
            self.requests.append((method, path, range_header))

    @staticmethod
    def _serve(handler) -> ThreadingHTTPServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return server

    # ------------------------------------------------------------------ handlers

    def _hub_handler(self):
        hub = self

        class Handler(_Quiet):
            def do_HEAD(self):
                self.resolve(send_body=False)

            def do_GET(self):
                self.resolve(send_body=True)

            def resolve(self, send_body: bool):
                prefix = f"/datasets/{hub.repo_id}/resolve/"
                url = unquote(self.path.split("?", 1)[0])
                if not url.startswith(prefix):
                    return self.error(404, "RepoNotFound")
                revision, _, path = url[len(prefix):].partition("/")
                hub._record(self.command, path, self.headers.get("Range"))
                hub.revisions.append(revision)
                if revision not in ("main", COMMIT):
                    return self.error(404, "RevisionNotFound")
                if path not in hub.files or path in hub.missing:
                    return self.error(404, "EntryNotFound", commit=True)
                data = hub.content(path)
                if path.endswith(LFS_SUFFIXES):
                    sha = hashlib.sha256(data).hexdigest()
                    self.send_response(302)
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("ETag", f'"{git_blob_sha1(sha.encode())}"')  # the pointer file's
                    self.send_header("X-Linked-Etag", f'"{sha}"')
                    self.send_header("X-Linked-Size", str(len(data)))
                    self.send_header("Location", f"{hub.cdn}/blobs/{sha}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{git_blob_sha1(data)}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if send_body:
                    self.wfile.write(data)

            def error(self, status: int, code: str, commit: bool = False):
                body = b'{"error": "not found"}'
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                if commit:
                    self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

        return Handler

    def _cdn_handler(self):
        hub = self

        class Handler(_Quiet):
            def do_GET(self):
                sha = self.path.rsplit("/", 1)[-1]
                path = next((p for p in hub.files if hashlib.sha256(hub.content(p)).hexdigest() == sha), None)
                hub._record("GET", path or self.path, self.headers.get("Range"))
                if path is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = hub.content(path)
                start = 0
                ranged = self.headers.get("Range", "")
                if ranged.startswith("bytes=") and ranged.endswith("-"):
                    start = int(ranged[len("bytes="):-1])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                cut = hub.drop_after.pop(path, None)
                if cut is not None and start == 0:  # the connection dies mid-file, once
                    self.wfile.write(data[:cut])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

        return Handler


class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # a stuck client cannot hold a handler thread for longer

    def log_message(self, *args):  # keep test output clean
        pass
