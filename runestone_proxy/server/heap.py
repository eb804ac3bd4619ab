"""The serving process's garbage collector settings: what the gateway's heap looks like and
why CPython's defaults cost it CPU. No I/O.

CPython frees almost every object the moment its last reference goes (reference counting);
the cyclic collector exists only for reference cycles, and it runs whenever the tracked
containers allocated since its last pass outnumber those freed by ``threshold0`` (700 by
default). A gateway under load keeps a few hundred objects alive per request in flight, so
that count crosses 700 every few requests although almost nothing is cyclic garbage: on
the non-stream bench (c=64) the collector ran about 170 young passes a second on HTTP/1.1
and 330 on h2c, each scanning the in-flight requests, and every ten of those an older pass,
and every few seconds a full pass over the whole heap (every module, class and function:
about 20 ms each). In all, 6% of the CPU of an HTTP/1.1 request and 8% of an h2c one.

:func:`tune` does two things, once, in the serving process (``python -m runestone_proxy``
and each worker), after the gateway's code is imported and before it serves:

* ``gc.freeze()``: everything alive at start (the imported code, the configuration) moves
  to the permanent generation, which full passes skip: they cost a fraction of what they
  did. What is frozen is never collected, so :func:`tune` collects first.
* ``threshold0`` = :data:`YOUNG_THRESHOLD`, above what requests in flight hold at once: the
  young pass then runs when objects really accumulate, a few times a minute under load,
  rather than hundreds of times a second. Cyclic garbage still goes (the gateway makes
  little: a request's objects free themselves), and at most about ``YOUNG_THRESHOLD``
  tracked objects wait for it, a few megabytes.

The test suite runs gateways inside pytest's process and keeps CPython's defaults there.
"""

from __future__ import annotations

import gc

__all__ = ["YOUNG_THRESHOLD", "tune"]

#: Net new container objects between young collections (CPython's default is 700).
YOUNG_THRESHOLD = 10_000


def tune() -> None:
    """Collect, freeze what is alive, and raise the young generation's threshold."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
