"""``bench.api_cost`` set up as a serving gateway under load, for the usage ledger's cost in
process: the serving process's collector settings (:func:`runestone_proxy.server.heap.tune`,
which ``python -m runestone_proxy`` applies and ``bench.api_cost`` alone does not) and, with
the ledger on, ``[ledger] flush_interval_s = 1000``, so that a batch's records are written in
one pass (1,280 and 3,840 records below), as passes of up to 4096 are under load, rather than
in the flush timer's small passes of a run slowed down by valgrind. Arguments are
``bench.api_cost``'s.

``--pass-max N`` (this bench's own option) sets the records a writer pass takes
(``store_ledger.PASS_MAX``, 4096 in a gateway) so that passes interleave with the requests,
as they do under load, in a run short enough for valgrind's cache simulation, which is what
counts the cache misses a pass's pending records cost each thread (README, "Usage ledger").

Instructions per request and per thread (the event loop's, and the store's writer):

    for n in 640 1920; do PYTHONHASHSEED=0 valgrind --tool=callgrind --separate-threads=yes \\
      --callgrind-out-file=cg.$n.%p python -m bench.ledger_inprocess --repeats 1 \\
      --iterations $n --ledger on; done
    grep -m1 ^summary cg.*-0?   # per thread: (the 1920 run's - the 640 run's) / 2,560

and with the cache simulation (LL = 2 MB, this host's L2), passes of 1024:

    for n in 640 2688; do PYTHONHASHSEED=0 valgrind --tool=callgrind --cache-sim=yes \
      --LL=2097152,16,64 --separate-threads=yes --callgrind-out-file=cs.$n.%p \
      python -m bench.ledger_inprocess --pass-max 1024 --repeats 1 --iterations $n \
      --ledger on; done
    grep -m1 ^summary cs.*-0?   # per thread: (the 2688 run's - the 640 run's) / 4,096
"""

from __future__ import annotations

import itertools
import sys

from bench import api_cost
from runestone_proxy.server import heap, store, store_ledger

#: Added to the bench's gateway config with the ledger on (see the module docstring).
ONE_PASS = "\n[ledger]\nflush_interval_s = 1000.0\n"


def _pass_max(argv: list[str]) -> list[str]:
    """Take ``--pass-max N`` out of ``argv`` and apply it; the rest is api_cost's."""
    if "--pass-max" not in argv:
        return argv
    at = argv.index("--pass-max")
    limit = int(argv[at + 1])
    # store.py imported the name: both modules' bindings (and take()'s default) change.
    store_ledger.PASS_MAX = vars(store)["PASS_MAX"] = limit
    store_ledger.LedgerBuffer.take.__defaults__ = (limit,)
    return argv[:at] + argv[at + 2 :]


def main() -> None:
    argv = sys.argv[1:] = _pass_max(sys.argv[1:])
    off = "--ledger=off" in argv or any(
        pair == ("--ledger", "off") for pair in itertools.pairwise(argv)
    )
    if not off:  # (with the ledger off, api_cost adds its own [ledger] table)
        # api_cost formats its module's PROXY_CONFIG when it builds the gateway.
        vars(api_cost)["PROXY_CONFIG"] += ONE_PASS
    heap.tune()
    api_cost.main()


if __name__ == "__main__":
    main()
