"""What the worker needs to know about its device: clocks that wait for the GPU, step events,
and which errors leave the device unusable.

The same code runs on CPU and CUDA. On CPU every kernel has finished when its Python call
returns, so synchronising is a no-op and a step event is a host-side stand-in that records
the order of ``record`` / ``synchronize`` calls (tests read it to check the migration protocol).
"""

from __future__ import annotations

import ctypes
import time

import torch

# glibc's mallopt parameters.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# The largest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2).
MMAP_THRESHOLD_MAX = 32 << 20


def set_device(device: torch.device) -> None:
    """Make ``device`` the current CUDA device, so kernels, events and IPC handles opened
    without an explicit index (flash-attn, ``torch.cuda.Event``) land on it, not on cuda:0."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def keep_allocations_in_heap() -> bool:
    """Serve a step's activations from the malloc heap, not fresh mmaps (glibc only; False elsewhere).

    glibc maps every allocation above its mmap threshold afresh and unmaps it when freed; the
    threshold follows the largest block freed so far, so it depends on the history of shapes. A
    CPU step's tensors of a few MB (an fp32 decode of 32 requests gathers 7 MB of K/V per layer)
    then page-fault on every touch: such a decode step took 200-240 ms after 512-token prefill
    chunks against 75-95 ms with the threshold at its 32 MB maximum (SmolLM2, 2 threads), and the
    same step after one 8,192-token prefill was fast, which had raised the threshold. Freed memory
    at the heap's top is kept too (trim threshold 1 GiB), as the next step needs it again."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False


def synchronize(device: torch.device) -> None:
    """Wait until every kernel queued on ``device`` has run (CUDA launches are asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_clock(device: torch.device) -> float:
    """``perf_counter`` after the device is idle: a step timed between two of these measures
    execution, not kernel launch."""
    synchronize(device)
    return time.perf_counter()


class StepEvent:
    """Marks a point in the device's work queue: ``record`` after a step's KV writes,
    ``synchronize`` before anyone outside this stream may read those blocks."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._event = torch.cuda.Event() if device.type == "cuda" else None
        self.log: list[str] = []  # CPU stand-in: what happened, in order (kept short)

    def record(self) -> None:
        if self._event is not None:
            self._event.record(torch.cuda.current_stream(self.device))
        self._note("record")

    def synchronize(self) -> None:
        if self._event is not None:
            self._event.synchronize()
        self._note("synchronize")

    def _note(self, what: str) -> None:
        if self._event is None:
            self.log.append(what)
            del self.log[:-64]


class FatalDeviceError(RuntimeError):
    """The device is in an unusable state; the worker must exit so the coordinator marks it down."""


# Messages of CUDA errors after which the context is corrupt: every later kernel fails too.
# (Out-of-memory is not among them: it fails one batch and the device stays usable.)
_FATAL_MARKERS = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "misaligned address",
    "an illegal instruction",
    "uncorrectable ecc",
    "cuda error: unknown error",
    "cudaerrorlaunchfailure",
    "nccl error",
)


def is_fatal_device_error(exc: BaseException) -> bool:
    if isinstance(exc, FatalDeviceError):
        return True
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return False
    accel = getattr(torch, "AcceleratorError", None)  # torch >= 2.8 raises this for CUDA errors
    if accel is not None and isinstance(exc, accel):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in _FATAL_MARKERS)
