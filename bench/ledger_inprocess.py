"""``bench.api_cost`` set up as a serving gateway under load, for the usage ledger's cost in
process: the serving process's collector settings (:func:`runestone_proxy.server.heap.tune`,
which ``python -m runestone_proxy`` applies and ``bench.api_cost`` alone does not) and, with
the ledger on, ``[ledger] flush_interval_s = 1000``, so that a batch's records are written in
one pass (1,280 and 3,840 records below), as passes of up to 4096 are under load, rather than
in the flush timer's small passes of a run slowed down by valgrind. Arguments are
``bench.api_cost``'s.

Instructions per request and per thread (the event loop's, and the store's writer):

    for n in 640 1920; do PYTHONHASHSEED=0 valgrind --tool=callgrind --separate-threads=yes \\
      --callgrind-out-file=cg.$n.%p python -m bench.ledger_inprocess --repeats 1 \\
      --iterations $n --ledger on; done
    grep -m1 ^summary cg.*-0?   # per thread: (the 1920 run's - the 640 run's) / 2,560
"""

from __future__ import annotations

import itertools
import sys

from bench import api_cost
from runestone_proxy.server import heap

#: Added to the bench's gateway config with the ledger on (see the module docstring).
ONE_PASS = "\n[ledger]\nflush_interval_s = 1000.0\n"


def main() -> None:
    argv = sys.argv[1:]
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
