"""A tour of jaxgeom in one run: train a small CNN, then build its Fisher in every representation.

Run it with::

    python -m jaxgeom.demo                 # float32, ~100 Adam steps, 256 examples
    python -m jaxgeom.demo --float64 --examples 512

It trains a Flax linen CNN on scikit-learn's bundled 8x8 digits (no download), prints the
train/test accuracy, then builds the exact Fisher information matrix
(``variant="classif_logits"``) of the trained network on ``--examples`` training examples,
``--batch-size`` at a time, in each representation of :data:`REPRESENTATIONS` (plus a
Monte-Carlo Fisher), and prints one line per representation: the number of floats it
stores, the build time, its trace and Frobenius norm, and the relative error of its
matrix-vector product against the dense exact Fisher for a random vector.

Needs the ``examples`` extra (``pip install ".[examples]"``) for scikit-learn.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Line:
    """One line of the table: a label and how to build the matrix.

    ``build(apply_fn, params, data, batch_size, key)`` returns a representation;
    ``name`` is the representation's name in :mod:`jaxgeom`.
    """

    label: str
    name: str
    build: Callable[..., Any]


def _exact(name: str) -> Line:
    def build(apply_fn, params, data, batch_size, key):
        import jaxgeom

        del key
        return jaxgeom.FIM(apply_fn, params, data, getattr(jaxgeom, name),
                           variant="classif_logits", batch_size=batch_size)

    return Line(f"FIM {name}", name, build)


def _monte_carlo(name: str, trials: int = 1) -> Line:
    def build(apply_fn, params, data, batch_size, key):
        import jaxgeom

        return jaxgeom.FIM_MonteCarlo(apply_fn, params, data, getattr(jaxgeom, name), key=key,
                                      trials=trials, variant="classif_logits",
                                      batch_size=batch_size)

    return Line(f"FIM_MonteCarlo {name} (trials={trials})", name, build)


#: The lines of the table, in order. The first one is the reference for the ``mv`` error
#: (it must be the dense exact Fisher).
REPRESENTATIONS: tuple[Line, ...] = (
    _exact("PMatDense"),
    _exact("PMatBlockDiag"),
    _exact("PMatDiag"),
    _exact("PMatLowRank"),
    _exact("PMatImplicit"),
    _exact("PMatKFAC"),
    _exact("PMatEKFAC"),
    _exact("PMatQuasiDiag"),
    _monte_carlo("PMatDense"),
)


# ----------------------------------------------------------------------------- helpers
def stored_floats(pmat: Any, exclude: Any = ()) -> int:
    """The number of floats a representation stores: the total size of its array leaves.

    Leaves that are (the same objects as) leaves of ``exclude`` — e.g. the params and the
    data that an implicit representation keeps a reference to — are not counted.
    """
    skip = {id(leaf) for leaf in jax.tree_util.tree_leaves(exclude)}
    return sum(
        int(np.size(leaf))
        for leaf in jax.tree_util.tree_leaves(pmat)
        if isinstance(leaf, (jax.Array, np.ndarray)) and id(leaf) not in skip
    )


def _maybe(fn: Callable[[], Any]) -> Any:
    """``fn()`` as a float, or ``None`` if the representation does not support it."""
    try:
        return float(jax.block_until_ready(fn()))
    except NotImplementedError:
        return None


def _load_digits(seed: int, dtype: Any):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(dtype)[..., None]  # (1797, 8, 8, 1), NHWC
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    n_test = 297
    return (x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])


def _model():
    from flax import linen as nn

    class CNN(nn.Module):
        """Conv(8, 3x3) - relu - avg-pool 2x2 - Conv(8, 3x3) - relu - Dense(10)."""

        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(8, (3, 3))(x))
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
            x = nn.relu(nn.Conv(8, (3, 3))(x))
            x = x.reshape((x.shape[0], -1))
            return nn.Dense(10)(x)

    return CNN()


def train(steps: int, seed: int, dtype: Any):
    """Train the CNN with Adam (minibatches of 128); return ``(apply_fn, params, train, test)``."""
    import optax

    (x_train, y_train), (x_test, y_test) = _load_digits(seed, dtype)
    model = _model()

    def apply_fn(params, x):
        return model.apply({"params": params}, x)

    key = jax.random.key(seed)
    params = model.init(key, jnp.asarray(x_train[:1]))["params"]
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)  # Flax inits float32
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(params)

    def loss_fn(params, x, y):
        logits = apply_fn(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.choice(len(y_train), 128, replace=False)
        params, opt_state, _ = step(params, opt_state, x_train[idx], y_train[idx])

    @jax.jit
    def accuracy(params, x, y):
        return jnp.mean(jnp.argmax(apply_fn(params, x), -1) == y)

    print(f"trained {steps} Adam steps: train accuracy "
          f"{float(accuracy(params, x_train, y_train)):.3f}, test accuracy "
          f"{float(accuracy(params, x_test, y_test)):.3f}")
    return apply_fn, params, (x_train, y_train), (x_test, y_test)


def _format(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def fisher_table(apply_fn, params, data, batch_size: int, seed: int,
                 lines: tuple[Line, ...] = REPRESENTATIONS) -> list[dict]:
    """Build every line of ``lines`` and measure it; returns one dict per line."""
    import jaxgeom

    key_v, key_mc = jax.random.split(jax.random.key(seed + 1))
    v = jaxgeom.random_pvector(key_v, params)
    reference = None
    rows = []
    for line in lines:
        start = time.perf_counter()
        pmat = jax.block_until_ready(line.build(apply_fn, params, data, batch_size, key_mc))
        build_s = time.perf_counter() - start
        fv = pmat.mv(v).to_flat()
        if reference is None:
            reference = fv
        rel = float(jnp.linalg.norm(fv - reference) / jnp.linalg.norm(reference))
        rows.append(dict(
            representation=line.label,
            stored=stored_floats(pmat, exclude=(params, data)),
            build_s=build_s,
            trace=_maybe(pmat.trace),
            frobenius=_maybe(pmat.frobenius_norm),
            mv_rel_error=rel,
        ))
    return rows


def print_table(rows: list[dict]) -> None:
    header = ("representation", "stored floats", "build (s)", "trace", "Frobenius",
              "mv rel. error")
    cells = [header] + [
        (r["representation"], f"{r['stored']:,}", f"{r['build_s']:.2f}",
         _format(r["trace"], ".5g"), _format(r["frobenius"], ".5g"),
         f"{r['mv_rel_error']:.1e}")
        for r in rows
    ]
    widths = [max(len(row[c]) for row in cells) for c in range(len(header))]
    for i, row in enumerate(cells):
        print("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w)
                        for c, (cell, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        prog="python -m jaxgeom.demo",
        description="Train a small CNN on the digits data, then build its Fisher in every "
        "jaxgeom representation and compare them.",
    )
    parser.add_argument("--steps", type=int, default=100, help="Adam steps (default 100)")
    parser.add_argument("--examples", type=int, default=256,
                        help="training examples the Fisher is built on (default 256)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="chunk size of the Fisher builds (default 64)")
    parser.add_argument("--float64", action="store_true", help="compute in float64")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.float64:
        jax.config.update("jax_enable_x64", True)
    dtype = np.float64 if args.float64 else np.float32

    import jaxgeom

    apply_fn, params, (x_train, y_train), test = train(args.steps, args.seed, dtype)
    x = jnp.asarray(x_train[: args.examples])
    y = jnp.asarray(y_train[: args.examples])
    layers = jaxgeom.LayerCollection.from_model(apply_fn, params, x[:1])
    print(f"\n{layers}\n")
    print(f"Fisher of the trained CNN (variant='classif_logits', K = 9 outputs per example) on "
          f"{x.shape[0]} examples,\nbatch_size={args.batch_size}, {jnp.dtype(dtype).name}. "
          "Build times include compilation; the mv error is\n||F v - F_dense v|| / ||F_dense v||"
          " for a random v (for approximations it is the approximation error).\n")
    rows = fisher_table(apply_fn, params, (x, y), args.batch_size, args.seed)
    print_table(rows)
    ntk_kernel_regression(apply_fn, params, (x, y), test, args.batch_size)
    return rows


def ntk_kernel_regression(apply_fn, params, train_data, test_data, batch_size: int,
                          num_test: int = 200) -> float:
    """Kernel regression with the empirical NTK of the trained network; prints its accuracy.

    One Gram matrix over train ∪ test examples (``(10, N, 10, N)``, built in chunks), ridge
    regression of one-hot targets on the train block, predictions from the test/train block.
    """
    import jaxgeom

    (x, y), (x_test, y_test) = train_data, test_data
    n_train, num_test = x.shape[0], min(num_test, x_test.shape[0])
    inputs = jnp.concatenate([x, jnp.asarray(x_test[:num_test])])
    start = time.perf_counter()
    gram = jaxgeom.GramMatrix(apply_fn, params, inputs, batch_size=batch_size)
    train_block = jaxgeom.FMatDense(gram.data[:, :n_train, :, :n_train])
    targets = jax.nn.one_hot(y, 10, dtype=train_block.data.dtype).T  # (K, N_train)
    ridge = 1e-3 * train_block.trace() / (10 * n_train)
    alpha = train_block.solve(targets, ridge)
    predictions = jnp.einsum("omkn,kn->om", gram.data[:, n_train:, :, :n_train], alpha)
    accuracy = float(jnp.mean(jnp.argmax(predictions, 0) == jnp.asarray(y_test[:num_test])))
    print(f"\nNTK kernel regression (empirical NTK of the trained CNN, {n_train} training "
          f"examples): test accuracy {accuracy:.3f} on {num_test} test examples "
          f"({time.perf_counter() - start:.1f} s)")
    return accuracy


if __name__ == "__main__":
    main()
