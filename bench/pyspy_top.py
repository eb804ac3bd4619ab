"""The top inclusive frames of a ``py-spy record -f raw`` profile, filtered to our code.

py-spy's raw format is one folded stack per line (``frame;frame;...;frame count``, outermost
first, each frame ``function (path:line)``). A frame's *inclusive* share is the fraction of
samples in which it appears anywhere on the stack (counted once per sample, however deep
the recursion); its *self* share, the fraction in which it is the innermost frame. Frames
are keyed by function and file (not line), so one function is one row.

    py-spy record -p PID -f raw -o prof.txt -d 15 -r 250 --nonblocking
    python -m bench.pyspy_top prof.txt --match runestone_proxy/ --top 15

Only samples of the gateway's main thread count by default (``--within``): py-spy reports
trio's idle worker threads (parked in ``_thread_cache.py``) as busy.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<path>.*?)(?::(?P<line>\d+))?\)$")


def frame_key(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if m is None:
        return frame.strip()
    path = m["path"]
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    if "runestone_proxy/" in path:
        path = "runestone_proxy/" + path.split("runestone_proxy/", 1)[1]
    return f"{m['func']} ({path})"


def top(
    text: str, match: str, limit: int, within: str = ""
) -> tuple[int, list[tuple[str, int, int]]]:
    inclusive: Counter[str] = Counter()
    self_: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit() or within not in stack:
            continue
        count = int(count_text)
        total += count
        frames = [frame_key(f) for f in stack.split(";") if f]
        for key in set(frames):
            inclusive[key] += count
        if frames:
            self_[frames[-1]] += count
    rows = [(k, n, self_[k]) for k, n in inclusive.most_common() if match in k]
    return total, rows[:limit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("profile", type=Path)
    parser.add_argument("--match", default="runestone_proxy/", help="keep frames containing")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument(
        "--within",
        default="runestone_proxy/__main__.py",
        help="count only samples whose stack contains this (default: the gateway's main "
        "thread; py-spy counts trio's idle worker threads as busy)",
    )
    args = parser.parse_args()
    total, rows = top(args.profile.read_text(), args.match, args.top, args.within)
    print(f"{total} samples; top {len(rows)} inclusive frames matching {args.match!r}:")
    print(f"{'incl%':>6} {'self%':>6}  frame")
    for key, incl, own in rows:
        print(f"{100 * incl / total:6.1f} {100 * own / total:6.1f}  {key}")


if __name__ == "__main__":
    main()
