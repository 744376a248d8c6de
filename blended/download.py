"""Fetching the released model files into ComfyUI's model folders (``scripts/download_models.py``).

Only that script downloads: nothing in the nodes or the library fetches anything at run time. A download
goes to ``<name>.part`` and is renamed when complete, so an interrupted one resumes (HTTP Range) and a
half-written file never carries the model's name. The size is checked against what the server announced
and against the model's own tensor size; a web page or a Git LFS pointer served in place of the weights is
refused with the same checks the loader uses.
"""

from __future__ import annotations

import errno
import http.client
import logging
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Callable, Iterable, Optional

from .checkpoint import refuse_text
from .errors import CheckpointError
from .model_files import ModelFile

log = logging.getLogger(__name__)

CHUNK = 1 << 20
_HEAD = 512  # as many bytes as the loader sniffs
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


class DownloadError(RuntimeError):
    """A model file could not be fetched; the message says what to do."""


@dataclass
class Planned:
    model: ModelFile
    path: Path
    url: str
    present: bool
    resume_from: int  # bytes already in <path>.part
    in_the_way: str = ""  # why something at <path> that is not the complete file is left alone ("" = nothing there)


def target_path(models_dir: str | os.PathLike, model: ModelFile) -> Path:
    return Path(models_dir) / model.directory / model.name


def plan(models: Iterable[ModelFile], models_dir: str | os.PathLike, base_url: Optional[str] = None) -> list:
    """What each file needs: present (a complete-looking file is there) or where it comes from and goes.

    ``base_url``: a mirror that holds the files under their names, instead of the official locations: a URL, or a
    local folder (a mounted share, a USB disk).
    """
    planned = []
    base_url = mirror_url(base_url) if base_url else None
    for model in models:
        path = target_path(models_dir, model)
        url = base_url.rstrip("/") + "/" + model.name if base_url else model.url
        part = _part(path)
        present = path.is_file() and path.stat().st_size >= model.min_bytes
        in_the_way = "" if present else _in_the_way(path, model)
        planned.append(Planned(model, path, url, present, part.stat().st_size if part.is_file() else 0, in_the_way))
    return planned


def mirror_url(base: str) -> str:
    """``base`` as a URL: a local folder (no ``scheme://``; ``D:\\mirror`` or a share on Windows too) becomes its
    file:// URL, which urllib would otherwise refuse as an unknown URL type. Anything else without a scheme is
    refused here: read as a folder, a mistyped web address would fail later as "cannot connect"."""
    if "://" in base:
        return base
    # abspath, not resolve: on Windows resolve() turns a mapped drive letter into the name of its share.
    folder = Path(os.path.abspath(os.path.expanduser(base)))
    if not folder.is_dir():
        raise DownloadError(f"the mirror {base!r} is no folder here; a web mirror needs its scheme, e.g. "
                            f"https://{base.lstrip('/')}")
    return folder_uri(folder)


def folder_uri(folder: PurePath) -> str:
    """The file:// URL urllib opens for ``folder``. A Windows share (\\\\server\\share) is
    ``file:////server/share``: ``as_uri()``'s ``file://server/share`` names a host, which urllib does not open."""
    uri = folder.as_uri()
    if uri.startswith("file://") and not uri.startswith("file:///"):
        uri = "file:////" + uri[len("file://"):]
    return uri


def _in_the_way(path: Path, model: ModelFile) -> str:
    """Why a file (or folder, or link) already at ``path`` keeps the download out: the script never replaces
    what a user put there (a smaller file may be a conversion of their own, not only a truncated download)."""
    if path.is_file():
        return (f"{path} is there but holds only {path.stat().st_size:,} bytes, less than the "
                f"{model.min_bytes:,} bytes of {model.name}'s weights (a truncated download, or another file): "
                "left alone; move or delete it, then run the script again to download it")
    if path.is_dir():
        return f"{path} is a folder, not the model file: left alone; move it away, then run the script again"
    if os.path.lexists(path):
        return (f"{path} is a link to {os.readlink(path)!r}, which does not exist: left alone; connect what it "
                "points to, or delete the link, then run the script again")
    return ""


def _part(path: Path) -> Path:
    return path.with_name(path.name + ".part")


