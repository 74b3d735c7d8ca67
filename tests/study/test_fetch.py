"""study/fetch.py against a real HTTP server on 127.0.0.1: a good file arrives verified, and every failure (wrong
bytes, a cut connection, 404, nothing listening, a missing sha256) is one StageError that leaves no file behind and
an existing destination untouched. Also local file/directory sources."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from study.errors import StageError
from study.fetch import download, fetch, sha256_file

GOOD = hashlib.sha256(b"seed").digest() * 40_000  # 1.28 MB: more than one read chunk (1 MiB)
GOOD_SHA = hashlib.sha256(GOOD).hexdigest()
CORRUPT = bytes(b ^ 0x5A for b in GOOD)  # same length, wrong bytes
OLD = b"the model that was here before\n"


class _Handler(http.server.BaseHTTPRequestHandler):
    requests: list[str]  # set per server

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.requests.append(self.path)
        if self.path in ("/good.bin", "/corrupt.bin"):
            body = GOOD if self.path == "/good.bin" else CORRUPT
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/drip.bin":
            # A byte every 0.2 s: each read succeeds long before its timeout; only an overall deadline ends it.
            self.send_response(200)
            self.send_header("Content-Length", str(len(GOOD)))
            self.end_headers()
            with contextlib.suppress(OSError):
                for i in range(50):
                    self.wfile.write(GOOD[i : i + 1])
                    self.wfile.flush()
                    time.sleep(0.2)
        elif self.path == "/huge.bin":
            self.send_response(200)
            self.send_header("Content-Length", str(len(GOOD)))
            self.end_headers()
            with contextlib.suppress(OSError):
                self.wfile.write(GOOD)
        elif self.path == "/truncated.bin":
            # Promise the whole file, send a third of it, then hang up.
            self.send_response(200)
            self.send_header("Content-Length", str(len(GOOD)))
            self.end_headers()
            self.wfile.write(GOOD[: len(GOOD) // 3])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        else:
            self.send_error(404, "Not Found")

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture(scope="module")
def server():
    """``(base_url, requests)``: a ThreadingHTTPServer on a free port of 127.0.0.1, served from a daemon thread."""
    requests: list[str] = []
    handler = type("Handler", (_Handler,), {"requests": requests})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", requests
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    """urllib honours *_proxy variables; these tests talk to 127.0.0.1 directly."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (a port just bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/model.safetensors"


def listing(folder: Path) -> list[str]:
    """Every entry of ``folder``, hidden ones (``.model.bin.part-*``) included."""
    return sorted(os.listdir(folder)) if folder.exists() else []


# --------------------------------------------------------------------------------------------------------------
# Downloads.


def test_good_download_arrives_verified(server, tmp_path):
    base, _ = server
    dest = tmp_path / "new" / "dir" / "model.bin"  # parents are created
    assert download(f"{base}/good.bin", GOOD_SHA, dest) == dest
    assert dest.read_bytes() == GOOD and sha256_file(dest) == GOOD_SHA
    assert listing(dest.parent) == ["model.bin"]  # no .part leftovers


def test_fetch_routes_urls_to_download_and_normalises_the_sha256(server, tmp_path):
    base, _ = server
    dest = tmp_path / "model.bin"
    dest.write_bytes(OLD)  # a successful download replaces an existing file
    assert fetch(f"{base}/good.bin", f"  {GOOD_SHA.upper()}\n", dest) == dest
    assert dest.read_bytes() == GOOD
    assert listing(tmp_path) == ["model.bin"]


def test_a_slow_download_is_stopped_by_the_overall_deadline(server, tmp_path):
    base, _ = server
    start = time.monotonic()
    with pytest.raises(StageError, match=r"drip.bin: not complete after 1 s \(\d+ bytes\); the partial file was deleted"):
        download(f"{base}/drip.bin", GOOD_SHA, tmp_path / "m.bin", timeout=5, deadline_s=1.0)
    assert time.monotonic() - start < 4
    assert listing(tmp_path) == []


def test_a_download_larger_than_the_limit_is_refused(server, tmp_path):
    base, _ = server
    with pytest.raises(StageError, match=rf"huge.bin: {len(GOOD)} bytes announced, more than the 1000-byte limit"):
        download(f"{base}/huge.bin", GOOD_SHA, tmp_path / "m.bin", max_bytes=1000)
    assert listing(tmp_path) == []


def test_credentials_in_a_download_url_are_never_echoed(tmp_path):
    url = closed_port_url().replace("http://", "http://alice:s3cret@")
    with pytest.raises(StageError) as e:
        download(url, GOOD_SHA, tmp_path / "m.bin")
    assert "s3cret" not in str(e.value) and "alice" not in str(e.value) and "***@127.0.0.1" in str(e.value)


def test_corrupted_download_is_deleted(server, tmp_path):
    base, _ = server
    url, dest = f"{base}/corrupt.bin", tmp_path / "model.bin"
    with pytest.raises(StageError, match="sha256 mismatch") as e:
        download(url, GOOD_SHA, dest)
    msg = str(e.value)
    assert url in msg and GOOD_SHA in msg and hashlib.sha256(CORRUPT).hexdigest() in msg
    assert "\n" not in msg
    assert not dest.exists() and listing(tmp_path) == []


