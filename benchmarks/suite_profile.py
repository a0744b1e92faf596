"""Where the test suite's time goes: a pytest plugin that charges JAX's tracing, lowering
and XLA compilation (``jax.monitoring``'s duration events) to the test that caused them,
and a report of the heaviest tests.

The suite must run in under 10 minutes on CI's two cores; on these models nearly all of
it is JAX's own work — on 2026-12-06, of 1090 test-seconds, XLA compilation 517 s (16 707
programs, 31 ms each), lowering to MLIR 227 s and tracing 173 s — so a test is made
cheaper by compiling fewer programs (one jitted call of several operations, fewer
parameter cases that compile their own), not by smaller arrays. Run from the repository
root::

    PYTHONPATH=benchmarks python -m pytest -q -n 2 tests -p suite_profile
    python benchmarks/suite_profile.py            # the report (--top N, --out DIR)

Each pytest worker writes ``suite-profile-<worker>.json`` into ``$SUITE_PROFILE_DIR``
(default: the system's temporary directory); the report merges them, per test function
(its parameter cases summed): wall seconds, compilation seconds and count, lowering and
tracing seconds.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import tempfile
import time

import pytest

_EVENTS = {  # jax.monitoring's duration events → the report's columns
    "/jax/core/compile/backend_compile_duration": "compile",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/jaxpr_trace_duration": "trace",
}
_current = ["(outside a test)"]
_stats: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def _directory() -> str:
    return os.environ.get("SUITE_PROFILE_DIR", tempfile.gettempdir())


def _record(event: str, duration: float, **_: object) -> None:
    column = _EVENTS.get(event)
    if column is not None:
        stats = _stats[_current[0]]
        stats[f"{column}_s"] += duration
        stats[f"{column}_n"] += 1


def pytest_configure(config: pytest.Config) -> None:
    import jax.monitoring

    jax.monitoring.register_event_duration_secs_listener(_record)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    _current[0] = item.nodeid
    start = time.perf_counter()
    yield
    _stats[item.nodeid]["wall_s"] += time.perf_counter() - start
    _current[0] = "(outside a test)"


def pytest_sessionfinish(session: pytest.Session) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    path = os.path.join(_directory(), f"suite-profile-{worker}.json")
    with open(path, "w") as f:
        json.dump({test: dict(counts) for test, counts in _stats.items()}, f)


def report(directory: str, top: int) -> None:
    """Print the ``top`` test functions by wall time, and the totals."""
    per_function: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for path in glob.glob(os.path.join(directory, "suite-profile-*.json")):
        with open(path) as f:
            for test, counts in json.load(f).items():
                per_function[re.sub(r"\[.*\]$", "", test)].update(counts)
    if not per_function:
        raise SystemExit(f"no suite-profile-*.json in {directory}: run pytest with "
                         "-p suite_profile first (module docstring)")
    total: collections.Counter = collections.Counter()
    for counts in per_function.values():
        total.update(counts)
    print(f"{'wall s':>7} {'compile s':>9} {'programs':>8} {'lower s':>7} {'trace s':>7}  test")
    rows = sorted(per_function.items(), key=lambda item: -item[1]["wall_s"])
    for test, c in [*rows[:top], ("(all)", total)]:
        print(f"{c['wall_s']:7.1f} {c['compile_s']:9.1f} {c['compile_n']:8d} "
              f"{c['lower_s']:7.1f} {c['trace_s']:7.1f}  {test}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--out", default=_directory(), help="where the workers wrote")
    args = parser.parse_args()
    report(args.out, args.top)
