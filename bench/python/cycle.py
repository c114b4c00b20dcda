"""Times one Python lock's uncontended acquire + release, for
lockbroker-bench: lockbroker's ``Lock``, redis-py's ``Lock`` (the standard
Redis lock: SET NX PX, a Lua script to release) or filelock's ``FileLock``.

    python3 cycle.py KIND TARGET SECONDS

KIND is ``lockbroker`` (TARGET: the daemon's socket), ``redis`` (TARGET:
redis-server's Unix socket), ``filelock`` (TARGET: the lock file) or
``floor``: two round trips of 64 bytes with the harness's echo server
(TARGET: its socket), what the Python client's cycle costs at the least.
Prints one JSON object: ``ops_per_sec`` and ``p50_us``. redis-py and
filelock are needed only for their own KIND; the lockbroker client never
needs them.
"""

import json
import sys
import time


def make(kind, target):
    if kind == "lockbroker":
        import lockbroker

        return lockbroker.Lock("bench/python", lockbroker.Client(target))
    if kind == "redis":
        import redis

        return redis.Redis(unix_socket_path=target).lock("bench:python", timeout=30)
    if kind == "filelock":
        import filelock

        return filelock.FileLock(target)
    if kind == "floor":
        return _Floor(target)
    raise SystemExit("unknown kind %r" % kind)


class _Floor:
    """Two echo round trips per cycle, as acquire and release are."""

    def __init__(self, path):
        import socket

        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.message = b"\x07" * 64

    def _round_trip(self):
        self.sock.sendall(self.message)
        got = 0
        while got < 64:
            got += len(self.sock.recv(64 - got))

    acquire = release = _round_trip


def main():
    kind, target, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    lock = make(kind, target)
    clock = time.perf_counter
    times = []
    start = clock()
    end = start + seconds
    while True:
        t = clock()
        if t >= end:
            break
        lock.acquire()
        lock.release()
        times.append(clock() - t)
    elapsed = clock() - start
    times.sort()
    print(json.dumps({"ops_per_sec": len(times) / elapsed, "p50_us": times[len(times) // 2] * 1e6}))


if __name__ == "__main__":
    main()
