"""The model download script against a local HTTP server on 127.0.0.1 (nothing here reaches the internet):
resume, size checks, refusal of web pages and LFS pointers, dry runs, files already present."""

from __future__ import annotations

import errno
import http.server
import importlib.util
import io
import logging
import os
import shutil
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


# ------------------------------------------------------------------------------ what is there, mirrors, the disk

def load_script():
    """The script in-process (a subprocess costs seconds of imports): its main, parse_args and helpers."""
    spec = importlib.util.spec_from_file_location("download_models_script", REPO / "scripts" / "download_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_smaller_file_already_there_is_left_alone_and_reported(server, tmp_path, caplog):
    """README: files already there are left alone, also one smaller than the model (a truncated download, or a
    conversion of the user's own): it is reported, never replaced, and the exit status says so."""
    caplog.set_level(logging.INFO)
    path = tmp_path / "clip_guidance" / "ViT-B-16.safetensors"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"the user's own smaller file")
    script = load_script()
    assert script.main(["--models-dir", str(tmp_path), "--only", "ViT-B-16.safetensors",
                        "--base-url", f"http://127.0.0.1:{server.server_port}/files"]) == 1
    assert path.read_bytes() == b"the user's own smaller file" and server.requests == []
    assert "holds only 27 bytes" in caplog.text and "left alone; move or delete it" in caplog.text
    # fetch itself refuses too, should a caller skip the plan's verdict
    (tmp_path / "guided_diffusion").mkdir()
    (tmp_path / "guided_diffusion" / "good.pt").write_bytes(b"small")
    item = _item(server, tmp_path)
    assert "holds only 5 bytes" in item.in_the_way and not item.present
    with pytest.raises(download.DownloadError, match="left alone"):
        download.fetch(item)
    assert (tmp_path / "guided_diffusion" / "good.pt").read_bytes() == b"small" and server.requests == []


def test_a_folder_mirror_resumes_by_starting_over_not_by_appending(tmp_path):
    """A local folder (or file:// URL) as --base-url answers a Range request with the whole file and no status:
    appended to the .part, each retry made it longer and the download never finished."""
    mirror = tmp_path / "mirror with spaces é"
    mirror.mkdir()
    (mirror / "good.pt").write_bytes(WEIGHTS)
    model = ModelFile("good.pt", "guided_diffusion", "https://unused.invalid/good.pt", len(WEIGHTS), True, "test")
    item = download.plan([model], tmp_path / "models", base_url=str(mirror))[0]
    assert item.url.startswith("file://")
    part = tmp_path / "models" / "guided_diffusion" / "good.pt.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(WEIGHTS[:1000])
    assert download.fetch(download.plan([model], tmp_path / "models", base_url=str(mirror))[0],
                          attempts=1).read_bytes() == WEIGHTS


def test_too_little_free_space_is_refused_before_writing(server, tmp_path, monkeypatch):
    monkeypatch.setattr(download.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**12, 10**12, 1000))
    with pytest.raises(download.DownloadError, match=r"not enough space for good.pt .* 0.00 GB are free"):
        download.fetch(_item(server, tmp_path))
    assert list((tmp_path / "guided_diffusion").iterdir()) == [] and len(server.requests) == 1


class _FillingDisk(io.RawIOBase):
    """A file on a disk that fills up after ``room`` bytes: a short write, then ENOSPC."""

    def __init__(self, handle, room):
        self.handle, self.room = handle, room

    def writable(self):
        return True

    def write(self, data):
        if self.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        taken = self.handle.write(bytes(data[:self.room]))
        self.room -= taken
        return taken

    def close(self):
        self.handle.close()
        super().close()


def test_a_disk_filling_up_says_so_keeps_the_part_and_does_not_retry(server, tmp_path, monkeypatch):
    """A full disk is no broken transfer: retrying cannot help, and the message says what to do."""
    real_open = Path.open

    def filling_open(self, mode="r", *args, **kwargs):
        handle = real_open(self, mode, *args, **kwargs)
        return _FillingDisk(handle, 150_000) if "b" in mode and ("w" in mode or "a" in mode) else handle
    monkeypatch.setattr(Path, "open", filling_open)
    monkeypatch.setattr(download.time, "sleep", lambda _: None)
    with pytest.raises(download.DownloadError, match="disk is full; good.pt needs about"):
        download.fetch(_item(server, tmp_path))
    assert len(server.requests) == 1
    assert (tmp_path / "guided_diffusion" / "good.pt.part").read_bytes() == WEIGHTS[:150_000]  # kept to resume
    assert not (tmp_path / "guided_diffusion" / "good.pt").exists()


