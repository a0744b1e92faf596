"""Time one training step of each natural-gradient transform beside a plain Adam step.

Usage::

    python benchmarks/bench_optim.py --quick                 # bench_mlp: Adam and amortised K-FAC
    python benchmarks/bench_optim.py --out optim.json         # both models, every transform
    python benchmarks/bench_optim.py --models bench_small --steps 20

The models and synthetic data are those of ``models.py`` (float32, fixed seeds): the
whole data set (``N`` examples) is the batch of every step. A step is one jitted call
``(params, state, batch, key) -> (params, state)`` with the parameters and the state
donated, as in a training loop: the gradient of the mean cross-entropy, ``tx.update`` with
the batch and key as optax extra arguments, and ``optax.apply_updates``. For each
transform the script reports the first call (tracing, compilation and one step) apart
from the warm steps, and the **median** and **mean** of ``--steps`` consecutive warm
steps (they differ for transforms that refresh their curvature or inverse every few
steps: the median is the cheap step, the mean the amortised cost), each also as a ratio
to Adam's median step in the same run.

kfac-jax is not a dependency. Where it is installed (the peers' venv of README.md), the
run adds ``kfac_jax.Optimizer(value_and_grad_func, l2_reg=0.0,
use_adaptive_learning_rate=False, learning_rate_schedule=lr, use_adaptive_momentum=False,
momentum_schedule=0, use_adaptive_damping=False, damping_schedule=1e-3,
curvature_ema=0.95, inverse_update_period=10, estimation_mode=..., num_burnin_steps=0,
multi_device=False).step(params, state, rng, batch=batch)`` (it jits and donates its
arguments itself) with the exact Fisher (``fisher_exact``) and one Monte-Carlo sample
(``fisher_gradients``), each against the jaxgeom transform configured alike (π damping,
``"K-FAC π, …, EMA, inverse every 10"``): the two training loops' steps timed in
alternated blocks of 10 (one inverse period, after an untimed step), ``2 × --steps``
per side, and kfac-jax's median and mean over jaxgeom's from those blocks.
"""

from __future__ import annotations

import argparse
import functools
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
        "K-FAC π, EMA, inverse every 10": optim.natural_gradient(
            LR, jg.PMatKFAC, damping=1e-3, ema=0.95, inverse_period=10,
            solve_options={"damping": "pi"}, **stored),
        "K-FAC π, MC Fisher, EMA, inverse every 10": optim.natural_gradient(
            LR, jg.PMatKFAC, damping=1e-3, ema=0.95, inverse_period=10, fisher="monte_carlo",
            solve_options={"damping": "pi"}, **stored),
        "K-FAC π, MC Fisher, EMA, inverse every 10, adaptive lr+momentum":
            optim.natural_gradient(None, jg.PMatKFAC, damping=1e-3, ema=0.95,
                                   inverse_period=10, fisher="monte_carlo",
                                   solve_options={"damping": "pi"}, adaptive="momentum",
                                   **stored),
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

#: kfac-jax's optimizer configured as the transform named (π damping, EMA 0.95 of the
#: factors, inverse every 10 steps, fixed damping; a fixed learning rate and no momentum,
#: or both chosen by the quadratic model where the third entry is True)
KFAC_JAX = {
    "kfac-jax, EMA, inverse every 10": ("fisher_exact", "K-FAC π, EMA, inverse every 10",
                                        False),
    "kfac-jax, MC Fisher, EMA, inverse every 10": (
        "fisher_gradients", "K-FAC π, MC Fisher, EMA, inverse every 10", False),
    "kfac-jax, MC Fisher, EMA, inverse every 10, adaptive lr+momentum": (
        "fisher_gradients", "K-FAC π, MC Fisher, EMA, inverse every 10, adaptive lr+momentum",
        True),
}


class Stepper:
    """A training loop advanced one timed step at a time: ``first_s`` is the first step
    (tracing and compilation included), ``step()`` runs the next one and returns its
    seconds."""

    def __init__(self, run, params, state, steps):
        self._run, self._params, self._state = run, params, state
        self._keys = list(jax.random.split(jax.random.key(0), steps + 1))  # made once
        self.first_s = self.step()

    def step(self) -> float:
        key = self._keys.pop(0)
        start = time.perf_counter()
        self._params, self._state = jax.block_until_ready(
            self._run(self._params, self._state, key))
        return time.perf_counter() - start


def transform_stepper(tx, apply_fn, params, batch, steps) -> Stepper:
    def loss(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y).mean()

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, state, batch, key):
        grads = jax.grad(loss)(p, *batch)
        updates, state = tx.update(grads, state, p, batch=batch, key=key, apply_fn=apply_fn)
        return optax.apply_updates(p, updates), state

    params = jax.tree_util.tree_map(jnp.copy, params)  # donated to the steps
    return Stepper(lambda p, s, key: step(p, s, batch, key), params, tx.init(params), steps)


def kfac_jax_stepper(estimation_mode, apply_fn, params, batch, steps,
                     adaptive: bool = False) -> Stepper:
    """``kfac_jax.Optimizer(...).step`` (it jits and donates its arguments itself)."""
    import kfac_jax
    from peers import _patch_kfac_jax

    _patch_kfac_jax()

    def loss(p, batch):
        logits = apply_fn(p, batch[0])
        kfac_jax.register_softmax_cross_entropy_loss(logits, batch[1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    optimizer = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss), l2_reg=0.0,
        use_adaptive_learning_rate=adaptive,
        learning_rate_schedule=None if adaptive else (lambda _: LR),
        use_adaptive_momentum=adaptive,
        momentum_schedule=None if adaptive else (lambda _: 0.0),
        use_adaptive_damping=False, damping_schedule=lambda _: 1e-3,
        curvature_ema=0.95, inverse_update_period=10, estimation_mode=estimation_mode,
        num_burnin_steps=0, multi_device=False)
    params = jax.tree_util.tree_map(jnp.copy, params)
    state = optimizer.init(params, jax.random.key(1), batch)

    def run(p, s, key):
        p, s, _ = optimizer.step(p, s, key, batch=batch)
        return p, s

    return Stepper(run, params, state, steps)


