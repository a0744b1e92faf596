"""First calls of a build (and of an implicit product) inside a user's ``jit`` that closes
over the data, against the same ``jit`` taking the data as arguments.

XLA evaluates at compile time whatever a program computes from constants alone (constant
folding, on one thread, with its reference evaluator): a ``jit`` closing over a data set
hands jaxgeom's steps constants. This script times, for each (model, representation), in
one process:

- ``passed``: ``jax.jit(lambda p, x, y: FIM(apply_fn, p, (x, y), R))(params, x, y)``;
- ``closed``: ``jax.jit(lambda p: FIM(apply_fn, p, (x, y), R))(params)``, ``x, y`` closed
  over;

each as its first call (trace, compile, one run: ``first``) and the median of warm calls
(``warm``), with the whole data as one chunk (``FIM``'s default) unless ``--batch-size``.
``PMatImplicit`` is timed as its product ``jax.jit(lambda v: F.mv(v))`` with ``F`` (its
parameters and data) closed over, against ``jax.jit(lambda F, v: F.mv(v))``. Compare two
revisions by running the script from each (``PYTHONPATH=<worktree>``)::

    python benchmarks/bench_closed_over.py --out closed.json
    python benchmarks/bench_closed_over.py --models bench_mlp --representations PMatKFAC
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import models  # noqa: E402
from output import timed, write_json  # noqa: E402

DEFAULT_CASES = {
    "bench_small": ("PMatDense", "PMatDiag", "PMatKFAC", "PMatEKFAC", "PMatImplicit"),
    "bench_mlp": ("PMatDiag", "PMatKFAC", "PMatEKFAC", "PMatQuasiDiag", "PMatImplicit"),
    "bench_cnn": ("PMatDiag", "PMatKFAC", "PMatImplicit"),
}


def case(spec: models.Spec, rep: str, repeats: int, batch_size: int | None) -> dict:
    import jax
    import jax.numpy as jnp

    import jaxgeom

    apply_fn, params = models.make_apply(spec), models.init_params(spec)
    x, y = (jnp.asarray(a) for a in models.make_data(spec))
    cls = getattr(jaxgeom, rep)

    def build(p, x, y):
        return jaxgeom.FIM(apply_fn, p, (x, y), cls, batch_size=batch_size)

    if rep == "PMatImplicit":
        F = build(params, x, y)
        v = jaxgeom.random_pvector(jax.random.key(2), params)
        passed = jax.jit(lambda F, v: F.mv(v))
        closed = jax.jit(lambda v: F.mv(v))
        calls = {"passed": lambda: passed(F, v), "closed": lambda: closed(v)}
    else:
        passed = jax.jit(build)
        closed = jax.jit(lambda p: build(p, x, y))
        calls = {"passed": lambda: passed(params, x, y), "closed": lambda: closed(params)}
    out = dict(model=spec.name, representation=rep, n=int(x.shape[0]), batch_size=batch_size)
    for name, call in calls.items():  # the discovery's trace is the first one's, cached
        res = timed(call, repeats)
        out[name] = dict(first_s=res["first_s"], warm_s=res["warm_s"])
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_CASES))
    parser.add_argument("--representations", nargs="+", default=None)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="FIM's batch_size (default: the whole data as one chunk)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    import jax

    rows = []
    print(f"{'model':12s} {'representation':14s} {'passed first':>12s} {'closed first':>12s} "
          f"{'passed warm':>12s} {'closed warm':>12s}")
    for name in args.models:
        for rep in args.representations or DEFAULT_CASES[name]:
            row = case(models.SPECS[name], rep, args.repeats, args.batch_size)
            rows.append(row)
            p, c = row["passed"], row["closed"]
            print(f"{name:12s} {rep:14s} {p['first_s']:11.2f}s {c['first_s']:11.2f}s "
                  f"{p['warm_s'] * 1e3:10.2f}ms {c['warm_s'] * 1e3:10.2f}ms", flush=True)
    results = dict(rows=rows, jax=jax.__version__, machine=platform.processor() or
                   platform.machine(), cpus=os.cpu_count(),
                   device=jax.devices()[0].device_kind)
    write_json(results, args.out)
    return results


if __name__ == "__main__":
    main()
