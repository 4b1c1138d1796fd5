"""Where pool states live: in this process, or in memcached shared by several servers."""

from distributex.backend.base import Backend, BackendUnavailable, ShuttingDown

__all__ = ["Backend", "BackendUnavailable", "ShuttingDown", "make_backend"]


def make_backend(config, reactor) -> Backend:
    """The backend the configuration names."""
    if config.backend == "memcache":
        from distributex.backend.memcache import MemcacheBackend
        return MemcacheBackend(config, reactor)
    from distributex.backend.memory import InMemoryBackend
    return InMemoryBackend(config.pools, reactor)
