"""Per-token cost of stop-string matching on the coordinator's event loop.

    python -m bench.stops

Feeds a stream of short token texts through ``StopChecker`` with 1 to the API's maximum
number of stop strings, of short and of maximum length, none of which ever matches (the
worst case: every token is searched against every stop string), and prints microseconds
per token.
"""

from __future__ import annotations

import random
import time

from ascendra.detokenizer import StopChecker
from ascendra.protocol import MAX_STOP_CHARS, MAX_STOP_STRINGS


def per_token_us(stops: list[str], tokens: list[str]) -> float:
    sc = StopChecker(stops)
    t0 = time.perf_counter()
    for t in tokens:
        sc.feed(t)
    return (time.perf_counter() - t0) / len(tokens) * 1e6


def main() -> None:
    rng = random.Random(0)
    words = ["the", " cat", " sat", " on", " a", " mat", ",", " and", " then", " <", "|", "end"]
    tokens = [rng.choice(words) for _ in range(20_000)]
    print(f"{'stops':>6} {'chars each':>10} {'us/token':>9}")
    for n in (1, 4, 16, MAX_STOP_STRINGS):
        for length in (8, MAX_STOP_CHARS):
            # Stop strings sharing the stream's prefixes, so partial matches are held back often.
            stops = [("<|end" + "x" * length)[:length - 1] + chr(0x4E00 + i) for i in range(n)]
            print(f"{n:>6} {length:>10} {per_token_us(stops, tokens):>9.2f}")


if __name__ == "__main__":
    main()
