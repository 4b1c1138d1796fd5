"""The Twisted flavour (TxLocker) against the real server, on the reactor."""

from __future__ import annotations

import tempfile
from typing import Any, Generator

from clientfixtures import SHORT, assert_pool_free, held_by, hosts, release, start_dx, steal
from servers import free_port
from twisted.internet import reactor, task
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.trial import unittest

from distributex.client.errors import LockBusy, LockLost, LockTimeout, ServerUnreachable
from distributex.client.txlocker import TxLocker


class TxLockerTests(unittest.TestCase):
    timeout = 20
    server: Any = None

    @classmethod
    def setUpClass(cls) -> None:
        cls.server = start_dx(tempfile.mkdtemp(prefix="dx-tx-"))

    @classmethod
    def tearDownClass(cls) -> None:
        cls.server.kill()

    def locker(self, host: str) -> TxLocker:
        return TxLocker(self.server.url, reactor, host=host)

    @inlineCallbacks
    def test_acquire_and_release(self) -> Generator[Deferred[Any], Any, None]:
        held = yield self.locker("tx1").acquire("tx", label="twisted")
        [holder] = self.server.status("tx")["holders"]
        self.assertEqual((holder["host"], holder["label"], holder["token"]),
                         ("tx1", "twisted", held.token))
        yield held.release()
        yield held.release()  # a second time does nothing
        assert_pool_free(self.server, "tx")

    @inlineCallbacks
    def test_timeout_and_nowait(self) -> Generator[Deferred[Any], Any, None]:
        with held_by(self.server, "tx-busy"):
            started = reactor.seconds()
            yield self.assertFailure(self.locker("me").acquire("tx-busy", timeout=0.3),
                                     LockTimeout)
            self.assertGreaterEqual(reactor.seconds() - started, 0.3)
            yield self.assertFailure(self.locker("me").acquire("tx-busy", nowait=True),
                                     LockBusy)
            self.assertEqual(hosts(self.server, "tx-busy", "waiters"), [])
        assert_pool_free(self.server, "tx-busy")

    @inlineCallbacks
    def test_cancelling_a_wait_leaves_the_queue(self) -> Generator[Deferred[Any], Any, None]:
        with held_by(self.server, "tx-busy"):
            waiting = self.locker("patient").acquire("tx-busy")
            yield task.deferLater(reactor, 0.3, lambda: None)
            self.assertEqual(hosts(self.server, "tx-busy", "waiters"), ["patient"])
            waiting.cancel()
            yield self.assertFailure(waiting, CancelledError)
            yield task.deferLater(reactor, 0.3, lambda: None)
            self.assertEqual(hosts(self.server, "tx-busy", "waiters"), [])
        assert_pool_free(self.server, "tx-busy")

    def test_unreachable(self) -> Deferred[Any]:
        locker = TxLocker(f"http://127.0.0.1:{free_port()}", reactor, host="me")
        return self.assertFailure(locker.acquire("tx", timeout=0.5), ServerUnreachable)

    @inlineCallbacks
    def test_a_lost_lock_fires_when_lost(self) -> Generator[Deferred[Any], Any, None]:
        held = yield self.locker("victim").acquire("tx-lost")
        steal(self.server, "tx-lost", "victim")
        reason = yield held.when_lost()
        self.assertIn("answered NO", reason)
        self.assertTrue(held.lost)
        self.assertRaises(LockLost, held.check)
        yield held.release()
        self.assertEqual(hosts(self.server, "tx-lost"), ["thief"])
        release(self.server, "tx-lost", "thief")
        assert_pool_free(self.server, "tx-lost")

    @inlineCallbacks
    def test_the_lease_is_renewed(self) -> Generator[Deferred[Any], Any, None]:
        held = yield self.locker("slow").acquire("tx-run")
        yield task.deferLater(reactor, 2 * SHORT, lambda: None)
        self.assertFalse(held.lost)
        self.assertEqual(hosts(self.server, "tx-run"), ["slow"])
        yield held.release()
        assert_pool_free(self.server, "tx-run")

    @inlineCallbacks
    def test_run_locked_returns_the_result(self) -> Generator[Deferred[Any], Any, None]:
        tokens = []

        def work(held: Any) -> Deferred[str]:
            tokens.append(held.token)
            return task.deferLater(reactor, 0.1, lambda: "done")

        result = yield self.locker("worker").run_locked("tx", work)
        self.assertEqual(result, "done")
        self.assertEqual(len(tokens), 1)
        assert_pool_free(self.server, "tx")

    @inlineCallbacks
    def test_run_locked_cancels_work_when_the_lock_is_lost(
            self) -> Generator[Deferred[Any], Any, None]:
        cancelled = []

        def work(held: Any) -> Deferred[None]:
            steal(self.server, "tx-run", "victim")
            return Deferred(cancelled.append)  # would never end by itself

        failure = yield self.assertFailure(self.locker("victim").run_locked("tx-run", work),
                                           LockLost)
        self.assertIn("answered NO", str(failure))
        self.assertEqual(len(cancelled), 1)
        self.assertEqual(hosts(self.server, "tx-run"), ["thief"])
        release(self.server, "tx-run", "thief")
        assert_pool_free(self.server, "tx-run")

    @inlineCallbacks
    def test_run_locked_releases_when_the_work_fails(
            self) -> Generator[Deferred[Any], Any, None]:
        def work(held: Any) -> None:
            raise ValueError("broken")

        yield self.assertFailure(self.locker("worker").run_locked("tx", work), ValueError)
        assert_pool_free(self.server, "tx")
