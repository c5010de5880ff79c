"""Applies the experiments named in BENCH_EXPERIMENTS (see README.md) when Python starts."""
import os
import sys

_names = [n for n in os.environ.get("BENCH_EXPERIMENTS", "").split(",") if n]
if _names:
    import patches

    for _name in _names:
        getattr(patches, _name)()
    print(f"bench experiments active in pid {os.getpid()}: {', '.join(_names)}", file=sys.stderr, flush=True)
