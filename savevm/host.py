"""Facts about this machine that defaults follow (how much memory it can still give)."""

from __future__ import annotations


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
