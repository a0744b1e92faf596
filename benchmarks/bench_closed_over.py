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
parameters and data) closed over, against ``jax.jit(lambda F, v: F.mv(v))``. ``--stored-matrices``
times instead operations on a stored matrix (built eagerly) inside a ``jit``:
``jax.jit(lambda v: F.op(v))`` closing over ``F`` against ``jax.jit(lambda F, v:
F.op(v))`` (``op``: ``solve`` with ``λ = 1e-3`` and ``mv``; bench_small by default). Compare
two revisions by running the script from each (``PYTHONPATH=<worktree>``)::

    python benchmarks/bench_closed_over.py --out closed.json
    python benchmarks/bench_closed_over.py --models bench_mlp --representations PMatKFAC
    python benchmarks/bench_closed_over.py --stored-matrices --out stored.json
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
STORED_CASES = {"bench_small": ("PMatLowRank", "PMatDense", "PMatBlockDiag", "PMatKFAC")}


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


def stored_case(spec: models.Spec, rep: str, op: str, repeats: int) -> dict:
    """``op`` of a matrix built eagerly, under a ``jit`` closing over it and one taking it."""
    import jax
    import jax.numpy as jnp

    import jaxgeom

    apply_fn, params = models.make_apply(spec), models.init_params(spec)
    x, y = (jnp.asarray(a) for a in models.make_data(spec))
    F = jax.block_until_ready(jaxgeom.FIM(apply_fn, params, (x, y), getattr(jaxgeom, rep),
                                          batch_size=spec.batch_size))
    v = jaxgeom.random_pvector(jax.random.key(2), params)

    def operation(F, v):
        return F.solve(v, 1e-3) if op == "solve" else F.mv(v)

    passed = jax.jit(operation)
    closed = jax.jit(lambda v: operation(F, v))
    out = dict(model=spec.name, representation=rep, op=op)
    for name, call in (("passed", lambda: passed(F, v)), ("closed", lambda: closed(v))):
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
    parser.add_argument("--stored-matrices", action="store_true",
                        help="operations on a stored matrix instead of builds")
    parser.add_argument("--out", default=None, help="write the results as JSON")
    args = parser.parse_args(argv)

    rows = []
    if args.stored_matrices:
        cases = ({name: STORED_CASES.get(name, ()) for name in args.models}
                 if args.models != list(DEFAULT_CASES) else STORED_CASES)
        print(f"{'model':12s} {'representation':14s} {'op':6s} {'passed first':>12s} "
              f"{'closed first':>12s}")
        for name, reps in cases.items():
            for rep in args.representations or reps:
                for op in ("solve", "mv"):
                    row = stored_case(models.SPECS[name], rep, op, args.repeats)
                    rows.append(row)
                    print(f"{name:12s} {rep:14s} {op:6s} {row['passed']['first_s']:11.2f}s "
                          f"{row['closed']['first_s']:11.2f}s", flush=True)
        return _written(rows, args.out)
    print(f"{'model':12s} {'representation':14s} {'passed first':>12s} {'closed first':>12s} "
          f"{'passed warm':>12s} {'closed warm':>12s}")
    for name in args.models:
        for rep in args.representations or DEFAULT_CASES[name]:
            row = case(models.SPECS[name], rep, args.repeats, args.batch_size)
            rows.append(row)
            p, c = row["passed"], row["closed"]
            print(f"{name:12s} {rep:14s} {p['first_s']:11.2f}s {c['first_s']:11.2f}s "
                  f"{p['warm_s'] * 1e3:10.2f}ms {c['warm_s'] * 1e3:10.2f}ms", flush=True)
    return _written(rows, args.out)


def _written(rows: list, path: str | None) -> dict:
    import jax

    results = dict(rows=rows, jax=jax.__version__, machine=platform.processor() or
                   platform.machine(), cpus=os.cpu_count(),
                   device=jax.devices()[0].device_kind,
                   simplified_constants=bool(jax.config.jax_use_simplified_jaxpr_constants))
    write_json(results, path)
    return results


if __name__ == "__main__":
    main()
