"""The blocking Python API (Locker) against the real server: what only it
has (a context manager, loss callbacks, a renewal thread). What both flavours
share is in test_client_drivers.py."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from clientfixtures import (  # noqa: F401  (dx_server: the fixture dx)
    SHORT,
    assert_pool_free,
    dx_server,
    hosts,
    release,
    steal,
)

from distributex.client import InvalidRequest, Locker, LockLost

pytestmark = pytest.mark.timeout(30)


def test_lock_holds_the_pool_inside_the_block_only(dx):
    locker = Locker(dx.url, host="api1")
    with locker.lock("api", label="nightly backup") as held:
        [holder] = dx.status("api")["holders"]
        assert (holder["host"], holder["label"], holder["token"]) == (
            "api1", "nightly backup", held.token)
        assert held.expire == 300 and not held.lost.is_set()
        held.check()
    assert_pool_free(dx, "api")


def test_each_grant_has_a_larger_fencing_token(dx):
    locker = Locker(dx.url)
    with locker.lock("api", host="first") as first:
        pass
    with locker.lock("api", host="second") as second:
        pass
    assert second.token > first.token
    assert_pool_free(dx, "api")


def test_the_default_identity_is_the_fqdn(dx):
    with Locker(dx.url).lock("api") as held:
        assert held.host == socket.getfqdn()
        assert hosts(dx, "api") == [held.host]
    assert_pool_free(dx, "api")


def test_a_waiter_gets_the_lock_when_the_holder_leaves(dx):
    locker = Locker(dx.url)
    holder = locker.lock("api", host="holder")
    threading.Timer(0.3, holder.release).start()
    started = time.monotonic()
    with locker.lock("api", host="waiter", timeout=10):
        assert hosts(dx, "api") == ["waiter"]
    assert 0.25 < time.monotonic() - started < 5
    assert_pool_free(dx, "api")


def test_a_refused_request_says_why(dx):
    with pytest.raises(InvalidRequest) as refused:
        Locker(dx.url, host="me").lock("no-such-pool")
    assert (refused.value.status, refused.value.reason) == (404, "unknown pool 'no-such-pool'")


def test_a_lock_lost_inside_the_block_is_detected(dx):
    locker = Locker(dx.url, host="victim")
    with pytest.raises(LockLost, match="answered NO"):
        with locker.lock("api-lost") as held:
            steal(dx, "api-lost", "victim")
            assert held.lost.wait(SHORT + 2)
            assert "answered NO" in str(held.lost_reason)
            with pytest.raises(LockLost):
                held.check()
    assert hosts(dx, "api-lost") == ["thief"]
    release(dx, "api-lost", "thief")
    assert_pool_free(dx, "api-lost")


def test_loss_callbacks_run_once_lost(dx):
    held = Locker(dx.url, host="victim").lock("api-lost")
    reasons: list[str] = []
    held.on_lost(reasons.append)
    steal(dx, "api-lost", "victim")
    assert held.lost.wait(SHORT + 2)
    held.on_lost(reasons.append)  # already lost: called at once
    assert len(reasons) == 2 and reasons[0] == reasons[1] == held.lost_reason
    held.release()
    release(dx, "api-lost", "thief")
    assert_pool_free(dx, "api-lost")


def test_a_lease_that_never_expires_is_not_renewed(dx):
    with Locker(dx.url, host="steady").lock("forever") as held:
        assert held.expire == 0
        assert [t for t in threading.enumerate() if "renewal" in t.name] == []
    assert_pool_free(dx, "forever")


def test_release_all_releases_every_lock_not_released_yet(dx):
    locker = Locker(dx.url, host="many")
    first, second = locker.lock("api"), locker.lock("api-busy")
    second.release()
    locker.release_all()
    assert first.released and not first.lost.is_set()
    assert_pool_free(dx, "api")
    assert_pool_free(dx, "api-busy")
    locker.release_all()  # nothing left: nothing sent
