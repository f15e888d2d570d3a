"""Host memory for XLA:CPU: keep what a compiled call frees, so that the next call reuses it.

XLA:CPU allocates each call's temporaries as one buffer and frees it when the call returns.
glibc's malloc serves a block that large with a fresh mmap and returns it with munmap, so every
call touches its temporaries for the first time, page fault by page fault. Kept in the heap, the
block is reused by the next call with no fault at all. On a GPU or TPU the temporaries live in
device memory, so the host's heap is left alone there. Measured: experiments/PERFORMANCE.md.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import pkgutil
import platform

import jax

# mallopt(3) parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8


def is_glibc() -> bool:
    """Whether this process's C library is glibc (whose mallopt this module calls)."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def computes_on_cpu(platforms: str | None = None) -> bool:
    """Whether JAX will compute on the CPU, decided without starting a backend (which starts
    XLA's threads, whose allocations keep_freed_memory must precede): the first of `platforms`
    (default: JAX_PLATFORMS, jax.config.jax_platforms) when it is set; otherwise whether no
    accelerator plugin is installed (a module of the jax_plugins namespace package or
    entry-point group, or libtpu), since JAX prefers an accelerator it finds."""
    if platforms is None:
        platforms = jax.config.jax_platforms
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    if importlib.util.find_spec("libtpu") is not None:
        return False
    if importlib.metadata.entry_points(group="jax_plugins"):
        return False
    spec = importlib.util.find_spec("jax_plugins")
    return spec is None or not any(pkgutil.iter_modules(spec.submodule_search_locations or ()))


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve every allocation from one heap that it never shrinks.

    M_MMAP_MAX = 0: no block gets its own mapping; M_ARENA_MAX = 1: the threads XLA starts
    later allocate from that same heap (another thread's arena maps large blocks regardless);
    M_TRIM_THRESHOLD = -1: freed memory stays in the process. The process then holds its peak
    memory until it exits, and now and then the heap grows by one block, when small allocations
    made between calls have split the freed one. Process-wide: call it once at the start of a
    program, before JAX runs anything. Returns False, changing nothing, where the C library is
    not glibc or JAX will not compute on the CPU (computes_on_cpu)."""
    if not is_glibc() or not computes_on_cpu():
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
    return all(mallopt(param, value) == 1 for param, value in settings)
