"""No argument vector makes the command print a traceback: a usage error is
one line on stderr and exit status 2 (contract section 7)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from typing import List

import pytest
from clientfixtures import CLIENT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distributex.client import cli

pytestmark = pytest.mark.timeout(120)

OPTIONS = ["-H", "--server", "-r", "--pool", "-p", "--port", "-l", "-t", "--timeout", "-n",
           "-E", "--conflict-exit-code", "--id", "--label", "-g", "--grace", "--auth-file",
           "--cacert", "--cert", "--key", "--", "-"]
VALUES = ["", "0", "1", "65536", "-1", "nan", "inf", "1e999", "2.5", "x", "a,b", "a,,b",
          "unix:", "unix:rel", "unix:/tmp/x.sock", "http://", "https://h:0", "http://[::1",
          "ftp://h", "http://h/p?q", "[::1]:80", "::1", "h:99999", "h:x", "\x00", "é", "\n",
          "--server=", "-H=x", "http://é", "h\x00", "/dev/null", "/nonexistent", "true"]

argument = st.one_of(st.sampled_from(OPTIONS), st.sampled_from(VALUES),
                     st.text(max_size=12))


def parse(argv: List[str]) -> tuple[int | None, str]:
    """parse_args(argv): (None, '') when it parses, else (exit status, stderr)."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            cli.parse_args(argv)
        except SystemExit as exit:
            return (exit.code if isinstance(exit.code, int) else 1), err.getvalue()
    return None, err.getvalue()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(argument, max_size=8))
def test_no_argument_vector_makes_a_traceback(argv: List[str]) -> None:
    status, err = parse(argv)
    assert status in (None, 0, 2), (argv, status, err)
    if status == 2:
        assert err.count("\n") == 1 and err.endswith("\n"), (argv, err)
        assert err.startswith("distributex: "), (argv, err)


@settings(max_examples=200, deadline=None)
@given(st.lists(argument, max_size=6), st.sampled_from(OPTIONS[:-2]), st.sampled_from(VALUES))
def test_with_a_pool_and_a_command_no_option_value_makes_a_traceback(
        argv: List[str], option: str, value: str) -> None:
    status, err = parse(["-r", "p", *argv, option, value, "true"])
    assert status in (None, 0, 2), (argv, option, value, status, err)
    if status == 2:
        assert err.count("\n") == 1, err


@pytest.mark.parametrize("argv", [
    ["-H", "a", "-H", "b", "-r", "p", "true"],
    ["-H", "http://[::1", "-r", "p", "true"],
    ["-H", "unix:relative", "-r", "p", "true"],
    ["-H", "a,,b", "-r", "p", "true"],
    ["-r", "p", "--key", "k", "-H", "h", "true"],
    ["-r", "p", "-H", "h", "--auth-file", "/nonexistent", "true"],
])
def test_usage_errors_of_the_command_are_one_line(argv: List[str]) -> None:
    result = subprocess.run([sys.executable, CLIENT, *argv], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_an_argument_not_in_the_locale_s_encoding_is_no_traceback(tmp_path) -> None:
    # Bytes that are not UTF-8 reach Python as surrogate escapes.
    result = subprocess.run([os.fsencode(sys.executable), os.fsencode(CLIENT),
                             b"-H", b"127.0.0.1:1", b"-t", b"0", b"-r", b"p\xff", b"--id",
                             b"\xfe", b"true"], capture_output=True, timeout=30)
    assert result.returncode in (1, 2)
    assert result.stderr.count(b"\n") == 1 and b"Traceback" not in result.stderr