def bench_transform(tx, apply_fn, params, batch, steps):
    stepper = transform_stepper(tx, apply_fn, params, batch, steps)
    runs = [stepper.step() for _ in range(steps)]
    return dict(first_s=stepper.first_s, median_s=statistics.median(runs),
                mean_s=statistics.mean(runs), runs=runs)


def bench_pair(ours: Stepper, theirs: Stepper, steps: int, block: int = 10) -> dict:
    """The two loops' steps timed in alternated blocks of ``block`` steps (one inverse
    period: each block has one refresh), ``steps`` per side, each block after one untimed
    step: medians, means and kfac-jax's over jaxgeom's (a shared machine's speed drifts
    over the minutes between two separate runs)."""
    times: dict = {"ours": [], "theirs": []}
    for r in range(max(1, steps // block)):
        for side in ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours"):
            stepper = ours if side == "ours" else theirs
            stepper.step()  # untimed: the first step after the other loop's block is slower
            times[side] += [stepper.step() for _ in range(block)]
    out = {f"{stat}_s_{side}": fn(t) for side, t in times.items()
           for stat, fn in (("median", statistics.median), ("mean", statistics.mean))}
    out["median_ratio"] = out["median_s_theirs"] / out["median_s_ours"]
    out["mean_ratio"] = out["mean_s_theirs"] / out["mean_s_ours"]
    return out


def bench_model(model, names, steps, pairs=False):
    apply_fn = make_apply(model)
    params = init_params(model)
    batch = tuple(jnp.asarray(a) for a in _make_data(model))
    results = {}
    for name, tx in transforms(model, apply_fn, batch).items():
        if names is not None and name not in names:
            continue
        results[name] = bench_transform(tx, apply_fn, params, batch, steps)
        r = results[name]
        print(f"  {name:42s} first {r['first_s']:7.2f} s   median {1e3 * r['median_s']:9.2f} ms"
              f"   mean {1e3 * r['mean_s']:9.2f} ms", flush=True)
    if (names is None or pairs) and _has_kfac_jax():
        txs = transforms(model, apply_fn, batch)
        for name, (mode, ours, adaptive) in KFAC_JAX.items():
            if names is not None and ours not in names:
                continue
            theirs = kfac_jax_stepper(mode, apply_fn, params, batch, 3 * steps, adaptive)
            mine = transform_stepper(txs[ours], apply_fn, params, batch, 3 * steps)
            pair = bench_pair(mine, theirs, 2 * steps)
            results[name] = r = dict(
                first_s=theirs.first_s, median_s=pair["median_s_theirs"],
                mean_s=pair["mean_s_theirs"], same_as=ours, paired=pair,
                median_ratio=pair["median_ratio"], mean_ratio=pair["mean_ratio"])
            print(f"  {name:42s} first {r['first_s']:7.2f} s   median "
                  f"{1e3 * r['median_s']:9.2f} ms   mean {1e3 * r['mean_s']:9.2f} ms   "
                  f"kfac-jax/jaxgeom {r['median_ratio']:.2f} (median), "
                  f"{r['mean_ratio']:.2f} (mean), paired against jaxgeom's "
                  f"{1e3 * pair['median_s_ours']:.2f} / {1e3 * pair['mean_s_ours']:.2f} ms",
                  flush=True)
    adam = results["Adam"]["median_s"]
    for r in results.values():
        r["median_x_adam"] = r["median_s"] / adam
        r["mean_x_adam"] = r["mean_s"] / adam
    return results


def _has_kfac_jax() -> bool:
    from peers import available

    return available("kfac_jax") is None


def print_report(all_results):
    for model, results in all_results.items():
        print(f"\n{model}: ms per training step (warm), ratio to Adam's median step")
        print(f"{'transform':42s} {'compile+1st s':>13s} {'median ms':>10s} {'x Adam':>7s} "
              f"{'mean ms':>9s} {'x Adam':>7s}")
        for name, r in results.items():
            peer = (f"   kfac-jax/jaxgeom {r['median_ratio']:.2f} / {r['mean_ratio']:.2f}"
                    if "same_as" in r else "")
            print(f"{name:42s} {r['first_s']:13.2f} {1e3 * r['median_s']:10.2f} "
                  f"{r['median_x_adam']:7.1f} {1e3 * r['mean_s']:9.2f} {r['mean_x_adam']:7.1f}"
                  + peer)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["bench_small", "bench_mlp"],
                        choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=20, help="warm steps timed (median, mean)")
    parser.add_argument("--quick", action="store_true",
                        help="bench_mlp: Adam and amortised K-FAC, 10 steps (under a minute)")
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")
    parser.add_argument("--transforms", nargs="+", metavar="NAME",
                        help="only these transforms (and Adam), with kfac-jax's paired "
                             "where one is configured as them")
    args = parser.parse_args(argv)
    names, models, steps = None, args.models, args.steps
    if args.transforms:
        names = ("Adam", *args.transforms)
    if args.quick:
        names, models, steps = QUICK, ["bench_mlp"], 10
    all_results = {}
    for name in models:
        model = MODELS[name]
        print(f"{name}: layers {model.layers}, N = {model.n}", flush=True)
        all_results[name] = bench_model(model, names, steps, pairs=bool(args.transforms))
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
