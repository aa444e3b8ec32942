"""kdad's console: each log line printed once, above the progress bar rather than through it.

Two things garbled a command's console. Hydra's console handler writes to the ``sys.stdout``
it was given when logging was configured, but while Lightning's Rich progress bar is live on a
terminal, Rich has put a proxy in ``sys.stdout`` that prints whole lines above the bar; the old
stream bypassed it, so kdad's lines were written into the bar's line. And the ``lightning``
package adds a console handler of its own (``INFO: ...``, on the stderr of import time), while
the same records also reach the root logger's handlers: every Lightning line came twice.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO


class ConsoleHandler(logging.StreamHandler):
    """The job-logging console handler of kdad's commands (``conf/hydra/default.yaml``): a
    :class:`logging.StreamHandler` that writes to ``sys.stdout`` as it is at each record."""

    def __init__(self, stream: TextIO | None = None) -> None:
        # ``stream`` (Hydra's ``ext://sys.stdout``) is accepted and not kept: the stream is
        # looked up at each record.
        super().__init__()

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stdout

    @stream.setter
    def stream(self, value: TextIO) -> None:
        """Ignored: the handler always writes to the current ``sys.stdout``."""


def one_console_for_lightning() -> None:
    """Remove the ``lightning`` package's own console handler when the root logger has
    handlers (a kdad command's job logging), so that each Lightning line is printed once, by
    those. Without root handlers (kdad used as a library) Lightning keeps its own."""
    if "lightning" not in sys.modules or not logging.getLogger().handlers:
        return
    logger = logging.getLogger("lightning")
    for handler in list(logger.handlers):
        if type(handler) is logging.StreamHandler:
            logger.removeHandler(handler)


__all__ = ["ConsoleHandler", "one_console_for_lightning"]