def test_truncated_download_is_deleted(server, tmp_path):
    base, _ = server
    url, dest = f"{base}/truncated.bin", tmp_path / "model.bin"
    with pytest.raises(StageError) as e:
        download(url, GOOD_SHA, dest, timeout=10)
    msg = str(e.value)
    assert url in msg and ("truncated" in msg or "download failed" in msg), msg
    assert "\n" not in msg
    assert not dest.exists() and listing(tmp_path) == []


@pytest.mark.parametrize("kind", ["404", "unreachable", "malformed"])
def test_unavailable_url_names_the_url(server, tmp_path, kind):
    base, _ = server
    url = {"404": f"{base}/missing.bin", "unreachable": closed_port_url(), "malformed": "http://[::1/model.bin"}[kind]
    dest = tmp_path / "model.bin"
    with pytest.raises(StageError, match="download failed") as e:
        fetch(url, GOOD_SHA, dest)
    assert url in str(e.value) and "\n" not in str(e.value)
    if kind == "404":
        assert "Not Found" in str(e.value)
    assert listing(tmp_path) == []


@pytest.mark.parametrize("sha256", ["", "   ", "abc123", "z" * 64, GOOD_SHA[:-1], GOOD_SHA + "0", "sha256:" + GOOD_SHA])
def test_missing_or_malformed_sha256_fails_before_any_request(server, tmp_path, sha256):
    base, requests = server
    before = len(requests)
    url, dest = f"{base}/good.bin", tmp_path / "sub" / "model.bin"
    for call in (lambda: download(url, sha256, dest), lambda: fetch(url, sha256, dest)):
        with pytest.raises(StageError, match="sha256") as e:
            call()
        assert url in str(e.value)
    assert len(requests) == before  # the server never saw a request
    assert not dest.parent.exists()  # nothing created either


@pytest.mark.parametrize("path", ["/corrupt.bin", "/truncated.bin", "/missing.bin", "unreachable"])
def test_failed_download_leaves_an_existing_dest_untouched(server, tmp_path, path):
    base, _ = server
    url = closed_port_url() if path == "unreachable" else base + path
    dest = tmp_path / "model.bin"
    dest.write_bytes(OLD)
    os.utime(dest, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    stat = dest.stat()
    with pytest.raises(StageError):
        download(url, GOOD_SHA, dest, timeout=10)
    assert dest.read_bytes() == OLD
    assert (dest.stat().st_mtime_ns, dest.stat().st_ino) == (stat.st_mtime_ns, stat.st_ino)
    assert listing(tmp_path) == ["model.bin"]


# --------------------------------------------------------------------------------------------------------------
# Local sources.


def test_local_file_and_directory_sources(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes(GOOD)
    out = tmp_path / "out"
    # A file, with and without its sha256.
    assert fetch(str(src / "model.safetensors"), "", out / "a.safetensors").read_bytes() == GOOD
    assert fetch(str(src / "model.safetensors"), GOOD_SHA.upper(), out / "b.safetensors").read_bytes() == GOOD
    # A directory holding model.safetensors.
    assert fetch(str(src), GOOD_SHA, out / "c.safetensors").read_bytes() == GOOD
    assert listing(out) == ["a.safetensors", "b.safetensors", "c.safetensors"]
    assert (src / "model.safetensors").read_bytes() == GOOD  # the source is only read


def test_local_file_with_a_wrong_sha256_is_refused(tmp_path):
    src = tmp_path / "model.safetensors"
    src.write_bytes(CORRUPT)
    out = tmp_path / "out"
    with pytest.raises(StageError, match="sha256 mismatch") as e:
        fetch(str(src), GOOD_SHA, out / "model.safetensors")
    assert str(src) in str(e.value)
    assert listing(out) == []
    out.mkdir(exist_ok=True)
    (out / "model.safetensors").write_bytes(OLD)
    with pytest.raises(StageError, match="sha256 mismatch"):
        fetch(str(src), GOOD_SHA, out / "model.safetensors")
    assert (out / "model.safetensors").read_bytes() == OLD and listing(out) == ["model.safetensors"]


@pytest.mark.parametrize("kind", ["missing file", "empty directory"])
def test_missing_local_source(tmp_path, kind):
    src = tmp_path / "nope.safetensors"
    if kind == "empty directory":
        src = tmp_path / "empty"
        src.mkdir()
    with pytest.raises(StageError, match="no such model file or directory") as e:
        fetch(str(src), "", tmp_path / "out" / "model.safetensors")
    assert str(src) in str(e.value)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_an_mlflow_uri_cannot_climb_out_of_its_artifacts(tmp_path):
    with pytest.raises(StageError, match=r"'\.\.' in an MLflow URI would read outside"):
        fetch("runs:/0123abcd/../../etc", "", tmp_path / "m.safetensors")


def test_an_mlflow_source_without_a_store_creates_none(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StageError, match=r"an MLflow source needs a store: set MLFLOW_TRACKING_URI"):
        fetch("models:/scm-teacher/1", "", tmp_path / "m.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
