"""Source side of test_ram_migrate.test_tcp_two_processes, run as its own process.

    python _tcp_source.py tcp:127.0.0.1:PORT '[["name", pages], ...]'

Builds the blocks (numpy, tracked), starts a thread that keeps writing pages,
migrates over tcp the way QEMU's migration thread does, stops the writer
before completing, and prints one JSON line: the sha256 of every block.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import threading
import time

import numpy as np

import savevm
from savevm.channels import open_channel
from savevm.plugins import PluginHost
from savevm.qemufile import QEMUFile
from savevm.save import StreamWriter
from savevm_ram import RAMBlock, RAMList, register_ram

PAGE = 4096


def digests(ram: RAMList) -> dict[str, str]:
    return {b.idstr: hashlib.sha256(b.host[: b.used_length].tobytes()).hexdigest() for b in ram}


def main() -> int:
    uri, layout = sys.argv[1], json.loads(sys.argv[2])
    rng = np.random.default_rng(123)
    ram = RAMList([RAMBlock(name, np.zeros(n * PAGE, np.uint8)) for name, n in layout])
    for b in ram:
        b.host[:] = rng.integers(0, 256, b.used_length, dtype=np.uint8)
        b.host[: 4 * PAGE] = 0  # some zero pages
    initial = digests(ram)
    reg = savevm.SectionRegistry(plugins=PluginHost(load_entrypoints=False))
    h = register_ram(reg, ram)

    stop = threading.Event()
    writes = [0]

    def writer() -> None:
        r = random.Random(7)
        blocks = list(ram)
        while not stop.is_set():
            b = r.choice(blocks)
            off = r.randrange(b.pages) * PAGE + r.randrange(PAGE - 16)
            b.write(off, r.randbytes(16))
            writes[0] += 1
            if writes[0] % 16 == 0:
                time.sleep(0.001)

    f = QEMUFile(open_channel(uri, reg.plugins), writable=True)
    w = StreamWriter(f, reg)
    w.header()
    w.setup()
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    threshold = 32 * PAGE
    iterations = 0
    mark = None
    deadline = time.monotonic() + 30
    while True:
        pending = w.pending(threshold)
        if mark is None and not h.bulk_stage:
            mark = writes[0]
        if pending < threshold and mark is not None and writes[0] - mark > 200:
            break
        w.iterate()
        iterations += 1
        if pending < threshold:
            time.sleep(0.001)  # little to send: let the program run
        if time.monotonic() > deadline:
            print(f"did not converge: {iterations} iterations, {writes[0]} writes", file=sys.stderr)
            return 2
    stop.set()
    t.join()
    w.complete_precopy()
    w.cleanup()
    f.close()
    print(json.dumps({"sha256": digests(ram), "initial_sha256": initial, "writes": writes[0],
                      "iterations": iterations}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
