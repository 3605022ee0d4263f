"""A client of the key-value service that follows it when it moves, and a load generator.

``KVClient`` sends one request at a time; on ``MOVED host:port`` (the old
server handed the state over) or a dropped connection it reconnects --
to the address it was given, else to the next known server -- and sends
the same request again.  A request that got no answer was never applied
(the service holds it at its gate and redirects it), so the retry cannot
apply a write twice.

``python client.py --servers HOST:PORT[,HOST:PORT] --seconds 5`` runs a
load and prints what it saw.
"""

from __future__ import annotations

import argparse
import random
import socket
import threading
import time


class KVClient:
    """One connection that survives the service's migration."""

    def __init__(self, servers: list[str], timeout: float = 30.0) -> None:
        self.servers = list(servers)
        self.timeout = timeout
        self.current = self.servers[0]
        self._sock: socket.socket | None = None
        self._rfile: object = None
        self.moves = 0

    def _connect(self) -> None:
        host, _, port = self.current.rpartition(":")
        self._sock = socket.create_connection((host, int(port)), timeout=self.timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._rfile = self._sock.makefile("rb")

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None

    def request(self, line: str) -> str:
        """Send one request; returns the answer line, following MOVED and reconnecting as needed."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                if self._sock is None:
                    self._connect()
                assert self._sock is not None
                self._sock.sendall((line + "\n").encode())
                reply = self._rfile.readline().decode().strip()  # type: ignore[attr-defined]
                if not reply:
                    raise ConnectionError("server closed the connection")
            except OSError:
                self._drop()
                if time.monotonic() > deadline:
                    raise
                # that server is gone or not ready: try the next one we know
                i = self.servers.index(self.current) if self.current in self.servers else -1
                self.current = self.servers[(i + 1) % len(self.servers)]
                time.sleep(0.005)
                continue
            if reply.startswith("MOVED "):
                self._drop()
                self.current = reply.split(" ", 1)[1]
                self.moves += 1
                continue
            return reply

    def set(self, key: str, value: str) -> int:
        """SET; returns the write's sequence number once acknowledged."""
        reply = self.request(f"SET {key} {value}")
        if not reply.startswith("OK "):
            raise RuntimeError(f"SET {key}: {reply}")
        return int(reply.split()[1])

    def get(self, key: str) -> str | None:
        """GET; None when the key is absent."""
        reply = self.request(f"GET {key}")
        if reply == "NONE":
            return None
        if not reply.startswith("VALUE "):
            raise RuntimeError(f"GET {key}: {reply}")
        return reply[6:]

    def close(self) -> None:
        """Close the connection."""
        self._drop()


class Worker(threading.Thread):
    """Writes unique keys (and reads some back) as fast as ``interval`` allows; records every latency."""

    def __init__(self, wid: int, servers: list[str], stop: threading.Event, interval: float = 0.001) -> None:
        super().__init__(name=f"kv-client-{wid}", daemon=True)
        self.wid = wid
        self.client = KVClient(servers)
        self.stop_event = stop
        self.interval = interval
        #: key -> value, for every write the service acknowledged
        self.acked: dict[str, str] = {}
        #: (start, latency seconds) of every request
        self.latencies: list[tuple[float, float]] = []
        self.stale_reads = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        rng = random.Random(self.wid)
        n = 0
        try:
            while not self.stop_event.is_set():
                t0 = time.monotonic()
                if self.acked and rng.random() < 0.2:
                    key = f"c{self.wid}-{rng.randrange(n)}"
                    if key in self.acked and self.client.get(key) != self.acked[key]:
                        self.stale_reads += 1
                else:
                    key, value = f"c{self.wid}-{n}", f"v{n}-{rng.getrandbits(64):016x}"
                    self.client.set(key, value)
                    self.acked[key] = value  # only now is it acknowledged
                    n += 1
                self.latencies.append((t0, time.monotonic() - t0))
                if self.interval:
                    time.sleep(self.interval)
        except BaseException as exc:  # reported by the caller
            self.error = exc
        finally:
            self.client.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--servers", required=True, help="HOST:PORT[,HOST:PORT...], the first is used first")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    stop = threading.Event()
    workers = [Worker(i, args.servers.split(","), stop) for i in range(args.clients)]
    for w in workers:
        w.start()
    time.sleep(args.seconds)
    stop.set()
    for w in workers:
        w.join()
    lat = sorted(x for w in workers for _, x in w.latencies)
    print(f"{len(lat)} requests, {sum(len(w.acked) for w in workers)} acknowledged writes, "
          f"max latency {max(lat) * 1000:.1f} ms, moves {sum(w.client.moves for w in workers)}")
    return 1 if any(w.error for w in workers) else 0


if __name__ == "__main__":
    raise SystemExit(main())
