"""Train a Flax MLP on scikit-learn's digits with SGD, Adam, K-FAC and EK-FAC.

Every optimizer is an optax transform; the natural-gradient ones come from
``jaxgeom.optim.natural_gradient`` and take the batch (for the Fisher) through optax's
extra arguments. The script reports, per optimizer, the steps and seconds (compilation
excluded) to reach a target training loss, the final test accuracy, and saves a plot of
the training loss against steps and seconds.

    python examples/train_digits.py --steps 300 --out digits.png
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from flax import linen as nn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jaxgeom as jg
from jaxgeom import optim

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


class MLP(nn.Module):
    hidden: int = 64
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(self.hidden)(x))
        return nn.Dense(self.classes)(x)


def digits(classes=range(10), seed=0):
    """Standardised digits ``(x_train, y_train, x_test, y_test)`` restricted to ``classes``
    (labels kept as digits; one split and one standardisation for every subset)."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x / 16.0, y, test_size=0.25, random_state=seed, stratify=y)
    mean, std = x_train.mean(0), x_train.std(0) + 0.1
    train, test = np.isin(y_train, list(classes)), np.isin(y_test, list(classes))
    norm = lambda a: jnp.asarray((a - mean) / std, jnp.float32)  # noqa: E731
    return (norm(x_train[train]), jnp.asarray(y_train[train]),
            norm(x_test[test]), jnp.asarray(y_test[test]))


def cross_entropy(apply_fn, params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, x), y).mean()


def accuracy(apply_fn, params, x, y):
    return float(jnp.mean(jnp.argmax(apply_fn(params, x), -1) == y))


def make_train_step(apply_fn, tx, loss_fn):
    """A jitted step ``(params, state, batch, key) -> (params, state)``; ``loss_fn(params,
    x, y)`` is the training objective (the EWC example adds a penalty)."""

    @jax.jit
    def step(params, state, batch, key):
        value, grads = jax.value_and_grad(loss_fn)(params, *batch)
        updates, state = tx.update(grads, state, params, batch=batch, key=key,
                                   apply_fn=apply_fn, value=value)
        return optax.apply_updates(params, updates), state

    return step


def batches(x, y, batch_size, key):
    """An endless stream of shuffled minibatches."""
    n = x.shape[0]
    while True:
        key, sub = jax.random.split(key)
        perm = np.asarray(jax.random.permutation(sub, n))
        for i in range(0, n - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            yield x[idx], y[idx]


def train(tx, apply_fn, params, data, *, steps, batch_size=128, loss_fn=None, seed=0,
          record=True):
    """Train for ``steps`` minibatch steps; returns the params and the history
    ``(step, seconds, training loss)`` (seconds exclude compilation)."""
    x, y = data
    loss_fn = loss_fn or (lambda p, xb, yb: cross_entropy(apply_fn, p, xb, yb))
    step = make_train_step(apply_fn, tx, loss_fn)
    full_loss = jax.jit(lambda p: cross_entropy(apply_fn, p, x, y))
    state = tx.init(params)
    stream = batches(x, y, batch_size, jax.random.PRNGKey(seed))
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), steps)
    jax.block_until_ready(step(params, state, next(stream), keys[0]))  # compile
    history, elapsed = [(0, 0.0, float(full_loss(params)))], 0.0
    for i in range(steps):
        start = time.perf_counter()
        params, state = jax.block_until_ready(step(params, state, next(stream), keys[i]))
        elapsed += time.perf_counter() - start
        if record:
            history.append((i + 1, elapsed, float(full_loss(params))))
    return params, history


def optimizers(example_batch, apply_fn):
    """The compared optimizers."""
    ng = dict(damping=optim.LevenbergMarquardt(initial=1e-1, min_damping=1e-3),
              ema=0.9, curvature_period=1, inverse_period=5, kl_clip=1e-2,
              apply_fn=apply_fn, example_batch=example_batch)
    out = {
        "SGD (lr 0.3, momentum 0.9)": optax.sgd(0.3, momentum=0.9),
        "Adam (lr 1e-2)": optax.adam(1e-2),
        "K-FAC (lr 0.3)": optim.natural_gradient(0.3, jg.PMatKFAC, **ng),
        # eigenbasis every 5 steps, diagonal refit every step
        "EK-FAC (lr 0.3)": optim.natural_gradient(0.3, jg.PMatEKFAC, **ng),
    }
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--target", type=float, default=0.01, help="training loss to reach")
    parser.add_argument("--out", default="train_digits.png", help="plot file")
    args = parser.parse_args()

    x_train, y_train, x_test, y_test = digits()
    model = MLP()
    params = model.init(jax.random.PRNGKey(0), x_train[:1])["params"]

    def apply_fn(p, x):
        return model.apply({"params": p}, x)

    results = {}
    for name, tx in optimizers((x_train[:128], y_train[:128]), apply_fn).items():
        final, history = train(tx, apply_fn, params, (x_train, y_train), steps=args.steps)
        hit = next(((s, t) for s, t, loss in history if loss <= args.target), None)
        results[name] = (history, hit, accuracy(apply_fn, final, x_test, y_test))

    print(f"\ndigits, MLP 64-64-10, {x_train.shape[0]} training examples, batches of 128, "
          f"{args.steps} steps; target training loss {args.target}")
    print(f"{'optimizer':30s} {'steps':>6s} {'seconds':>8s} {'ms/step':>8s} "
          f"{'final loss':>10s} {'test acc':>8s}")
    for name, (history, hit, acc) in results.items():
        steps, secs = (f"{hit[0]}", f"{hit[1]:.2f}") if hit else ("-", "-")
        per_step = 1e3 * history[-1][1] / (len(history) - 1)
        print(f"{name:30s} {steps:>6s} {secs:>8s} {per_step:8.2f} {history[-1][2]:10.4f} "
              f"{acc:8.3f}")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, (history, _, _) in results.items():
        steps, secs, losses = zip(*history)
        axes[0].semilogy(steps, losses, label=name)
        axes[1].semilogy(secs, losses, label=name)
    for ax, label in zip(axes, ("step", "seconds (compilation excluded)")):
        ax.axhline(args.target, color="gray", ls=":")
        ax.set_xlabel(label)
        ax.set_ylabel("training loss")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"plot saved to {args.out}")


if __name__ == "__main__":
    main()
