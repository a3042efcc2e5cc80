"""Run CPU jobs under tcmalloc when it is installed (XLA:CPU and PyTorch alike).

With glibc's malloc, the large buffers XLA:CPU allocates on every step come back as fresh
pages from the kernel: ~5,000 minor page faults per 20 MB array, which made elementwise
ops on [128, 200, 200] ~4x slower than their memory traffic and the HSTU training step
1.8x slower (docs/benchmarks.md). tcmalloc keeps freed pages for reuse.

`reexec_with_tcmalloc()` re-runs the current command once with `LD_PRELOAD` pointing at
tcmalloc when the library is found (Debian/Ubuntu: `apt install libtcmalloc-minimal4`)
and not loaded yet. `LLM4REC_ALLOCATOR=system` keeps the default allocator.
"""

from __future__ import annotations

import os
import sys

LIBRARIES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
SEARCH_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)
ENV_SWITCH = "LLM4REC_ALLOCATOR"


def find_tcmalloc(dirs: tuple[str, ...] = SEARCH_DIRS) -> str | None:
    """Path of an installed tcmalloc shared library, or None."""
    for d in dirs:
        for name in LIBRARIES:
            path = os.path.join(d, name)
            if os.path.exists(path):
                return path
    return None


def active_allocator() -> str:
    """'tcmalloc' when a tcmalloc library is mapped into this process, else 'system'."""
    try:
        with open("/proc/self/maps") as f:
            return "tcmalloc" if "libtcmalloc" in f.read() else "system"
    except OSError:
        return "system"


def reexec_with_tcmalloc() -> None:
    """Replaces this process by the same command under tcmalloc, when that is possible and
    wanted; otherwise returns. Call it first thing in an entrypoint's `__main__` block."""
    if os.environ.get(ENV_SWITCH) == "system" or active_allocator() == "tcmalloc":
        return
    lib = find_tcmalloc()
    if lib is None:
        return
    preload = " ".join(p for p in (lib, os.environ.get("LD_PRELOAD", "")) if p)
    # ENV_SWITCH=system in the child: never re-exec twice, even if the preload fails.
    env = {**os.environ, "LD_PRELOAD": preload, ENV_SWITCH: "system"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