class _LocalFileError(DownloadError):
    """The model folder cannot take the file (no space, no permission): retrying the transfer cannot help."""


def _local(action: str, path: Path, exc: OSError, model: ModelFile) -> _LocalFileError:
    """A message for an OSError of the disk, not of the network: what failed, why, and what to do."""
    if exc.errno == errno.ENOSPC:
        advice = (f"the disk is full; {model.name} needs about {model.min_bytes / 1e9:.1f} GB there. Free some "
                  "space (or use --models-dir on a roomier disk), then run the script again to resume")
    elif exc.errno == errno.EEXIST:
        advice = ("something that is not a folder has that name (a file, or a link to a folder that is gone): "
                  "move it away or reconnect what it points to, then run the script again")
    else:
        advice = "check the folder's permissions and free space, then run the script again to resume"
    return _LocalFileError(f"cannot {action} {path}: {exc.strerror or exc} ({advice})")


def _check_free_space(folder: Path, needed: int, model: ModelFile) -> None:
    """Refuse before writing when the disk cannot hold the rest of the file, rather than filling it up."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # cannot tell (some network filesystems): the write itself will say so
    if needed > free:
        raise _LocalFileError(f"not enough space for {model.name} in {folder}: it needs {needed / 1e9:.2f} GB more, "
                              f"{free / 1e9:.2f} GB are free. Free some space (or use --models-dir on a roomier "
                              "disk), then run the script again")


class _NotTheWeights(DownloadError):
    """The first bytes are a web page or a Git LFS pointer: the .part is removed once it is closed (Windows
    cannot remove an open file)."""


def _check_head(path: Path, head: bytes) -> None:
    try:
        refuse_text(path, head)
    except CheckpointError as exc:
        raise _NotTheWeights(f"{exc} (the server did not send the weights, nothing was kept; check the URL, "
                             "try again later or use --base-url with a mirror)") from exc


def _total_size(response, offset: int) -> Optional[int]:
    if response.getcode() == 206:
        match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        if not match or int(match.group(1)) != offset:
            raise DownloadError(f"the server answered the resume request with an unexpected range "
                                f"({response.headers.get('Content-Range')!r})")
        return None if match.group(3) == "*" else int(match.group(3))
    length = response.headers.get("Content-Length")
    return int(length) if length is not None else None


def _open(url: str, offset: int, timeout: float):
    request = urllib.request.Request(url, headers={"User-Agent": "blended-diffusion-download/1"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            return exc  # the part may already be complete: the caller checks the size the server reports
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadError(f"{url}: cannot connect ({getattr(exc, 'reason', exc)})") from exc


def _range_total(response) -> Optional[int]:
    match = re.match(r"bytes\s+\*/(\d+)", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def fetch(item: Planned, progress: Optional[Callable[[int, Optional[int]], None]] = None,
          timeout: float = 60.0, attempts: int = 3) -> Path:
    """Download ``item`` (resuming its .part), check it and move it into place; returns the final path.

    Whatever is already at the final path is never replaced (see :func:`plan`'s ``in_the_way``).
    """
    _refuse_what_is_there(item)
    try:
        item.path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _local("create the folder", item.path.parent, exc, item.model) from exc
    part = _part(item.path)
    for attempt in range(1, attempts + 1):
        try:
            _fetch_once(item, part, progress, timeout)
            break
        except (http.client.HTTPException, OSError) as exc:  # OSError: connection errors and timeouts
            if attempt == attempts:
                raise DownloadError(f"{item.url}: the transfer broke off ({exc}); run the script again to "
                                    "resume") from exc
            log.warning("%s: transfer broke off (%s); resuming (attempt %d of %d)", item.model.name, exc,
                        attempt + 1, attempts)
            time.sleep(min(2 ** attempt, 10))
    size = part.stat().st_size
    if size < item.model.min_bytes:
        part.unlink()
        raise DownloadError(f"{item.url} gave {size:,} bytes, but {item.model.name} holds at least "
                            f"{item.model.min_bytes:,} bytes of weights: this is not the right file")
    _refuse_what_is_there(item)  # something may have been put there during the download
    try:
        part.replace(item.path)
    except OSError as exc:
        raise _local(f"rename {part.name} to", item.path, exc, item.model) from exc
    return item.path


def _refuse_what_is_there(item: Planned) -> None:
    if os.path.lexists(item.path):
        reason = _in_the_way(item.path, item.model) or f"{item.path} is already there: left alone"
        raise DownloadError(reason)


def _fetch_once(item: Planned, part: Path, progress, timeout: float) -> None:
    try:
        _fetch_into(item, part, progress, timeout)
    except _NotTheWeights:
        part.unlink(missing_ok=True)
        raise


def _fetch_into(item: Planned, part: Path, progress, timeout: float) -> None:
    offset = part.stat().st_size if part.is_file() else 0
    if offset:
        with part.open("rb") as handle:
            _check_head(item.path, handle.read(_HEAD))
    response = _open(item.url, offset, timeout)
    with response:
        if response.getcode() == 416:
            total = _range_total(response)
            if total == offset:
                return
            part.unlink()
            raise DownloadError(f"{item.url}: the partial download does not match the file on the server "
                                "(removed it); run the script again")
        if offset and response.getcode() != 206:
            # Only a 206 continues the .part: a 200, or a file:// mirror's answer (no status at all), is the whole
            # file from its first byte, which appended to the .part would make it ever longer on each retry.
            log.info("%s: the server does not resume; starting over", item.model.name)
            offset = 0
        content_type = response.headers.get("Content-Type", "")
        if "text/html" in content_type.lower():
            part.unlink(missing_ok=True)
            raise DownloadError(f"{item.url} sent a web page ({content_type}), not the weights")
        total = _total_size(response, offset)
        starting_over = 0 if offset or not part.is_file() else part.stat().st_size  # freed when it is rewritten
        expected = item.model.min_bytes if total is None else total
        _check_free_space(part.parent, expected - offset - starting_over, item.model)
        done = _receive(item, part, response, offset, total, progress)
    if total is not None and done != total:
        raise ConnectionError(f"got {done:,} of {total:,} bytes")


def _receive(item: Planned, part: Path, response, offset: int, total: Optional[int], progress) -> int:
    """Append the response to the .part (or start it); returns its size. The disk's errors (full, read-only) are
    told apart from the network's, which the caller retries."""
    done = offset
    head = None if offset else b""  # a fresh download's first bytes, checked like the loader does
    try:  # unbuffered: a full disk fails the write that overflows it, not a flush at close
        out = part.open("ab" if offset else "wb", buffering=0)
    except OSError as exc:
        raise _local("write", part, exc, item.model) from exc
    with out:
        while True:
            chunk = response.read(CHUNK)
            if not chunk:
                break
            if head is not None:
                head += chunk[:_HEAD - len(head)]
                if len(head) >= _HEAD:
                    _check_head(item.path, head)
                    head = None
            _write_all(out, chunk, part, item.model)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    if head:
        _check_head(item.path, head)
    return done


def _write_all(out, chunk: bytes, part: Path, model: ModelFile) -> None:
    """An unbuffered write may take part of the chunk (a disk filling up): write the rest, or say why not."""
    view = memoryview(chunk)
    try:
        while view:
            view = view[out.write(view):]
    except OSError as exc:
        raise _local("write", part, exc, model) from exc


class ProgressBar:
    """A one-line bar on stderr: percentage, bytes and speed (rate-limited redraws)."""

    def __init__(self, label: str, stream=None, width: int = 30):
        self.label, self.stream, self.width = label, stream or sys.stderr, width
        self.start = time.monotonic()
        self.last = 0.0
        self.first: Optional[int] = None

    def __call__(self, done: int, total: Optional[int]) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = done
        if now - self.last < 0.2 and (total is None or done < total):
            return
        self.last = now
        speed = (done - self.first) / max(now - self.start, 1e-6)
        if total:
            filled = int(self.width * done / total)
            bar = f"[{'#' * filled}{'.' * (self.width - filled)}] {100 * done / total:5.1f}%"
            amount = f"{done / 1e9:.2f}/{total / 1e9:.2f} GB"
        else:
            bar, amount = "[downloading]", f"{done / 1e9:.2f} GB"
        self.stream.write(f"\r{self.label} {bar} {amount} {speed / 1e6:.1f} MB/s ")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()
