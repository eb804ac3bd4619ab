"""The time-to-first-chunk a streamed request pays for failing over from a refusing provider.

Two gateways run in-process, in front of the same fast fake upstream (``bench.upstream``):

* ``healthy-only``: model ``m`` served by one deployment, the healthy upstream;
* ``refusing-first``: ``m`` served by a group whose first deployment is a 127.0.0.1 port
  bound but not listening (connect refused) and whose second is the healthy upstream. The
  breaker's threshold is set out of reach so that every request pays the failover (with
  the default breaker only the first five would: then the refusing deployment is skipped).

For each gateway, ``--requests`` streamed chat completions are sent one at a time (after a
few unmeasured warm-up requests), alternating between the two gateways, and the client
measures the time from sending the request to receiving the first ``data:`` bytes. The
report is the median (and p90) of each, and the difference of the medians: the added
time-to-first-chunk of one failover.

    /work/venv/bin/python -m bench.failover_ttfc --requests 20
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
from functools import partial

import attrs
import httpx
import trio

from bench.upstream import Defaults, make_handler
from runestone_proxy import logs
from runestone_proxy.config import BreakerConfig, Config, ModelConfig, ProviderConfig, RoutingConfig
from runestone_proxy.server.app import App

HOST = "127.0.0.1"
BODY = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "stream": True}


def gateway_config(deployments: dict[str, str], breaker: BreakerConfig) -> Config:
    base = Config()
    return Config(
        server=attrs.evolve(base.server, host=HOST, port=0),
        logging=attrs.evolve(base.logging, level="warning", access_log=False),
        auth=attrs.evolve(base.auth, enabled=False),
        routing=RoutingConfig(group_strategy="least_in_flight", breaker=breaker),
        providers=tuple(
            ProviderConfig(name, "openai", base_url=url) for name, url in deployments.items()
        ),
        models=tuple(ModelConfig("m", name) for name in deployments),
    )


async def first_chunk_s(client: httpx.AsyncClient, url: str) -> float:
    started = time.perf_counter()
    async with client.stream("POST", f"{url}/v1/chat/completions", json=BODY) as response:
        assert response.status_code == 200, response.status_code
        elapsed = None
        async for raw in response.aiter_raw():  # read to the end: the connection is reused
            if raw and elapsed is None:
                elapsed = time.perf_counter() - started
    assert elapsed is not None
    return elapsed


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 3),
        "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))] * 1000, 3),
        "min_ms": round(ordered[0] * 1000, 3),
    }


async def main(requests: int, warmup: int) -> None:
    logs.configure("warning", "json")
    refusing = socket.socket()  # bound, not listening: refuses, and no one else takes it
    refusing.bind((HOST, 0))
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, make_handler(Defaults(chunks=20)), 0, host=HOST)
        )
        upstream = f"http://{HOST}:{listeners[0].socket.getsockname()[1]}/v1"
        never = BreakerConfig(failure_threshold=1_000_000, min_requests=1_000_000)
        configs = {
            "healthy-only": gateway_config({"healthy": upstream}, never),
            "refusing-first": gateway_config(
                {"refusing": f"http://{HOST}:{refusing.getsockname()[1]}/v1", "healthy": upstream},
                never,
            ),
        }
        urls = {}
        for name, config in configs.items():
            bound = await nursery.start(App.build(config, None, {}).run)
            urls[name] = f"http://{HOST}:{bound.port}"
        samples: dict[str, list[float]] = {name: [] for name in urls}
        async with httpx.AsyncClient(timeout=10) as client:
            for index in range(warmup + requests):
                for name, url in urls.items():
                    elapsed = await first_chunk_s(client, url)
                    if index >= warmup:
                        samples[name].append(elapsed)
        nursery.cancel_scope.cancel()
    refusing.close()
    report = {name: summary(values) for name, values in samples.items()}
    added = report["refusing-first"]["median_ms"] - report["healthy-only"]["median_ms"]
    for name, row in report.items():
        print(f"{name:>15}: median {row['median_ms']:.3f} ms  p90 {row['p90_ms']:.3f} ms")
    print(f"{'added':>15}: {added:.3f} ms (median, {requests} requests each)")
    print(json.dumps({"requests": requests, **report, "added_median_ms": round(added, 3)}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    trio.run(main, args.requests, args.warmup)
