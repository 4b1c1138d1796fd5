#!/usr/bin/env python3
"""Start-up cost of the distributex command, which every cron run pays.

Times ``distributex -H 127.0.0.1 -r pool true`` against a running server
(a whole run: start, lock, /bin/sh -c true, release, exit), beside
``flock FILE true`` as the floor and ``python -c pass`` run by the very
interpreter of the ``distributex`` script (the one its ``#!`` line names,
so with the same site and the same .pth files), so that what the wrapper
itself adds is told apart from what Python costs on the machine. The same
interpreter importing only argparse and socket shows the floor under any
client that parses its arguments with the standard library and speaks over
a socket. With hyperfine when it is installed, else repeated runs and their
median.

    python bench/bench_client.py [--runs 60] [--no-hyperfine]

Exit status 0 when the wrapper's median is within 15 ms of the
interpreter's (issue 13), 2 when it is not.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    ROOT,
    Processes,
    Server,
    add_quiet_option,
    print_header,
    python_script,
    wait_quiet,
)

POOL = "bench"
#: What the wrapper may add to its interpreter's own start (issue 13).
TARGET = 0.015
ROUNDS = 6  # hyperfine batches, interleaved (see with_hyperfine)
WRAPPER_IMPORTS = "import distributex.client.cli, distributex.client.locker"
#: What any client parsing its arguments with argparse and speaking over a
#: socket imports, whatever else it does: the floor under the wrapper's own.
LIBRARY_FLOOR = "import argparse, socket"


def script_python(script: str) -> str:
    """The interpreter a console script runs on: its #! line."""
    with open(script, "rb") as f:
        first = f.readline().decode().strip()
    if not first.startswith("#!") or " " in first[2:].strip():
        raise SystemExit(f"{script}: expected a '#!/path/to/python' line, found {first!r}")
    return first[2:].strip()


def commands(port: int, lock_file: str) -> List[Tuple[str, List[str]]]:
    """(name, argv) of every command timed: the floors, then the wrapper."""
    dx = python_script("distributex")
    python = script_python(dx)
    server = ["-H", "127.0.0.1", "-p", str(port), "-r", POOL]
    return [
        ("flock FILE true (the floor)", ["flock", lock_file, "true"]),
        ("python -c pass (the wrapper's python)", [python, "-c", "pass"]),
        ("python: argparse and socket alone", [python, "-c", LIBRARY_FLOOR]),
        ("python: the wrapper's imports", [python, "-c", WRAPPER_IMPORTS]),
        ("distributex -H ... true", [dx, *server, "true"]),
        ("distributex -l -H ... true", [dx, "-l", *server, "true"]),
        ("distributex -l true (local only)", [dx, "-l", "-r", POOL, "true"]),
    ]


def with_hyperfine(runs: int, argvs: List[List[str]], export: str) -> List[float]:
    """Median seconds of each command, as hyperfine measured them.

    In rounds of a few runs of every command, so that a burst of other work
    on the machine spreads over all the commands instead of skewing one.
    """
    samples: Dict[int, List[float]] = {i: [] for i in range(len(argvs))}
    per_round = max(1, runs // ROUNDS)
    for round_ in range(ROUNDS):
        subprocess.run(["hyperfine", "-N", "--style", "none", "--runs", str(per_round),
                        "--warmup", "3" if round_ == 0 else "1", "--export-json", export,
                        *[subprocess.list2cmdline(a) for a in argvs]],
                       check=True, stdout=subprocess.DEVNULL)
        with open(export) as f:
            for i, result in enumerate(json.load(f)["results"]):
                samples[i].extend(result["times"])
    return [statistics.median(samples[i]) for i in range(len(argvs))]


def by_hand(runs: int, argvs: List[List[str]]) -> List[float]:
    """Median seconds of each command over ``runs`` runs, interleaved."""
    samples: Dict[int, List[float]] = {i: [] for i in range(len(argvs))}
    for round_ in range(runs + 5):
        for i, argv in enumerate(argvs):
            started = time.perf_counter()
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
            if round_ >= 5:  # the first rounds warm the caches
                samples[i].append(time.perf_counter() - started)
    return [statistics.median(samples[i]) for i in range(len(argvs))]


def import_costs(python: str) -> List[str]:
    """The heaviest imports of the wrapper's path (python -X importtime)."""
    result = subprocess.run([python, "-X", "importtime", "-c",
                             WRAPPER_IMPORTS], capture_output=True, text=True, check=True)
    rows = []
    for line in result.stderr.splitlines():
        fields = line.split("|")
        if len(fields) == 3 and fields[1].strip().isdigit():
            rows.append((int(fields[1]), fields[2].rstrip()))
    top = [r for r in rows if not r[1].startswith("  ")]  # top-level imports only
    return [f"  {us / 1000:6.1f} ms  {name.strip()}" for us, name in sorted(top, reverse=True)[:8]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=60, help="runs of each command (default 60)")
    parser.add_argument("--no-hyperfine", action="store_true",
                        help="time repeated runs by hand even where hyperfine is installed")
    add_quiet_option(parser)
    args = parser.parse_args()
    quiet = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
    # pip byte-compiles an installed package; a checkout run without write
    # access (or with PYTHONDONTWRITEBYTECODE) would compile on every start.
    compileall.compile_dir(os.path.join(ROOT, "distributex"), quiet=1)
    use_hyperfine = shutil.which("hyperfine") is not None and not args.no_hyperfine

    with Processes() as procs:
        os.environ["DISTRIBUTEX_LOCK_DIR"] = os.path.join(procs.dir, "locks")
        server = Server(procs, [{"name": POOL, "expire": 300}], {})
        named = commands(server.port, os.path.join(procs.dir, "flock"))
        print_header("distributex client start-up: one whole wrapped run of `true`", [
            f"server: twistd on 127.0.0.1:{server.port}, in-memory backend",
            f"timing: {'hyperfine' if use_hyperfine else 'repeated runs'}, median of "
            f"{args.runs} runs each, in interleaved rounds",
        ] + ([quiet] if quiet else []))
        argvs = [argv for _, argv in named]
        medians = (with_hyperfine(args.runs, argvs, os.path.join(procs.dir, "hyperfine.json"))
                   if use_hyperfine else by_hand(args.runs, argvs))
        server.stop()

    for (name, _), median in zip(named, medians):
        print(f"{name:<38} {median * 1000:7.1f} ms")
    print("heaviest top-level imports of the wrapper's path (python -X importtime):")
    print("\n".join(import_costs(named[1][1][0])))
    interpreter, libraries, wrapper = medians[1], medians[2], medians[4]
    beyond = wrapper - interpreter
    verdict = "PASS" if beyond <= TARGET else "FAIL"
    print(f"target: distributex -H ... true within {TARGET * 1000:g} ms of python -c pass: {verdict} "
          f"({beyond * 1000:.1f} ms beyond it; {wrapper * 1000:.1f} ms in all, the interpreter "
          f"alone {interpreter * 1000:.1f} ms; argparse and socket alone "
          f"{(libraries - interpreter) * 1000:.1f} ms beyond it)")
    return 0 if beyond <= TARGET else 2


if __name__ == "__main__":
    sys.exit(main())
