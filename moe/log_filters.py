"""Dropping known, non-actionable log messages by prefix, everywhere with one filter."""

import contextlib
import logging
from collections.abc import Iterator


class DropNoise(logging.Filter):
    """Drops log records whose message starts with one of `prefixes`."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


@contextlib.contextmanager
def dropping(logger_name: str | None, *prefixes: str) -> Iterator[None]:
    """Within the block, logger `logger_name` (None: the root) drops messages starting with
    `prefixes`; everything else it logs passes."""
    logger = logging.getLogger(logger_name)
    drop = DropNoise(prefixes)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


__all__ = ["DropNoise", "dropping"]
