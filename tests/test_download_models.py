"""The model download script against a local HTTP server on 127.0.0.1 (nothing here reaches the internet):
resume, size checks, refusal of web pages and LFS pointers, dry runs, files already present."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from blended import download
from blended.model_files import MODEL_FILES, ModelFile

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = b"PK\x03\x04" + bytes(range(256)) * 1200  # starts like a torch zip archive; 307 KB
LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 2211278491\n")


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves WEIGHTS with Range support, plus the ways a download goes wrong, by path."""

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        name = self.path.rsplit("/", 1)[-1]
        if name == "page.pt":
            return self._send(200, b"<!DOCTYPE html><html><body>Sign in</body></html>", "text/html; charset=utf-8")
        if name == "page-as-binary.pt":
            return self._send(200, b"\n  <html><body>Sign in</body></html>" + b" " * 600, "application/octet-stream")
        if name == "lfs.pt":
            return self._send(200, LFS_POINTER, "application/octet-stream")
        if name == "missing.pt":
            return self._send(404, b"not found", "text/plain")
        body, start = WEIGHTS, 0
        requested = self.headers.get("Range")
        if requested and name != "no-range.pt":
            start = int(requested.split("=")[1].split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if name == "breaks.pt" and server.breaks_left > 0:
            server.breaks_left -= 1
            self.wfile.write(body[start:start + 100_000])  # then the connection drops mid-transfer
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def _send(self, code, body, content_type):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.requests, httpd.breaks_left = [], 1
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _item(server, tmp_path, name="good.pt", min_bytes=None):
    min_bytes = len(WEIGHTS) if min_bytes is None else min_bytes
    model = ModelFile(name, "guided_diffusion", f"http://127.0.0.1:{server.server_port}/files/{name}", min_bytes,
                      True, "test file")
    return download.plan([model], tmp_path)[0]


def test_downloads_into_the_model_folder_with_progress(server, tmp_path):
    item = _item(server, tmp_path)
    seen = []
    path = download.fetch(item, progress=lambda done, total: seen.append((done, total)))
    assert path == tmp_path / "guided_diffusion" / "good.pt" and path.read_bytes() == WEIGHTS
    assert not (tmp_path / "guided_diffusion" / "good.pt.part").exists()
    assert seen[-1] == (len(WEIGHTS), len(WEIGHTS))


def test_resumes_a_partial_download_with_a_range_request(server, tmp_path):
    part = tmp_path / "guided_diffusion" / "good.pt.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(WEIGHTS[:123_456])
    item = _item(server, tmp_path)
    assert item.resume_from == 123_456
    assert download.fetch(item).read_bytes() == WEIGHTS
    assert server.requests == [("/files/good.pt", "bytes=123456-")]


def test_a_broken_transfer_resumes_where_it_stopped(server, tmp_path):
    path = download.fetch(_item(server, tmp_path, "breaks.pt"), attempts=2)
    assert path.read_bytes() == WEIGHTS
    assert [r for _, r in server.requests] == [None, "bytes=100000-"]


def test_a_server_that_ignores_range_restarts_from_the_beginning(server, tmp_path):
    part = tmp_path / "guided_diffusion" / "no-range.pt.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(WEIGHTS[:5000])
    assert download.fetch(_item(server, tmp_path, "no-range.pt")).read_bytes() == WEIGHTS


def test_a_complete_part_is_finished_without_downloading_again(server, tmp_path):
    part = tmp_path / "guided_diffusion" / "good.pt.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(WEIGHTS)
    assert download.fetch(_item(server, tmp_path)).read_bytes() == WEIGHTS
    # one ranged request, answered 416 with the size the part already has: nothing is fetched again
    assert server.requests == [("/files/good.pt", f"bytes={len(WEIGHTS)}-")]


@pytest.mark.parametrize("name, message", [
    ("page.pt", "web page"),
    ("page-as-binary.pt", "web page"),
    ("lfs.pt", "Git LFS pointer"),
    ("missing.pt", "HTTP 404"),
])
def test_web_pages_lfs_pointers_and_errors_are_refused_and_nothing_is_kept(server, tmp_path, name, message,
                                                                         monkeypatch):
    # As on Windows, an open file cannot be removed: the .part is removed once it is closed.
    open_files, real_open, real_unlink = [], Path.open, Path.unlink

    def tracked_open(self, *args, **kwargs):
        handle = real_open(self, *args, **kwargs)
        open_files.append((Path(self), handle))
        return handle

    def unlink_if_closed(self, *args, **kwargs):
        if any(path == Path(self) and not handle.closed for path, handle in open_files):
            raise PermissionError(f"{self} is open in this process")
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", tracked_open)
    monkeypatch.setattr(Path, "unlink", unlink_if_closed)
    with pytest.raises(download.DownloadError, match=message):
        download.fetch(_item(server, tmp_path, name, min_bytes=10))
    assert list((tmp_path / "guided_diffusion").iterdir()) == []


def test_a_file_smaller_than_the_models_weights_is_refused(server, tmp_path):
    with pytest.raises(download.DownloadError, match="not the right file"):
        download.fetch(_item(server, tmp_path, min_bytes=len(WEIGHTS) + 1))
    assert list((tmp_path / "guided_diffusion").iterdir()) == []


# ------------------------------------------------------------------------------------------ the script

def run_script(*args, env=None):
    environment = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    environment.pop("COMFYUI_PATH", None)
    return subprocess.run([sys.executable, str(REPO / "scripts" / "download_models.py"), *args], cwd=REPO,
                          env=environment, capture_output=True, text=True, timeout=120)


def test_dry_run_says_what_is_missing_and_where_it_would_go(tmp_path):
    result = run_script("--comfyui", str(tmp_path), "--dry-run")
    assert result.returncode == 0, result.stderr
    for model in MODEL_FILES:
        assert model.url in result.stderr
        assert str(tmp_path / "models" / model.directory / model.name) in result.stderr
    assert f"{len(MODEL_FILES)} of {len(MODEL_FILES)} file(s) missing" in result.stderr
    assert not (tmp_path / "models").exists()


def test_files_already_present_are_not_fetched_again(server, tmp_path):
    for model in MODEL_FILES:  # sparse files of the model's size: complete-looking, no disk used
        path = tmp_path / model.directory / model.name
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:
            handle.truncate(model.min_bytes)
    result = run_script("--models-dir", str(tmp_path), "--base-url", f"http://127.0.0.1:{server.server_port}/m")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("present: ") == len(MODEL_FILES) and server.requests == []


def test_the_script_reports_a_failed_download_and_exits_non_zero(server, tmp_path):
    result = run_script("--models-dir", str(tmp_path), "--only", "ViT-B-16.safetensors",
                        "--base-url", f"http://127.0.0.1:{server.server_port}/files")
    # the mirror serves 307 KB under that name: far less than ViT-B/16's weights
    assert result.returncode == 1 and "not the right file" in result.stderr
    assert server.requests == [("/files/ViT-B-16.safetensors", None)]
    assert not (tmp_path / "clip_guidance" / "ViT-B-16.safetensors").exists()
