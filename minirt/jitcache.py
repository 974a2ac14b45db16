"""Numba's on-disk cache for minirt's kernels, kept in the user cache (home()/numba), never inside the package.

Numba's default puts compiled kernels in the package's __pycache__: inside site-packages that outlives an
uninstall (and then shadows an editable install as an empty namespace package), and each install path gets
its own copy. Here a kernel's cache entry is keyed by its module's path *within minirt* and the module's
content (Numba's source stamp is a hash of the file), so every install of the same code shares one compiled
copy; the CPU and Numba version are part of Numba's own key. The stamp also hashes minirt/cpu's sources
(kernel_sources_digest): a kernel inlines intrinsics and kernels of other files, which Numba does not track.
Imported by minirt/__init__ before any kernel.
The folder is home()/numba, or NUMBA_CACHE_DIR where that is set (Numba's own variable), fixed at import.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from numba.core import caching

from .home import home

_PACKAGE = Path(__file__).resolve().parent
_ROOT: list[Path] = []  # the kernel cache folder, fixed when minirt is imported (MINIRT_HOME at that time)
_KERNELS: list[str] = []  # the digest of minirt/cpu's sources, computed once


def kernel_sources_digest() -> str:
    """A hash of every module under minirt/cpu: the kernels' intrinsics (isa.py) and the kernels other kernels
    call live there, and Numba compiles them into each caller's cache entry without noting the dependency."""
    if not _KERNELS:
        h = hashlib.sha256()
        for path in sorted((_PACKAGE / "cpu").glob("*.py")):
            h.update(path.name.encode() + b"\0" + path.read_bytes())
        _KERNELS.append(h.hexdigest())
    return _KERNELS[0]


class MinirtCacheLocator(caching.UserProvidedCacheLocator):
    def __init__(self, py_func, py_file):
        super().__init__(py_func, py_file)
        rel = Path(py_file).resolve().parent.relative_to(_PACKAGE.parent)
        self._cache_path = os.path.join(_ROOT[0], *rel.parts)

    def get_source_stamp(self):
        """The function's file, and minirt/cpu's sources: an entry compiled against an older isa.py (or any
        kernel it inlines) is stale even where its own file did not change."""
        return super().get_source_stamp(), kernel_sources_digest()

    @classmethod
    def from_function(cls, py_func, py_file):
        if not Path(py_file).resolve().is_relative_to(_PACKAGE):
            return None
        # the source-file mixin: checks the file exists and the cache folder is writable
        return super(caching.UserProvidedCacheLocator, cls).from_function(py_func, py_file)


def kernel_dir() -> Path:
    return _ROOT[0]


def install() -> None:
    if not _ROOT:
        _ROOT.append(Path(os.environ.get("NUMBA_CACHE_DIR") or home() / "numba"))
    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl  # renamed in Numba 0.61
    classes = impl._locator_classes
    if MinirtCacheLocator not in classes:
        classes.insert(0, MinirtCacheLocator)


def release_compiler_pages() -> int:
    """Drop LLVM's code pages (libllvmlite.so, ~60-70 MB touched when Numba loads kernels from its cache) and
    malloc's free memory from this process's resident set; returns the bytes of mappings released. Only
    read-only mappings that hold no private (copied-on-write) page are released: their pages are the file's,
    and fault back in from it if LLVM runs again (a kernel compiled or loaded later). Linux only; elsewhere,
    or where /proc or libc cannot be read, nothing is done."""
    import ctypes
    import re
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        smaps = open("/proc/self/smaps").read()
    except OSError:
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released = 0
    for m in re.finditer(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) .*?libllvmlite[^\n]*\n((?:[A-Z][^\n]*\n)+)", smaps, re.M):
        anon = re.search(r"^Anonymous:\s+(\d+)", m.group(4), re.M)
        if "w" in m.group(3) or anon is None or int(anon.group(1)) != 0:
            continue
        a, b = int(m.group(1), 16), int(m.group(2), 16)
        if libc.madvise(a, b - a, 4) == 0:  # MADV_DONTNEED: clean file pages leave the resident set
            released += b - a
    try:
        libc.malloc_trim(0)
    except AttributeError:  # not glibc
        pass
    return released
