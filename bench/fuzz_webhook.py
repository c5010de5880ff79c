"""The full fuzz run of ``POST /webhook`` (tests/test_fuzz_webhook.py generates the bodies; CI runs
a few hundred of them, this runs ``FULL_EXAMPLES``). Prints the count per status class and the time.

    .venv/bin/python bench/fuzz_webhook.py [--examples 2500]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.test_fuzz_webhook import FULL_EXAMPLES, fuzz  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=FULL_EXAMPLES)
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        seen = trio.run(fuzz, Path(tmp), args.examples)   # raises on a 5xx, a 4xx without a reason, ...
    elapsed = time.perf_counter() - started
    total = sum(seen.values())
    print(f"fuzz /webhook: {total} bodies in {elapsed:.1f} s: " + ", ".join(f"{k} {v}" for k, v in sorted(seen.items()))
          + f", 5xx {seen.get('5xx', 0)}; /health ok, no actor created by a 4xx")
    if total != args.examples:
        raise SystemExit(f"expected {args.examples} bodies, got {total}")


if __name__ == "__main__":
    main()