def test_a_folder_that_cannot_be_made_is_a_download_error_not_a_traceback(server, tmp_path, monkeypatch, caplog):
    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(Path, "mkdir", refuse)
    script = load_script()
    assert script.main(["--models-dir", str(tmp_path / "ro"), "--only", "ViT-B-16.safetensors",
                        "--base-url", f"http://127.0.0.1:{server.server_port}/files"]) == 1
    assert "cannot create the folder" in caplog.text and "Permission denied" in caplog.text


def test_a_link_to_a_vanished_folder_in_the_way_of_the_model_folder_says_so(server, tmp_path):
    (tmp_path / "guided_diffusion").symlink_to(tmp_path / "unplugged-disk")
    with pytest.raises(download.DownloadError, match="a link to a folder that is gone") as err:
        download.fetch(_item(server, tmp_path))
    assert "free space" not in str(err.value)


def test_ctrl_c_keeps_the_part_and_says_how_to_resume(tmp_path, monkeypatch, caplog):
    script = load_script()

    def interrupted(item, progress=None):
        raise KeyboardInterrupt
    monkeypatch.setattr(script.download, "fetch", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        try:
            script.main(["--models-dir", str(tmp_path), "--only", "ViT-B-16.safetensors"])
        except KeyboardInterrupt:
            pytest.fail("Ctrl-C ended the script with a traceback")
    assert exit_info.value.code == 130 and "run the script again to resume" in caplog.text


@pytest.mark.parametrize(("args", "message"), [
    (["--comfyui", "{tmp}/ComfyUl-typo"], "no such folder"),
    (["--models-dir", "{tmp}", "--only", "ViT-L-14.safetensors", "--required-only"], "nothing to fetch"),
])
def test_arguments_that_would_do_the_wrong_thing_quietly_are_refused(tmp_path, capsys, args, message):
    script = load_script()
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args([a.format(tmp=tmp_path) for a in args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_stale_comfyui_path_is_named_as_such_and_does_not_block_models_dir(tmp_path, monkeypatch, capsys):
    """--comfyui defaults to $COMFYUI_PATH: a variable left pointing at a removed ComfyUI must not refuse an
    explicit --models-dir, and where it is used its refusal names the variable, not an option nobody typed."""
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "removed-ComfyUI"))
    script = load_script()
    assert script.parse_args(["--models-dir", str(tmp_path), "--dry-run"]).models_dir == tmp_path
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--dry-run"])
    assert exit_info.value.code == 2 and "$COMFYUI_PATH" in capsys.readouterr().err


def test_a_mirror_without_a_scheme_must_be_a_folder(tmp_path, capsys):
    """'example.com/models' was read as a folder under the current one and failed as "cannot connect ... run the
    script again to resume", neither of which was true: it is refused up front with the scheme it lacks."""
    with pytest.raises(SystemExit) as exit_info:
        load_script().parse_args(["--models-dir", str(tmp_path), "--base-url", "example.com/models"])
    assert exit_info.value.code == 2 and "https://example.com/models" in capsys.readouterr().err
    assert download.mirror_url(str(tmp_path)) == tmp_path.as_uri()


def test_a_windows_share_mirror_gets_the_url_urllib_opens_as_a_share():
    """as_uri() gives file://server/share, whose 'server' urllib takes for a remote host it does not open; with
    four slashes the server stays in the path, which urllib hands to Windows as a share's path."""
    import nturl2path
    import urllib.request
    from pathlib import PureWindowsPath

    share = download.folder_uri(PureWindowsPath(r"\\server\share\models"))
    request = urllib.request.Request(share + "/ViT-B-16.safetensors")
    assert request.host == ""
    assert nturl2path.url2pathname(request.selector) == r"\\server\share\models\ViT-B-16.safetensors"
    assert download.folder_uri(PureWindowsPath(r"D:\mirror")) == "file:///D:/mirror"


def test_messages_name_the_folder_absolutely(tmp_path, monkeypatch, caplog):
    """README's command for a ComfyUI of one's own passes --comfyui ../..: the plan said "to ../../models/...",
    which does not tell which ComfyUI gets the files."""
    caplog.set_level(logging.INFO)
    (tmp_path / "ComfyUI" / "custom_nodes" / "pack").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "ComfyUI" / "custom_nodes" / "pack")
    assert load_script().main(["--comfyui", "../..", "--dry-run", "--required-only"]) == 0
    assert f"to   {tmp_path.resolve() / 'ComfyUI' / 'models' / 'clip_guidance' / 'ViT-B-16.safetensors'}" in caplog.text
