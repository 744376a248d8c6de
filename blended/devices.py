"""Where work runs: host-to-device copies that do not stall the host, and where the Triton kernels run.

A plain ``tensor.to("cuda")`` from ordinary (pageable) CPU memory makes torch wait for the copy, which also
waits for every kernel queued before it: inside the guided step that idles the GPU once per copy. Copying
from pinned memory without blocking lets the host go on queueing work; the pinned buffer is only reused
once the copy is done (torch's pinned-memory cache tracks that).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import traceback

import torch


def to_device(tensor: torch.Tensor, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tensor`` (on the CPU) on ``device`` in ``dtype``, without a host sync when ``device`` is CUDA."""
    device = torch.device(device) if device is not None else tensor.device
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    else:
        tensor = tensor.to(device)
    return tensor if dtype is None else tensor.to(dtype)


class HostCopies:
    """Small tensors (progress previews) copied to the host without the host waiting for them.

    Reading a result of the step on the host waits for every kernel queued before it: once per step, that idles
    the GPU while the host then queues the next step. Here a copy starts when :meth:`add` is called and is handed
    out by :meth:`newest_arrived` once it is on the host, a step or so later; older copies are dropped unseen.
    """

    def __init__(self, keep: int = 4):
        self.keep = keep
        self._pending: list[tuple[object, torch.Tensor]] = []  # (the copy's CUDA event or None, host tensor)

    def add(self, tensor: torch.Tensor) -> None:
        self._pending.append(_copy_to_host(tensor))
        del self._pending[:-self.keep]  # a device far behind the host: the oldest are never shown

    def newest(self) -> torch.Tensor | None:
        """The newest copy, waited for (None if there is none), dropping every copy: for the last step, when the
        run reads its result next anyway."""
        if not self._pending:
            return None
        event, host = self._pending[-1]
        if event is not None:
            event.synchronize()
        self._pending.clear()
        return host

    def newest_arrived(self) -> torch.Tensor | None:
        """The newest copy that has reached the host (None if none has), dropping it and every older one."""
        for i in range(len(self._pending) - 1, -1, -1):
            event, host = self._pending[i]
            if event is None or event.query():
                del self._pending[:i + 1]
                return host
        return None


def _copy_to_host(tensor: torch.Tensor) -> tuple[object, torch.Tensor]:
    """A copy of ``tensor`` on the host: from CUDA into pinned memory without blocking, with the event that marks
    its arrival (torch keeps the pinned block until then, even if the copy is dropped); elsewhere at once."""
    if not tensor.is_cuda:
        return None, tensor.cpu()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(tensor.device))
    return event, host


def made_current(device) -> contextlib.AbstractContextManager:
    """A block with ``device`` as CUDA's current device (no change for other devices).

    Triton launches a kernel on the current device, and a CUDA graph captures on the current device's streams,
    whatever device the tensors are on. ComfyUI setups that load models on a second GPU choose that device for
    the models without making it current, so a run sets it for its own duration and restores it after."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def runs_triton_kernels(tensor: torch.Tensor) -> bool:
    """Whether the pack's Triton kernels (``triton_norm``, ``triton_clip``) take ``tensor``: on CUDA, or on the
    CPU under Triton's interpreter (``TRITON_INTERPRET=1``, how the tests check them); elsewhere their options
    fall back to plain torch."""
    return tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def triton_package_dir() -> str | None:
    """Where the installed triton package lives (None without one), found without importing it."""
    spec = importlib.util.find_spec("triton")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return os.path.realpath(locations[0]) if locations else None


def raised_in_triton(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside the installed triton package (its compiler, ptxas, its driver layer) while
    launching one of the pack's own Triton kernels: how a GPU that Triton cannot compile them for shows. Told apart
    by where it was raised, since Triton raises plain RuntimeErrors as well as its own classes; a failure of
    torch.compile's generated Triton code does not pass through the pack's kernel modules, and is not theirs."""
    package = triton_package_dir()
    if package is None:
        return False
    files = [os.path.realpath(frame.f_code.co_filename) for frame, _ in traceback.walk_tb(exc.__traceback__)]
    return (any(path.startswith(package + os.sep) for path in files)
            and any(os.path.dirname(path) == _PACK_DIR and os.path.basename(path).startswith("triton_")
                    for path in files))


# The pack's library, where its Triton kernel modules (triton_norm, triton_clip, triton_residual) live.
_PACK_DIR = os.path.dirname(os.path.realpath(__file__))
