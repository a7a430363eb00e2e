"""Host memory that the CPU streams every decoded token: weights, expert rows, the KV cache.

A decoded token on the CPU reads every weight once (26B-A4B: 5.6 GB), so it is bound by how fast a
core streams memory, and with 4 KiB pages that stream also walks the page tables: one TLB miss every
4 KiB. Where Linux offers transparent huge pages on request (`/sys/kernel/mm/transparent_hugepage/
enabled` = madvise, a common default; with "always" every large allocation gets them anyway), a
tensor allocated here is advised MADV_HUGEPAGE before its pages are first touched, so they come as
2 MiB pages. On one Zen 5 core lm_head's GEMV (1.48 GB) read at 32 GB/s instead of 30, on two 64
instead of 60 (docs/cpu/2026-11-27-epyc-zen5-26b-a4b.md). The advice is a hint: where it is refused
(another OS, THP off, no libc) the tensor is an ordinary one. LOCALRUN_HUGE_PAGES=0 turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import itertools
import mmap
import os
import sys

import torch

HUGE_MIN_BYTES = 2 << 20  # one 2 MiB page; smaller tensors stay with torch's allocator
_PAGE = 4096
_MADV_HUGEPAGE = 14  # linux/mman.h
_COLORS = 16  # start offsets before a 2 MiB boundary, in pages: 16 x 4 KiB spans the sets of a 1 MiB, 16-way L2
_colors = itertools.count()


def enabled() -> bool:
    return sys.platform.startswith("linux") and os.environ.get("LOCALRUN_HUGE_PAGES", "1").strip().lower() not in (
        "0", "false", "no", "off")


@functools.lru_cache(maxsize=None)
def _libc_function(name: str, argtypes: tuple, restype):
    """A function of the C library (madvise, malloc_trim), or None where there is none (not glibc)."""
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = list(argtypes), restype
    return fn


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Advise MADV_HUGEPAGE over the whole pages of a CPU tensor's memory; whether the kernel took it.
    Pages already touched stay as they are (khugepaged may merge them later): call it before writing."""
    if t.device.type != "cpu" or t.nbytes < HUGE_MIN_BYTES or not enabled():
        return False
    fn = _libc_function("madvise", (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int)
    if fn is None:
        return False
    start = (t.data_ptr() + _PAGE - 1) & ~(_PAGE - 1)
    end = (t.data_ptr() + t.nbytes) & ~(_PAGE - 1)
    return end > start and fn(start, end - start, _MADV_HUGEPAGE) == 0


def empty(*shape, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """torch.empty, on the CPU in huge pages where the kernel gives them (see the module docstring).

    A large CPU tensor is its own anonymous mapping (mmap), untouched until written: memory from
    torch's allocator may be heap pages an earlier tensor already touched, which the advice no longer
    changes. The tensor starts a few pages (0-15, no more than its size past whole 2 MiB) before a 2 MiB
    boundary, so it holds as many whole huge pages as it can (from a mapping's 4 KiB-aligned start, a
    3.5 MiB tensor may hold none); those pages differ from tensor to tensor, since tensors that all
    started on a boundary would share their cache sets where a kernel streams several at once (decode
    5% slower on the bench model). The mapping is unmapped when the last tensor over it is freed."""
    size = torch.Size(shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape)
    nbytes = size.numel() * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes < HUGE_MIN_BYTES or not enabled():
        return torch.empty(size, dtype=dtype, device=device)
    # pages before the first 2 MiB boundary (see the docstring): at most the part past whole 2 MiB
    color = min(next(_colors) % _COLORS * _PAGE, nbytes % HUGE_MIN_BYTES // _PAGE * _PAGE)
    try:  # anonymous, not shared memory; HUGE_MIN_BYTES more to place it as below (never touched)
        buf = mmap.mmap(-1, nbytes + HUGE_MIN_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:  # refused (memory limits, map count): torch's allocator, and its own error if it fails too
        return torch.empty(size, dtype=dtype, device=device)
    offset = (-torch.frombuffer(buf, dtype=torch.uint8, count=1).data_ptr() - color) % HUGE_MIN_BYTES
    t = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset).view(dtype).view(size)
    advise_huge_pages(t)
    return t


def keep(t: torch.Tensor, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """t.to(device, dtype) for a tensor that stays (a weight read from a checkpoint): a large one kept on
    the CPU is copied into huge pages (`empty`); the read it came from is a temporary."""
    if torch.device(device).type == "cpu" and t.nbytes >= HUGE_MIN_BYTES and enabled():
        return empty(t.shape, dtype=dtype).copy_(t)
    return t.to(device=device, dtype=dtype)


def zeros(*shape, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """torch.zeros, the pages advised before the zeros touch them."""
    return empty(*shape, dtype=dtype, device=device).zero_()


def release_freed() -> bool:
    """Hand the C heap's free memory back to the system (glibc's malloc_trim): the temporaries of a
    load (a checkpoint tensor read in one dtype and kept in another, a chunk of experts) that the
    kept tensors, in mappings of their own here, no longer reuse. Whether it ran (glibc only)."""
    trim = _libc_function("malloc_trim", (ctypes.c_size_t,), ctypes.c_int)
    if trim is None:
        return False
    trim(0)
    return True
