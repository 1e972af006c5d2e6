"""Huge pages under ONNX Runtime's sessions: fewer address-translation misses on every call.

A decode step reads every weight of the model once, tens of megabytes for the smallest LLM, and a CPU
maps them page by page. Linux maps a process's memory in 4 KiB pages unless the process asks for 2 MiB
ones (transparent huge pages in ``madvise`` mode, the default of many distributions), and ONNX Runtime's
CPU allocator does not ask. With 4 KiB pages a step over 12 MB of weights touches some 3,000 pages, more
than a core's TLB holds, and in a virtual machine each miss walks two page tables. On a 2-core cloud VM (one
thread) huge pages made the deployable-LLM benchmark's 8-row mixed-adapter generation 1.11-1.16x as fast and
its one-row generation 0.99-1.03x (``python benchmarks/generate.py --mixed-only``), and a 512 MB model's one-row
step 1.21x, for a load 3.5 ms a MB longer (``python benchmarks/huge_pages.py``; most of it the VM's first touch
of new memory).

:func:`huge_pages` wraps the code that allocates such memory (:class:`~flora_graph.serving.session.OrtModel`
wraps its session's creation, where ONNX Runtime reads and pre-packs the weights): on leaving the block,
each 2 MiB-aligned span of private anonymous memory that the block mapped or grew (the heap included) and
that is at least three quarters resident is collapsed into a huge page with ``madvise(MADV_COLLAPSE)``
(Linux 6.1 or later). The contents stay the same: the kernel copies them. Spans mostly not resident (a
thread's stack, an arena reserved ahead) are left alone, so the resident memory grows by at most the
quarter-empty spans' missing pages. Memory the block takes back from what the process freed before (free
chunks of the heap) stays as it was, so a server that loads its models first gets the most out of it.
Nothing changes the memory's policy for later allocations. Where the kernel cannot (another OS, an older
kernel, transparent huge pages set to ``never``, no free huge page), the block's memory stays in small pages
and :attr:`Collapsed.reason` says why.

:func:`zeros` is for the package's own arrays that a step reads whole: a mixed batch's per-row adapter weights
and a batch's key/value caches are laid side by side in one mapping that asks for huge pages (``madvise(
MADV_HUGEPAGE)``) where together they fill one.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import mmap
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

__all__ = ["HUGE_PAGE", "Collapsed", "huge_pages", "private_anonymous", "zeros"]

HUGE_PAGE = 2 << 20
"""Bytes in an x86-64 / arm64 (4 KiB base pages) transparent huge page."""

MIN_BYTES = HUGE_PAGE
""":func:`zeros` lays out arrays of at least this many bytes in total in a mapping of their own."""

MIN_RESIDENT = 0.75
"""The part of a span that must be resident for it to be collapsed (the rest would be filled with zeros)."""

_MADV_COLLAPSE = 25  # Linux's value; Python's mmap module does not name it
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


@dataclass
class Collapsed:
    """What one :func:`huge_pages` block did.

    Attributes:
        bytes: memory now in huge pages (a multiple of :data:`HUGE_PAGE`).
        sparse: bytes of spans left in small pages because less than :data:`MIN_RESIDENT` of them was resident.
        failed: bytes the kernel did not collapse (no free huge page, a span another thread changed meanwhile).
        reason: why nothing, or nothing more, was collapsed (``None`` where every span was tried).
    """

    bytes: int = 0
    sparse: int = 0
    failed: int = 0
    reason: str | None = None


_LIBC: list[ctypes.CDLL] = []  # the C library, typed once


def _libc() -> ctypes.CDLL | str:
    """The C library with ``madvise`` and ``mincore`` typed, or why it cannot collapse pages here."""
    if _LIBC:
        return _LIBC[0]
    if not sys.platform.startswith("linux"):
        return f"huge pages are collapsed on Linux only, not {sys.platform}"
    release = os.uname().release
    version = tuple(int(x) for x in release.split("-")[0].split(".")[:2] if x.isdigit())
    if version < (6, 1):
        return f"Linux {release} has no MADV_COLLAPSE (6.1 or later has)"
    try:
        with open(_THP) as f:
            if "[never]" in f.read():
                return f"transparent huge pages are off ({_THP}: never)"
    except OSError as exc:
        return f"cannot read {_THP} ({exc.strerror})"
    if os.sysconf("SC_PAGE_SIZE") != 4096:
        return f"pages of {os.sysconf('SC_PAGE_SIZE')} bytes, not 4096"
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    _LIBC.append(libc)
    return libc


def private_anonymous() -> list[tuple[int, int]]:
    """``[(start, end)]`` of this process's private writable anonymous mappings (the heap included), in address
    order: where ``malloc`` puts what ONNX Runtime allocates."""
    out = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if fields[1].startswith("rw") and fields[1][3] == "p" and (len(fields) < 6 or fields[5] == "[heap]"):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                out.append((lo, hi))
    return sorted(out)


def _new_spans(before: list[tuple[int, int]], after: list[tuple[int, int]]) -> list[int]:
    """Start addresses of the :data:`HUGE_PAGE`-aligned spans inside a mapping of ``after`` that overlap memory no
    mapping of ``before`` covered (a new mapping, or an old one grown)."""
    starts = [lo for lo, _ in before]
    spans: set[int] = set()
    for lo, hi in after:
        pieces = [(lo, hi)]
        k = max(bisect.bisect_right(starts, lo) - 1, 0)
        while k < len(before) and before[k][0] < hi:
            blo, bhi = before[k]
            pieces = [p for a, b in pieces for p in ((a, min(b, blo)), (max(a, bhi), b)) if p[1] > p[0]]
            k += 1
        first, last = -(-lo // HUGE_PAGE) * HUGE_PAGE, hi // HUGE_PAGE * HUGE_PAGE  # spans inside the mapping
        for a, b in pieces:
            spans.update(range(max(first, a // HUGE_PAGE * HUGE_PAGE), min(last, b), HUGE_PAGE))
    return sorted(spans)


def _collapse(libc: ctypes.CDLL, spans: list[int], result: Collapsed) -> None:
    """Collapse the spans (sorted starts) at least :data:`MIN_RESIDENT` resident, each run of adjacent ones in one
    call (the kernel's fixed cost is per call); a run that fails is tried span by span, to count what was done."""
    pages = HUGE_PAGE // 4096
    vec = np.zeros(pages, np.uint8)  # mincore's answer: bit 0 set for each resident page
    runs: list[list[int]] = []  # [start, end) of adjacent spans to collapse
    for start in spans:
        if libc.mincore(start, HUGE_PAGE, vec.ctypes.data) != 0:  # unmapped meanwhile (another thread freed it)
            continue
        if np.count_nonzero(vec & 1) < MIN_RESIDENT * pages:
            result.sparse += HUGE_PAGE
        elif runs and runs[-1][1] == start:
            runs[-1][1] += HUGE_PAGE
        else:
            runs.append([start, start + HUGE_PAGE])
    for start, end in runs:
        if libc.madvise(start, end - start, _MADV_COLLAPSE) == 0:
            result.bytes += end - start
            continue
        err = ctypes.get_errno()
        if err == errno.ENOMEM or end - start == HUGE_PAGE:
            result.failed += end - start
        else:  # the kernel stops at a span it cannot collapse: the others one by one
            for span in range(start, end, HUGE_PAGE):
                if libc.madvise(span, HUGE_PAGE, _MADV_COLLAPSE) == 0:
                    result.bytes += HUGE_PAGE
                    continue
                result.failed += HUGE_PAGE
                if (err := ctypes.get_errno()) == errno.ENOMEM:
                    break
        if err == errno.ENOMEM:  # no free huge page (or the memory unmapped meanwhile): the rest would fail too
            result.reason = "the kernel had no huge page free (ENOMEM)"
            return


def _mappings(result: Collapsed) -> list[tuple[int, int]] | None:
    """:func:`private_anonymous`, or ``None`` with ``result.reason`` saying why it cannot be read."""
    try:
        return private_anonymous()
    except OSError as exc:  # /proc not mounted or not readable (a sandbox)
        result.reason = f"cannot read /proc/self/maps ({exc})"
        return None


@contextmanager
def huge_pages(enabled: bool = True) -> Iterator[Collapsed]:
    """Collapse into huge pages the memory that the ``with`` block maps or grows and fills (see the module's docs);
    yields the :class:`Collapsed` it fills in on leaving. Nothing is done where ``enabled`` is false or the block
    raises."""
    result = Collapsed()
    libc = _libc() if enabled else "not asked for"
    if isinstance(libc, str):
        result.reason = libc
    before = None if result.reason else _mappings(result)
    yield result
    if before is not None and (after := _mappings(result)) is not None:
        _collapse(libc, _new_spans(before, after), result)


def zeros(specs: Mapping[str, tuple[Sequence[int], np.dtype]], enabled: bool = True) -> dict[str, np.ndarray]:
    """Zeroed C-contiguous arrays ``{name: array of (shape, dtype)}``, side by side (64-byte aligned) in one private
    anonymous mapping that asks for huge pages where their total is at least :data:`MIN_BYTES` (Linux, ``enabled``);
    each its own ``numpy.zeros`` otherwise. The mapping lives as long as any of the arrays."""
    sizes = {k: int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize for k, (shape, dtype) in specs.items()}
    total = sum(-(-n // 64) * 64 for n in sizes.values())
    if not enabled or total < MIN_BYTES or not sys.platform.startswith("linux"):
        return {k: np.zeros(tuple(shape), dtype) for k, (shape, dtype) in specs.items()}
    area = mmap.mmap(-1, -(-total // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = np.frombuffer(area, np.uint8)  # fresh anonymous pages read as zeros; the arrays hold the mapping
    start = -raw.ctypes.data % HUGE_PAGE  # the first huge-page boundary in the mapping
    try:
        area.madvise(mmap.MADV_HUGEPAGE, start, len(area) - start - (len(area) - start) % HUGE_PAGE)
    except OSError:  # a kernel without transparent huge pages: small pages serve as well
        pass
    out = {}
    for k, (shape, dtype) in specs.items():
        out[k] = raw[start:start + sizes[k]].view(dtype).reshape(tuple(shape))
        start += -(-sizes[k] // 64) * 64
    return out
