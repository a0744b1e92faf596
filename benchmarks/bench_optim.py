"""Time one training step of each natural-gradient transform beside a plain Adam step.

Usage::

    python benchmarks/bench_optim.py --quick                 # bench_mlp: Adam and amortised K-FAC
    python benchmarks/bench_optim.py --out optim.json         # both models, every transform
    python benchmarks/bench_optim.py --models bench_small --steps 20

The models and synthetic data are those of ``models.py`` (float32, fixed seeds): the
whole data set (``N`` examples) is the batch of every step. A step is one jitted call
``(params, state, batch, key) -> (params, state)``: the gradient of the mean
cross-entropy, ``tx.update`` with the batch and key as optax extra arguments, and
``optax.apply_updates``. For each transform the script reports the first call (tracing,
compilation and one step) apart from the warm steps, and the **median** and **mean** of
``--steps`` consecutive warm steps (they differ for transforms that refresh their
curvature or inverse every few steps: the median is the cheap step, the mean the
amortised cost), each also as a ratio to Adam's median step in the same run.

kfac-jax is not a dependency. Where it is installed, the comparable number is the warm
median of ``kfac_jax.Optimizer(value_and_grad_func, l2_reg=0.0,
use_adaptive_learning_rate=False, use_adaptive_damping=False, learning_rate_schedule=..,
initial_damping=1e-3, curvature_ema=0.95, inverse_update_period=10,
multi_device=False).step(params, state, rng, batch=batch)`` on the same model (its layers
registered automatically) next to the "K-FAC, EMA, inverse every 10" line here.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).parent))
from models import SPECS as MODELS  # noqa: E402
from models import init_params, make_apply, num_params  # noqa: E402
from models import make_data as _make_data  # noqa: E402

import jaxgeom as jg  # noqa: E402
from jaxgeom import optim  # noqa: E402

LR = 1e-2


def transforms(model, apply_fn, batch):
    """``name -> (transform, models it runs on)``."""
    chunk = {"batch_size": model.batch_size}
    stored = dict(apply_fn=apply_fn, example_batch=batch)
    out = {
        "Adam": optax.adam(LR),
        "SGD": optax.sgd(LR),
        "K-FAC (exact Fisher, every step)": optim.natural_gradient(
            LR, jg.PMatKFAC, damping=1e-3),
        "K-FAC (MC Fisher, every step)": optim.natural_gradient(
            LR, jg.PMatKFAC, damping=1e-3, fisher="monte_carlo"),
        "K-FAC, EMA, inverse every 10": optim.natural_gradient(
            LR, jg.PMatKFAC, damping=1e-3, ema=0.95, inverse_period=10, **stored),
        "K-FAC, curvature+inverse every 10": optim.natural_gradient(
            LR, jg.PMatKFAC, damping=1e-3, curvature_period=10, inverse_period=10, **stored),
        "K-FAC + LM damping + KL clip": optim.natural_gradient(
            LR, jg.PMatKFAC, damping=optim.LevenbergMarquardt(), kl_clip=1e-3),
        "Diag (MC Fisher)": optim.natural_gradient(
            LR, jg.PMatDiag, damping=1e-3, fisher="monte_carlo", fim_options=chunk),
        "Hessian-free (CG, 10 iterations)": optim.natural_gradient(
            LR, jg.PMatImplicit, damping=1e-3, solve_options={"maxiter": 10}),
    }
    if num_params(model) <= 10_000:  # layer blocks of bench_mlp are too large to store
        out["BlockDiag (MC Fisher)"] = optim.natural_gradient(
            LR, jg.PMatBlockDiag, damping=1e-3, fisher="monte_carlo", fim_options=chunk)
    try:
        from jaxgeom.pmat.ekfac import PMatEKFAC
    except ImportError:
        return out
    out["EK-FAC (every step)"] = optim.natural_gradient(LR, PMatEKFAC, damping=1e-3)
    out["EK-FAC, basis every 10, refit every step"] = optim.natural_gradient(
        LR, PMatEKFAC, damping=1e-3, curvature_period=1, inverse_period=10, **stored)
    return out


QUICK = ("Adam", "K-FAC, EMA, inverse every 10")


def bench_transform(tx, apply_fn, params, batch, steps):
    def loss(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y).mean()

    @jax.jit
    def step(p, state, batch, key):
        grads = jax.grad(loss)(p, *batch)
        updates, state = tx.update(grads, state, p, batch=batch, key=key, apply_fn=apply_fn)
        return optax.apply_updates(p, updates), state

    state = tx.init(params)
    keys = jax.random.split(jax.random.key(0), steps + 1)
    start = time.perf_counter()
    params, state = jax.block_until_ready(step(params, state, batch, keys[0]))
    first = time.perf_counter() - start
    runs = []
    for key in keys[1:]:
        start = time.perf_counter()
        params, state = jax.block_until_ready(step(params, state, batch, key))
        runs.append(time.perf_counter() - start)
    return dict(first_s=first, median_s=statistics.median(runs), mean_s=statistics.mean(runs),
                runs=runs)


def bench_model(model, names, steps):
    apply_fn = make_apply(model)
    params = init_params(model)
    batch = tuple(jnp.asarray(a) for a in _make_data(model))
    results = {}
    for name, tx in transforms(model, apply_fn, batch).items():
        if names is not None and name not in names:
            continue
        results[name] = bench_transform(tx, apply_fn, params, batch, steps)
        r = results[name]
        print(f"  {name:36s} first {r['first_s']:7.2f} s   median {1e3 * r['median_s']:9.2f} ms"
              f"   mean {1e3 * r['mean_s']:9.2f} ms", flush=True)
    adam = results["Adam"]["median_s"]
    for r in results.values():
        r["median_x_adam"] = r["median_s"] / adam
        r["mean_x_adam"] = r["mean_s"] / adam
    return results


def print_report(all_results):
    for model, results in all_results.items():
        print(f"\n{model}: ms per training step (warm), ratio to Adam's median step")
        print(f"{'transform':36s} {'compile+1st s':>13s} {'median ms':>10s} {'x Adam':>7s} "
              f"{'mean ms':>9s} {'x Adam':>7s}")
        for name, r in results.items():
            print(f"{name:36s} {r['first_s']:13.2f} {1e3 * r['median_s']:10.2f} "
                  f"{r['median_x_adam']:7.1f} {1e3 * r['mean_s']:9.2f} {r['mean_x_adam']:7.1f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["bench_small", "bench_mlp"],
                        choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=20, help="warm steps timed (median, mean)")
    parser.add_argument("--quick", action="store_true",
                        help="bench_mlp: Adam and amortised K-FAC, 10 steps (under a minute)")
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")
    args = parser.parse_args(argv)
    names, models, steps = None, args.models, args.steps
    if args.quick:
        names, models, steps = QUICK, ["bench_mlp"], 10
    all_results = {}
    for name in models:
        model = MODELS[name]
        print(f"{name}: layers {model.layers}, N = {model.n}", flush=True)
        all_results[name] = bench_model(model, names, steps)
    print_report(all_results)
    if args.out:
        meta = dict(machine=platform.platform(), processor=platform.processor(),
                    devices=[str(d) for d in jax.devices()], jax=jax.__version__,
                    optax=optax.__version__, python=platform.python_version(),
                    steps=steps, learning_rate=LR, dtype=str(jnp.float32.dtype))
        Path(args.out).write_text(json.dumps(dict(meta=meta, results=all_results), indent=1))
        print(f"results written to {args.out}")
    return all_results


if __name__ == "__main__":
    main()
