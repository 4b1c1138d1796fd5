"""Where pool states live: in this process, or in memcached shared by several servers."""

import time

from distributex.backend.base import Backend, BackendUnavailable, QueueFull, ShuttingDown, WaitReset

__all__ = ["Backend", "BackendUnavailable", "QueueFull", "ShuttingDown", "WaitReset", "make_backend"]


def make_backend(config, reactor) -> Backend:
    """The backend the configuration names."""
    if config.backend == "etcd":
        from distributex.backend.etcd import EtcdBackend
        return EtcdBackend(config, reactor)
    if config.backend == "memcache":
        from distributex.backend.memcache import MemcacheBackend
        return MemcacheBackend(config, reactor)
    from distributex.backend.memory import InMemoryBackend, monotonic_clock
    from distributex.backend.statefile import StateFile

    clock = monotonic_clock()
    state_file = None
    if config.state_file is not None:
        state_file = StateFile(config.state_file, clock, time.time, fsync=config.state_fsync)
    return InMemoryBackend(config.pools, reactor, clock, state_file)
