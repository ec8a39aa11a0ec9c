"""How much of the machine one `serve` lets its requests take, and what enforces it.

    limits = Limits(slots=1, read_s=0.5)                    # the defaults are the constants below
    web = create_app(model, dataset, about, limits=limits)  # serving.app's
    uvicorn.Server(server_config(web)).run()                # as serve() does: ReadDeadline on each head

Memory is bounded by the work, not by the clients: at most `slots` uploads are decoded at
once (a small PNG may decode to 40 Mpx, about 0.8 GB), and at most `body_budget` bytes of
request bodies over UNBUDGETED are held at once, counted before a body is read (a body the
budget cannot take within `wait_s` is refused with 503 unread). Time is bounded too: a request's head,
then its body, must each arrive within `read_s`, so a slow client cannot hold a
connection, a share of the budget or a slot for ever.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

from uvicorn.protocols.http.h11_impl import H11Protocol

from mnist_cnn.errors import ConfigError

log = logging.getLogger("mnist_cnn")
BODY_LIMIT = 10 * 1024 * 1024  # bytes: a phone photo fits, a flood does not
# uploads decoded and classified at once: each runs on one core (SERVE_THREADS), and one at the
# 40 Mpx limit takes about 0.8 GB and 2.5 s on the 2-core EPYC (benchmarks/serve.py --large)
WORK_SLOTS = max(1, min(4, os.cpu_count() or 1))
SLOT_WAIT_S = 5.0  # a request waits this long for a slot or for room in the budget, then gets 503
RETRY_AFTER_S = 1  # the 503's Retry-After: a drawn digit takes milliseconds, so a slot is soon free
# bytes of request bodies in memory at once, all requests together: a maximum-size upload for every
# slot and one more waiting behind each (a drawn digit is a few kB, so thousands of those fit)
BODY_BUDGET = 2 * WORK_SLOTS * BODY_LIMIT
# bytes: a body this small (the page's drawn digit is a PNG of a few kB) is read without the budget:
# uvicorn buffers about this much of any waiting connection's body anyway, and slow clients that
# declare large bodies must not lock the page out
UNBUDGETED = 64 * 1024
READ_DEADLINE_S = 30.0  # for a request's head, then for its body: 10 MB in 30 s is 2.8 Mbit/s


@dataclass(frozen=True)
class Limits:
    """What one server lets its requests take; create_app checks nothing else."""

    slots: int = WORK_SLOTS  # uploads decoded and classified at once
    wait_s: float = SLOT_WAIT_S  # the longest a request waits for a slot or for budget, then 503
    body_budget: int = BODY_BUDGET  # bytes of bodies held at once; at least one BODY_LIMIT body
    read_s: float = READ_DEADLINE_S  # a request's head, then its body, within this, else 408 or closed

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ConfigError(f"serve needs at least 1 work slot, got {self.slots}")
        if not (self.wait_s > 0 and self.read_s > 0):
            raise ConfigError(f"serve's waits must be positive, got wait_s={self.wait_s} read_s={self.read_s}")
        if self.body_budget < BODY_LIMIT:
            raise ConfigError(f"body_budget {self.body_budget} cannot hold one {BODY_LIMIT}-byte body")


class Budget:
    """Bytes of request bodies held at once. Used from the event loop's thread only, so a plain
    counter is safe; waiters sleep on an Event that each give() sets and replaces."""

    def __init__(self, total: int) -> None:
        self.free = total
        self.freed = asyncio.Event()

    async def take(self, size: int, wait_s: float) -> bool:
        """Reserve `size` bytes, waiting up to wait_s for room; False if none came."""
        try:
            async with asyncio.timeout(wait_s):
                while self.free < size:
                    await self.freed.wait()
        except TimeoutError:
            return False
        self.free -= size
        return True

    def give(self, size: int) -> None:
        """Return a reservation (synchronous, so a cancelled request cannot lose it on the way)."""
        self.free += size
        self.freed.set()  # every waiter re-checks; those still without room wait on the next event
        self.freed = asyncio.Event()


class ReadDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 connection with a deadline on each request's head: a connection that has
    not sent a whole request line and headers within read_s of opening (or of its previous answer)
    is closed. uvicorn waits for ever for a head sent a byte at a time; the body's own deadline is
    the app's (a 408). The same deadline ends the draining of a refused request's unread body."""

    read_s = READ_DEADLINE_S  # replaced per server by server_protocol()
    timer: asyncio.TimerHandle | None = None
    heard = False  # bytes arrived since the timer was armed: a slow client, not an idle connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.arm()

    def data_received(self, data: bytes) -> None:
        self.heard = True
        super().data_received(data)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        super().connection_lost(exc)

    def arm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer, self.heard = self.loop.call_later(self.read_s, self.expire), False

    def expire(self) -> None:
        """Close the connection unless a request is being answered (the app bounds its own time);
        a line in the log only if the client was sending (a browser's unused preconnect is not news)."""
        between_requests = self.cycle is None or self.cycle.response_complete
        if between_requests and not self.transport.is_closing():
            if self.heard:
                client = "%s:%d" % self.client if self.client else "a client"
                log.info("closed the connection of %s: no whole request within %g s", client, self.read_s)
            self.transport.close()


def server_protocol(read_s: float) -> type[ReadDeadline]:
    """ReadDeadline with its own deadline, for uvicorn.Config(http=...)."""
    return type("ReadDeadline", (ReadDeadline,), {"read_s": read_s})
