"""Fetching the released model files into ComfyUI's model folders (``scripts/download_models.py``).

Only that script downloads: nothing in the nodes or the library fetches anything at run time. A download
goes to ``<name>.part`` and is renamed when complete, so an interrupted one resumes (HTTP Range) and a
half-written file never carries the model's name. The size is checked against what the server announced
and against the model's own tensor size; a web page or a Git LFS pointer served in place of the weights is
refused with the same checks the loader uses.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
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


def target_path(models_dir: str | os.PathLike, model: ModelFile) -> Path:
    return Path(models_dir) / model.directory / model.name


def plan(models: Iterable[ModelFile], models_dir: str | os.PathLike, base_url: Optional[str] = None) -> list:
    """What each file needs: present (a complete-looking file is there) or where it comes from and goes.

    ``base_url``: a mirror that holds the files under their names, instead of the official locations.
    """
    planned = []
    for model in models:
        path = target_path(models_dir, model)
        url = base_url.rstrip("/") + "/" + model.name if base_url else model.url
        part = _part(path)
        present = path.is_file() and path.stat().st_size >= model.min_bytes
        planned.append(Planned(model, path, url, present, part.stat().st_size if part.is_file() else 0))
    return planned


def _part(path: Path) -> Path:
    return path.with_name(path.name + ".part")


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
    """Download ``item`` (resuming its .part), check it and move it into place; returns the final path."""
    item.path.parent.mkdir(parents=True, exist_ok=True)
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
    part.replace(item.path)
    return item.path


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
        if response.getcode() == 200 and offset:
            log.info("%s: the server does not resume; starting over", item.model.name)
            offset = 0
        content_type = response.headers.get("Content-Type", "")
        if "text/html" in content_type.lower():
            part.unlink(missing_ok=True)
            raise DownloadError(f"{item.url} sent a web page ({content_type}), not the weights")
        total = _total_size(response, offset)
        done = offset
        head = None if offset else b""  # a fresh download's first bytes, checked like the loader does
        with part.open("ab" if offset else "wb") as out:
            while True:
                chunk = response.read(CHUNK)
                if not chunk:
                    break
                if head is not None:
                    head += chunk[:_HEAD - len(head)]
                    if len(head) >= _HEAD:
                        _check_head(item.path, head)
                        head = None
                out.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
        if head:
            _check_head(item.path, head)
    if total is not None and done != total:
        raise ConnectionError(f"got {done:,} of {total:,} bytes")


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
