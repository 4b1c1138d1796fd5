"""distributex: a fair, event-driven network mutex and semaphore service."""

__version__ = "1.0.0"
