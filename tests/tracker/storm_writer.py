"""A write storm through libnbd: random and sequential writes of many sizes, unaligned
writes, trims, zeroes and flushes, until the server goes away or the process is killed.

usage: storm_writer.py SOCKET SEED SIZE [--aligned] [--count N] [--log FILE]

With --log, every request is appended to FILE as "op offset length" before it is sent.
"""

from __future__ import annotations

import random
import sys

import nbd


def main() -> int:
    sock, seed, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    aligned = "--aligned" in sys.argv
    count = int(sys.argv[sys.argv.index("--count") + 1]) if "--count" in sys.argv else -1
    log = open(sys.argv[sys.argv.index("--log") + 1], "a") if "--log" in sys.argv else None  # noqa: SIM115
    rng = random.Random(seed)
    pool = random.Random(seed ^ 0x5EED).randbytes(4 << 20)
    h = nbd.NBD()
    h.connect_unix(sock)
    sizes = [512, 4096, 4096, 16384, 65536, 65536, 131072, 1 << 20]
    seq = rng.randrange(0, size)
    n = 0
    try:
        while count < 0 or n < count:
            n += 1
            r = rng.random()
            ln = rng.choice(sizes)
            if aligned:
                ln = max(ln, 65536) // 65536 * 65536
                off = rng.randrange(0, size // 65536 - ln // 65536 + 1) * 65536
            else:
                off = rng.randrange(0, (size - ln) // 512 + 1) * 512
            src = rng.randrange(0, len(pool) - ln)
            if r < 0.45:
                op = ("write", off, ln)
            elif r < 0.6:  # sequential stream
                ln = 65536
                seq = (seq // 65536 * 65536 + ln) % (size - ln)
                op = ("write", seq, ln)
            elif r < 0.68 and not aligned:  # unaligned
                ln = rng.randrange(1, 100_000)
                op = ("write", rng.randrange(0, size - ln), ln)
            elif r < 0.78:
                op = ("trim", off, ln)
            elif r < 0.88:
                op = ("zero", off, ln)
            elif r < 0.93:
                op = ("zero-nohole", off, ln)
            else:
                op = ("flush", 0, 0)
            if log is not None:
                log.write(f"{op[0]} {op[1]} {op[2]}\n")
                log.flush()
            kind, off, ln = op
            if kind == "write":
                h.pwrite(pool[src:src + ln], off)
            elif kind == "trim":
                h.trim(ln, off)
            elif kind == "zero":
                h.zero(ln, off)
            elif kind == "zero-nohole":
                h.zero(ln, off, nbd.CMD_FLAG_NO_HOLE)
            else:
                h.flush()
    except nbd.Error:
        return 0  # the server went away (killed): expected
    h.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
