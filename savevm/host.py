"""Facts about this machine that defaults follow (how much memory it can still give, how many CPUs)."""

from __future__ import annotations

import os


def mem_available() -> int | None:
    """``MemAvailable`` from /proc/meminfo in bytes; None where the kernel does not say."""
    try:
        with open("/proc/meminfo", "rb") as fh:
            for line in fh:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
