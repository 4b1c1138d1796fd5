"""The critical section of a chaos run (bench/chaos.py): run by the real
``distributex`` wrapper once it holds the lock.

    distributex ... -- python -S bench/chaos_record.py RUNDIR HOLD_SECONDS

It records, one JSON line per step, in ``RUNDIR/records/CLIENT.jsonl``:

- ``start``: pool, token (``DISTRIBUTEX_TOKEN``), holder, pid, and the
  time (``time.monotonic()``: one clock for every process of the machine,
  so sections of different processes compare);
- ``probe`` (twice, at the start and just before the write): what the
  server the wrapper used says of this holder in ``/status/`` (held or
  not, since when, its token): the server's testimony, for the report;
- ``end``: when the section ended and how: ``accepted`` or ``refused`` by
  the fenced resource, or ``terminated`` (SIGTERM from the wrapper, which
  lost the lock: a careful command stops and writes nothing).

The fenced resource is ``RUNDIR/resource/POOL``: under ``flock`` it keeps
the highest token it has accepted and refuses a write whose token is lower
(an equal one is the same grant again and passes: two sections with one
token are caught by the checker instead). The write is the last thing the
section does, so a section's interval is [start, write done].

Standard library only, run with ``python -S``: the section starts in about
20 ms after the grant.
"""

import fcntl
import json
import os
import signal
import socket
import sys
import time

RECORDS = "records"
RESOURCE = "resource"
#: A /status/ probe that takes longer than this (a stopped or killed
#: server) is given up: the section must not wait on the server.
PROBE_TIMEOUT = 1.0


def main():
    rundir, hold = sys.argv[1], float(sys.argv[2])
    env = os.environ
    rec = {
        "run": env.get("CHAOS_RUN", "?"),
        "client": env.get("CHAOS_CLIENT", "?"),
        "pool": env.get("DISTRIBUTEX_POOL", "?"),
        "token": int(env.get("DISTRIBUTEX_TOKEN") or 0),
        "host": env.get("DISTRIBUTEX_HOST", ""),
        "pid": os.getpid(),
    }
    path = os.path.join(rundir, RECORDS, rec["client"] + ".jsonl")
    out = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    state = {"done": False}

    def emit(**fields):
        line = dict(rec, **fields)
        os.write(out, (json.dumps(line, separators=(",", ":")) + "\n").encode())

    def on_term(signum, frame):
        if not state["done"]:
            state["done"] = True
            emit(ev="end", t=time.monotonic(), status="terminated", signal=signum)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, on_term)
    emit(ev="start", t=time.monotonic(), w=time.time(), hold=hold,
         launch=float(env.get("CHAOS_LAUNCH") or 0), port=int(env.get("CHAOS_PORT") or 0))

    port = int(env.get("CHAOS_PORT") or 0)
    emit(ev="probe", at="start", **probe(port, rec["pool"], rec["host"], rec["token"]))
    time.sleep(hold)
    emit(ev="probe", at="end", **probe(port, rec["pool"], rec["host"], rec["token"]))

    # The write and its record are not cut by SIGTERM: a write happens
    # whole or not at all, and its verdict is always recorded.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    status, high = fenced_write(rundir, rec["pool"], rec["token"], rec["run"])
    state["done"] = True
    emit(ev="end", t=time.monotonic(), status=status, high=high)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    os._exit(0)


def fenced_write(rundir, pool, token, run):
    """Write to the pool's resource unless a higher token was accepted: (verdict, highest before)."""
    fd = os.open(os.path.join(rundir, RESOURCE, pool), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        data = os.pread(fd, 4096, 0).split()
        high, accepted, refused = (int(x) for x in (data or [b"0", b"0", b"0"]))
        if token >= high:
            status, accepted, new_high = "accepted", accepted + 1, token
        else:
            status, refused, new_high = "refused", refused + 1, high
        body = f"{new_high} {accepted} {refused}\n".encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, body, 0)
        with open(os.path.join(rundir, RESOURCE, pool + ".log"), "a") as log:
            log.write(f"{time.monotonic():.6f} {token} {status} {run} high={high}\n")
        return status, high
    finally:
        os.close(fd)  # releases the flock


def probe(port, pool, host, token):
    """/status/ of the pool as the server sees it: is this holder there?"""
    t = time.monotonic()
    try:
        body = http_get(port, f"/status/?pool={pool}&format=json")
        state = json.loads(body)["pools"][0]
    except (OSError, ValueError, KeyError, IndexError) as e:
        return {"t": t, "result": "error", "error": f"{type(e).__name__}: {e}"[:120],
                "took": round(time.monotonic() - t, 4)}
    mine = [h for h in state.get("holders", []) if h.get("host") == host]
    others = [h.get("token") for h in state.get("holders", []) if h.get("host") != host]
    out = {"t": t, "took": round(time.monotonic() - t, 4), "others": others}
    if not mine:
        out["result"] = "absent"
    else:
        h = mine[0]
        out.update(result="held" if h.get("token") == token else "other-token",
                   server_token=h.get("token"), held_for=h.get("held_for"),
                   expires_in=h.get("expires_in"))
    return out


def http_get(port, path):
    with socket.create_connection(("127.0.0.1", port), timeout=PROBE_TIMEOUT) as s:
        s.settimeout(PROBE_TIMEOUT)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/json\r\n"
                  f"Connection: close\r\n\r\n".encode())
        chunks = []
        deadline = time.monotonic() + PROBE_TIMEOUT
        while True:
            if time.monotonic() > deadline:
                raise OSError("status answer too slow")
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1] if head else b"?"
    if status != b"200":
        raise OSError(f"status answered {status.decode(errors='replace')}")
    if b"chunked" in head.lower():
        body = dechunk(body)
    return body


def dechunk(body):
    out = []
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out.append(rest[:size])
        body = rest[size + 2:]
    return b"".join(out)


if __name__ == "__main__":
    main()
