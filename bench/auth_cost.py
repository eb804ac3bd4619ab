"""What authentication and per-key rate limits cost per request, in-process, against the
gateway's CPU per request: the precise companion of ``auth_h1`` / ``auth_limits_h1``.

Two gateway processes compared under load on a shared machine differ by more noise than a
few percent; this times exactly the per-request calls the service (``Service.authenticate``
and its admission) makes for auth and limits, on the gateway's own objects:

* ``open``     auth disabled: ``KeyStore.authenticate`` returns the anonymous principal;
  ``RateLimiter.check`` / ``reconcile`` with no limits (what ``chat_h1`` pays);
* ``key``      a ``RUNESTONE_API_KEYS`` key (SHA-256 of the presented key, lookup,
  ``compare_digest``, masking; no limits), as ``auth_h1``;
* ``limited``  an ``[[auth.keys]]`` key with rpm, rph and tpm (never reached): the above
  plus ``estimate_tokens``, the sliding-window reservation, the ``x-ratelimit-*`` headers,
  ``usage_tokens`` on the answer and the reconcile, as ``auth_limits_h1``.

The added cost of ``key`` and ``limited`` over ``open`` is divided by ``chat_h1``'s CPU
microseconds per request from a run's ``results.json`` (or ``--gateway-us``). Not counted:
writing the extra response headers (a few hundred bytes more per response). Median of
``--repeats`` loops of ``--iterations`` requests, thread CPU time, pinned to the first CPU.

    /work/venv/bin/python -m bench.auth_cost --results bench/results/<run>/results.json
"""

from __future__ import annotations

import json
import statistics
import time

import trio

from bench.routing_cost import gateway_us, micro_bench_args, pin_to_server_cpu
from bench.scenarios import CHAT_BODY
from bench.targets import LIMITED_KEY, PLAIN_KEY
from runestone_proxy.config import AuthConfig, AuthKeyConfig, Config
from runestone_proxy.gateway import token_estimate
from runestone_proxy.gateway.auth import KeyStore
from runestone_proxy.gateway.ratelimit import RateLimiter

ANSWER = (
    b'{"id":"chatcmpl-bench","object":"chat.completion","choices":[],'
    b'"usage":{"prompt_tokens":9,"completion_tokens":6,"total_tokens":15}}'
)
ENV = {"RUNESTONE_BENCH_KEY": LIMITED_KEY, "RUNESTONE_API_KEYS": PLAIN_KEY}


def stores() -> dict[str, tuple[KeyStore, bytes | None]]:
    """Each case's key store and the Authorization header it is sent."""
    limited = AuthKeyConfig(
        key_env="RUNESTONE_BENCH_KEY", tenant="bench", rpm=10**9, rph=10**9, tpm=10**12
    )
    on = Config(auth=AuthConfig(enabled=True, keys=(limited,)))
    off = Config(auth=AuthConfig(enabled=False))
    return {
        "open": (KeyStore.build(off, ENV), None),
        "key": (KeyStore.build(on, ENV), f"Bearer {PLAIN_KEY}".encode()),
        "limited": (KeyStore.build(on, ENV), f"Bearer {LIMITED_KEY}".encode()),
    }


async def measure(n: int, repeats: int) -> dict[str, float]:
    body = json.loads(CHAT_BODY)
    out_tokens = Config().routing.default_output_tokens
    pc = time.thread_time_ns
    result: dict[str, float] = {}
    for name, (keys, header) in stores().items():
        limiter = RateLimiter()

        def loop(
            k: int,
            keys: KeyStore = keys,
            header: bytes | None = header,
            limiter: RateLimiter = limiter,
        ) -> float:
            t0 = pc()
            for _ in range(k):
                principal = keys.authenticate(header, None)
                reservation, _headers = limiter.admit(
                    principal, body, out_tokens, trio.current_time(), "req_bench"
                )
                used = token_estimate.usage_tokens(ANSWER)
                limiter.reconcile(reservation, used, trio.current_time())
            return pc() - t0

        loop(min(n, 2000))  # warm the windows
        result[name] = statistics.median(loop(n) for _ in range(repeats)) / n
    return result


def main() -> None:
    args = micro_bench_args(__doc__ or "").parse_args()
    pin_to_server_cpu()
    ns = trio.run(measure, args.iterations, args.repeats)
    gateway = gateway_us(args)
    print(f"{'case':<8} {'us/request':>10} {'added us':>9}")
    for name, value in ns.items():
        print(f"{name:<8} {value / 1000:10.2f} {(value - ns['open']) / 1000:9.2f}")
    if gateway:
        print("\nadded cost as a share of chat_h1's CPU per request:")
        for conc, us in sorted(gateway.items()):
            label = f"c={conc}" if conc else "given"
            shares = ", ".join(
                f"{name} {100 * (ns[name] - ns['open']) / 1000 / us:.2f}%"
                for name in ("key", "limited")
            )
            print(f"  {label:<6} {us:7.0f} us/request -> {shares}")
    else:
        print("\nno gateway CPU per request: run the chat scenario first or pass --gateway-us")
    print(json.dumps({"ns_per_request": ns, "gateway_us_per_request": gateway}))


if __name__ == "__main__":
    main()
