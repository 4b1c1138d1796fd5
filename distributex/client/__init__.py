"""The distributex client: a command wrapper and a Python locking API.

``from distributex.client import Locker`` gives the blocking API
(:mod:`.locker`); ``TxLocker`` is its Deferred-returning twin for Twisted
programs (:mod:`.txlocker`). Both are imported on first use, so that the
``distributex`` command, which imports this package, starts fast and
without Twisted.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # importing typing would slow the wrapper's start; mypy sees True.
if TYPE_CHECKING:
    from distributex.client.errors import (
        DistributexError,
        InvalidRequest,
        LockBusy,
        LockLost,
        LockNotObtained,
        LockTimeout,
        ProtocolError,
        ServerError,
        ServerUnreachable,
    )
    from distributex.client.locker import HeldLock, Locker
    from distributex.client.txlocker import TxHeldLock, TxLocker

_EXPORTS = {
    "Locker": "distributex.client.locker",
    "HeldLock": "distributex.client.locker",
    "TxLocker": "distributex.client.txlocker",
    "TxHeldLock": "distributex.client.txlocker",
    "DistributexError": "distributex.client.errors",
    "LockNotObtained": "distributex.client.errors",
    "LockBusy": "distributex.client.errors",
    "LockTimeout": "distributex.client.errors",
    "LockLost": "distributex.client.errors",
    "ServerUnreachable": "distributex.client.errors",
    "InvalidRequest": "distributex.client.errors",
    "ServerError": "distributex.client.errors",
    "ProtocolError": "distributex.client.errors",
}

__all__ = [
    "DistributexError",
    "HeldLock",
    "InvalidRequest",
    "LockBusy",
    "LockLost",
    "LockNotObtained",
    "LockTimeout",
    "Locker",
    "ProtocolError",
    "ServerError",
    "ServerUnreachable",
    "TxHeldLock",
    "TxLocker",
]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
