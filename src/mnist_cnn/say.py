"""What the library says while it works, through logging, so that a caller can silence or capture it.

    say(f"epoch 1/20 ...")                 # INFO on the "mnist_cnn.say" logger
    say("stopped by SIGINT ...", NOTICE)   # a notice: what to do next (stderr on the command line)
    with speaking(progress):               # an API call: when nobody has set up logging, print it
        ...

The command line sends INFO to stdout and notices to stderr, as plain lines (cli.main). A Python
caller who has configured logging gets the records; one who has not sees them printed during
train(), train_seeds(), resume(), tune() and lr_find() unless progress=False, which prints nothing.
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from typing import Iterator

SAY = "mnist_cnn.say"  # the logger of the library's running commentary
NOTICE = 25  # between INFO and WARNING: a line the user should act on (how to continue a stopped run)
logging.addLevelName(NOTICE, "NOTICE")
log = logging.getLogger(SAY)


def say(text: str, level: int = logging.INFO) -> None:
    log.log(level, text)


class Below(logging.Filter):
    """Passes records below a level (INFO to stdout, the rest to stderr)."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def plain_handlers() -> list[logging.Handler]:
    """Plain lines: INFO on stdout, notices and worse on stderr (the streams as they are now)."""
    out, err = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
    out.addFilter(Below(NOTICE))
    err.setLevel(NOTICE)
    for handler in (out, err):
        handler.setFormatter(logging.Formatter("%(message)s"))
    return [out, err]


@contextmanager
def speaking(enabled: bool) -> Iterator[None]:
    """For one API call: the commentary printed (enabled) or dropped (not), unless someone, the command
    line or the caller, has set up where log records go (then they decide)."""
    if log.handlers or logging.getLogger().handlers:
        yield
        return
    handlers = plain_handlers() if enabled else [logging.NullHandler()]
    level, propagate = log.level, log.propagate
    for handler in handlers:
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # not to Python's last-resort handler, which prints warnings on stderr
    try:
        yield
    finally:
        for handler in handlers:
            log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate
