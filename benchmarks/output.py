"""Timing calls and writing a benchmark script's results."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any


def write_json(results: dict, path: str | None, announce: bool = True) -> None:
    """``results`` as indented JSON at ``path`` (nothing when ``path`` is ``None``),
    written then renamed, so that a run stopped mid-write keeps the previous file whole."""
    if not path:
        return
    with open(f"{path}.tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(f"{path}.tmp", path)
    if announce:
        print(f"wrote {path}")


def timed(call: Callable[[], Any], repeats: int) -> dict:
    """The first call of ``call()`` (compilation included) and the median of ``repeats``
    warm calls, in seconds, each waited for (``jax.block_until_ready``)."""
    import jax

    start = time.perf_counter()
    jax.block_until_ready(call())
    first = time.perf_counter() - start
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(call())
        runs.append(time.perf_counter() - start)
    return dict(first_s=first, warm_s=statistics.median(runs), runs=runs)
