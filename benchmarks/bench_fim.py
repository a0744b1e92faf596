"""Time Fisher builds and operations per representation, against floors measured in the same run.

Usage::

    python benchmarks/bench_fim.py                      # both models, 5 warm repeats
    python benchmarks/bench_fim.py --quick              # 2 repeats, fewer ops: a smoke run
    python benchmarks/bench_fim.py --models bench_small --repeats 7 --out results.json

For each model (synthetic data, fixed seeds, float32) the script measures three floors —
one forward pass over the N examples, forward+backward (``jax.grad`` of the mean loss) and
per-example gradients (``vmap(grad)``, chunked like the builds, reduced to their squared
sum) — then, for each representation that fits the model, the exact Fisher build
(``FIM(..., variant="classif_logits", batch_size=...)``) and the operations ``mv``,
``vTMv``, ``trace``, ``frobenius_norm`` and ``solve``.

Every timing separates the first call (which includes tracing and compilation) from the
median of ``--repeats`` warm calls, and waits for the results (``jax.block_until_ready``).
Operations are timed under ``jax.jit`` with the representation as an argument (a pytree),
falling back to eager calls where a representation cannot be traced. The table gives each
warm time as a ratio to the forward+backward floor (``x grad``) and, for builds, to the
per-example-gradient floor (``x pe-grad``); ratios are steadier than seconds on a
shared machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxgeom

# ----------------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True)
class Model:
    """A benchmark problem: an MLP on synthetic data.

    Attributes:
      name: the model's name in ``--models``.
      widths: layer widths, input first, classes last.
      activation: the hidden nonlinearity.
      n: the number of examples.
      batch_size: the chunk size of the builds (bounds the per-example Jacobians in memory).
      representations: the representations built on it (those whose storage fits).
      skip: ``(representation, operation) -> reason`` for operations not timed on it.
    """

    name: str
    widths: tuple[int, ...]
    activation: Callable
    n: int
    batch_size: int
    representations: tuple[str, ...]
    skip: dict = dataclasses.field(default_factory=dict)


MODELS = {
    "bench_small": Model(
        "bench_small", (32, 64, 64, 10), jnp.tanh, 1024, 256,
        ("PMatDense", "PMatBlockDiag", "PMatDiag", "PMatLowRank", "PMatImplicit"),
    ),
    "bench_mlp": Model(
        "bench_mlp", (784, 512, 512, 10), jax.nn.relu, 512, 32,
        ("PMatDiag", "PMatImplicit"),
        skip={
            ("PMatImplicit", "trace"): "streams the per-example Jacobians: the cost of the "
            "PMatDiag build",
        },
    ),
}

OPERATIONS = ("mv", "vTMv", "trace", "frobenius_norm", "solve")
SOLVE_REGUL = 1e-3
#: conjugate-gradient iterations allowed to representations that solve by CG
CG_MAXITER = 20
#: dense views (e.g. the Frobenius norm of an implicit matrix) are skipped above this d
MAX_DENSE_D = 10_000


def init_mlp(model: Model, seed: int = 0) -> dict:
    keys = jax.random.split(jax.random.key(seed), len(model.widths) - 1)
    params = {}
    for i, (k, a, b) in enumerate(zip(keys, model.widths[:-1], model.widths[1:])):
        params[f"dense{i}"] = {
            "kernel": jax.random.normal(k, (a, b), jnp.float32) / np.sqrt(a),
            "bias": jnp.zeros((b,), jnp.float32),
        }
    return params


def make_apply(model: Model) -> Callable:
    num_layers = len(model.widths) - 1

    def apply_fn(params, x):
        for i in range(num_layers):
            layer = params[f"dense{i}"]
            x = x @ layer["kernel"] + layer["bias"]
            if i < num_layers - 1:
                x = model.activation(x)
        return x

    return apply_fn


def make_data(model: Model, seed: int = 1) -> tuple[jax.Array, jax.Array]:
    kx, ky = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (model.n, model.widths[0]), jnp.float32)
    y = jax.random.randint(ky, (model.n,), 0, model.widths[-1])
    return x, y


# ----------------------------------------------------------------------------- timing


#: warm calls are cut to one when the first call takes longer than this (seconds)
SLOW_S = 2.0
#: and to none when it takes longer than this: the warm time is then the first call's
VERY_SLOW_S = 20.0


def timed(fn: Callable[[], Any], repeats: int) -> dict:
    """First-call time and median of ``repeats`` warm calls of ``fn`` (results awaited).

    Calls whose first run takes more than ``SLOW_S`` seconds get one warm call only, and
    none above ``VERY_SLOW_S`` (then ``warm_s`` is the first call's time, compilation
    included, and ``runs`` is empty).
    """
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    if first > VERY_SLOW_S:
        return dict(first_s=first, warm_s=first, runs=[])
    if first > SLOW_S:
        repeats = 1
    warm = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        warm.append(time.perf_counter() - start)
    return dict(first_s=first, warm_s=statistics.median(warm), runs=warm)


def floors(apply_fn, params, x, y, batch_size, repeats) -> dict[str, dict]:
    def loss(p, xb, yb):
        logits = apply_fn(p, xb)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], 1))

    forward = jax.jit(apply_fn)
    grad = jax.jit(jax.grad(loss))

    @jax.jit
    def per_example(p, xs, ys):
        # chunks of batch_size, like the builds; reduce to Σₙ gₙ² so that memory stays bounded
        def chunk(acc, xy):
            g = jax.vmap(jax.grad(lambda q, a, b: loss(q, a[None], b[None])),
                         in_axes=(None, 0, 0))(p, *xy)
            return jax.tree_util.tree_map(lambda s, gi: s + jnp.sum(gi**2, 0), acc, g), None

        zero = jax.tree_util.tree_map(jnp.zeros_like, p)
        return jax.lax.scan(chunk, zero, (xs, ys))[0]

    n = x.shape[0] - x.shape[0] % batch_size
    xs = x[:n].reshape(-1, batch_size, *x.shape[1:])
    ys = y[:n].reshape(-1, batch_size)
    return {
        "forward": timed(lambda: forward(params, x), repeats),
        "forward+backward": timed(lambda: grad(params, x, y), repeats),
        "per-example grads": timed(lambda: per_example(params, xs, ys), repeats),
    }


def _operation(name: str, pmat: Any, d: int, skip: dict) -> tuple[Callable | None, dict, str]:
    """``(f(pmat, v), solve options, note)`` for one operation; ``f`` None when skipped."""
    options: dict = {}
    note = ""
    if (type(pmat).__name__, name) in skip:
        return None, options, "skipped: " + skip[type(pmat).__name__, name]
    if name == "frobenius_norm" and type(pmat).__name__ == "PMatImplicit" and d > MAX_DENSE_D:
        return None, options, f"skipped: needs a dense d x d view (d = {d})"
    if name == "solve" and getattr(pmat, "SOLVE_METHODS", ("cg",))[0] == "cg":
        options = dict(maxiter=CG_MAXITER)
        note = f"cg, maxiter={CG_MAXITER}"
    ops = {
        "mv": lambda m, v: m.mv(v),
        "vTMv": lambda m, v: m.vTMv(v),
        "trace": lambda m, v: m.trace(),
        "frobenius_norm": lambda m, v: m.frobenius_norm(),
        "solve": lambda m, v: m.solve(v, SOLVE_REGUL, **options),
    }
    return ops[name], options, note


def bench_operation(name, pmat, v, d, repeats, skip) -> dict:
    fn, options, note = _operation(name, pmat, d, skip)
    if fn is None:
        return dict(skipped=note)
    jitted = jax.jit(fn)
    try:
        result = timed(lambda: jitted(pmat, v), repeats)
        result["jit"] = True
    except NotImplementedError as e:
        return dict(skipped=f"NotImplementedError: {e}")
    except Exception as e:  # noqa: BLE001 - not traceable: fall back to eager calls
        try:
            result = timed(lambda: fn(pmat, v), repeats)
        except NotImplementedError as e2:
            return dict(skipped=f"NotImplementedError: {e2}")
        result["jit"] = False
        result["jit_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    if note:
        result["note"] = note
    if options:
        result["options"] = options
    return result


def bench_model(model: Model, repeats: int, operations: tuple[str, ...],
                only: tuple[str, ...] | None = None) -> dict:
    apply_fn = make_apply(model)
    params = init_mlp(model)
    x, y = make_data(model)
    d = sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(params))
    print(f"\n== {model.name}: widths {model.widths}, d = {d:,}, N = {model.n}, "
          f"K = {model.widths[-1] - 1}, batch_size = {model.batch_size}")
    result = dict(d=d, n=model.n, k=model.widths[-1] - 1, batch_size=model.batch_size,
                  widths=list(model.widths), floors=floors(
                      apply_fn, params, x, y, model.batch_size, repeats),
                  representations={})
    v = jaxgeom.random_pvector(jax.random.key(2), params)
    for name in model.representations:
        if only is not None and name not in only:
            continue
        rep = getattr(jaxgeom, name, None)
        if rep is None:
            result["representations"][name] = dict(skipped=f"jaxgeom has no {name}")
            continue
        holder = {}

        def build(rep=rep, holder=holder):
            holder["pmat"] = jaxgeom.FIM(apply_fn, params, (x, y), rep,
                                         variant="classif_logits",
                                         batch_size=model.batch_size)
            return holder["pmat"]

        entry = {"build": timed(build, repeats)}
        _progress(name, "build", entry["build"])
        pmat = holder.pop("pmat")
        for op in operations:
            entry[op] = bench_operation(op, pmat, v, d, repeats, model.skip)
            _progress(name, op, entry[op])
        del pmat
        result["representations"][name] = entry
    return result


# ----------------------------------------------------------------------------- report


def _progress(rep: str, op: str, t: dict) -> None:
    done = t.get("skipped") or f"first {_fmt_s(t['first_s'])}, warm {_fmt_s(t['warm_s'])}"
    print(f"   {rep}.{op}: {done}", flush=True)


def _fmt_ratio(r: float) -> str:
    return f"{r:.0f}" if r >= 100 else f"{r:.1f}" if r >= 10 else f"{r:.2f}" if r >= 0.01 else (
        f"{r:.0e}")


def _fmt_s(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def print_report(results: dict) -> None:
    for model, res in results["models"].items():
        fwd_bwd = res["floors"]["forward+backward"]["warm_s"]
        per_example = res["floors"]["per-example grads"]["warm_s"]
        rows = [("model / representation", "operation", "first call", "warm median",
                 "x grad", "x pe-grad")]
        for name, t in res["floors"].items():
            rows.append((f"{model} floor", name, _fmt_s(t["first_s"]), _fmt_s(t["warm_s"]),
                         _fmt_ratio(t["warm_s"] / fwd_bwd), _fmt_ratio(t["warm_s"] / per_example)))
        notes = []
        for rep, entry in res["representations"].items():
            if "skipped" in entry:
                notes.append(f"{rep}: not run ({entry['skipped']})")
                continue
            for op, t in entry.items():
                if "skipped" in t:
                    rows.append((rep, op, "n/a", "n/a", "", ""))
                    notes.append(f"{rep}.{op}: {t['skipped'][:160]}")
                    continue
                if t.get("note"):
                    notes.append(f"{rep}.{op}: {t['note']}")
                label = op + ("" if t.get("jit", True) else " (eager)")
                warm = _fmt_s(t["warm_s"])
                if not t["runs"]:
                    warm += "*"
                    notes.append(f"{rep}.{op}: * no warm call (first call > {VERY_SLOW_S:g} s)")
                rows.append((rep, label, _fmt_s(t["first_s"]), warm,
                             _fmt_ratio(t["warm_s"] / fwd_bwd),
                             _fmt_ratio(t["warm_s"] / per_example) if op == "build" else ""))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        print()
        for i, row in enumerate(rows):
            print("  ".join(c.ljust(w) if j < 2 else c.rjust(w)
                            for j, (c, w) in enumerate(zip(row, widths))).rstrip())
            if i == 0:
                print("  ".join("-" * w for w in widths))
        for note in notes:
            print(f"  - {note}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="warm repeats (median)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--quick", action="store_true",
                        help="2 repeats, only mv and trace: a smoke run")
    parser.add_argument("--representations", nargs="+", default=None, metavar="PMAT",
                        help="time only these representations (default: all that fit)")
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")
    parser.add_argument("--report", default=None, metavar="JSON",
                        help="only print the table of a saved results file")
    args = parser.parse_args(argv)
    if args.report:
        with open(args.report) as f:
            results = json.load(f)
        print_report(results)
        return results
    repeats = 2 if args.quick else args.repeats
    operations = ("mv", "trace") if args.quick else OPERATIONS
    results = dict(
        machine=dict(platform=platform.platform(), processor=platform.processor(),
                     cpu_count=__import__("os").cpu_count(),
                     devices=[str(dv) for dv in jax.devices()]),
        versions=dict(jax=jax.__version__, jaxgeom=jaxgeom.__version__,
                      python=platform.python_version()),
        settings=dict(repeats=repeats, dtype="float32", variant="classif_logits",
                      solve_regul=SOLVE_REGUL, cg_maxiter=CG_MAXITER),
        models={},
    )
    for name in args.models:
        results["models"][name] = bench_model(MODELS[name], repeats, operations,
                                              args.representations)
    print_report(results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
