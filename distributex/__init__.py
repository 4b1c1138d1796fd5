"""distributex: a fair, event-driven network mutex and semaphore service."""

__version__ = "1.1.0.dev0"
