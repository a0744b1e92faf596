"""How fast XLA:CPU writes a low-rank factor's rows, one chunk at a time, form by form.

Usage::

    python benchmarks/bench_row_writes.py --out row_writes.json
    python benchmarks/bench_row_writes.py --model bench_mlp --examples 64

``PMatLowRank``'s build writes each chunk's per-example Jacobian rows into one ``(N, d)``
buffer (``N K`` rows for the exact Fisher; ``N`` for one Monte-Carlo trial) inside the
chunk's compiled step: per dense layer the row block is the outer product of the layer's
inputs ``a`` (bias column included) and output gradients ``g``, ``(C, a, g)``, reshaped to
the ``(C, a·g)`` columns of the layer's leaves and written by one ``dynamic_update_slice``
(``jaxgeom.jacobian.JacobianBuilder.update``). bench_small's Monte-Carlo build is 2× its
floor, most of it in those writes. This script times the same writes, bench_small's shapes
(random inputs and gradients), in the forms one could give them:

- ``jaxgeom``: the builder's form (the outer products fused into the writes);
- ``formed pieces``: each layer's outer product formed first (an optimisation barrier),
  then written as its ``(C, a·g)`` reshape;
- ``reshaped apart``: the same with a second barrier between the reshape and the write (on
  XLA:CPU both barriers are gone before fusion — its pipeline expands them early —, and
  the product, the reshape and the write are still one kernel);
- ``whole rows`` / ``flat rows``: a formed ``(C, d)`` block of rows copied in (no
  arithmetic: a copy's cost), as a 2-D and as a 1-D ``dynamic_update_slice``;
- ``scatter windows``: ``lax.scatter`` of the ``a`` windows ``(C, g)`` of each layer;
- ``feature loop``: a ``fori_loop`` over the ``a`` input features writing ``(C, g)`` slabs;
- ``leaf buffers``: each layer's ``(C, a, g)`` written into a buffer of its own,
  ``(N, a, g)``: no reshape (not ``PMatLowRank``'s ``(r, d)`` factor layout);
- ``fresh arrays``: the outer products as new arrays (the suite's ``lowrank_outer`` floor).

Every form writes ``N / C`` chunks per call into buffers already written once (donated:
no page faults, no allocation), in alternated blocks (``output.alternated``); the table
gives the medians and each form's time over ``jaxgeom``'s. Results are checked equal to
``jaxgeom``'s. Compilation is not timed.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import models  # noqa: E402
from output import alternated, run_header, write_json  # noqa: E402


def forms(layers: list[tuple[int, int]], n: int, chunk: int, seed: int = 0) -> dict:
    """Form name → ``(write, state)``: ``write(state, offset)`` writes one chunk's rows at
    row ``offset`` into the (donated) ``state`` and returns it."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    d = sum(a * g for a, g in layers)
    keys = jax.random.split(jax.random.key(seed), 2 * len(layers))
    inputs = [jax.random.normal(k, (chunk, a)) for k, (a, _) in zip(keys[::2], layers)]
    grads = [jax.random.normal(k, (chunk, g)) for k, (_, g) in zip(keys[1::2], layers)]

    def outer(a, g):
        return a[:, :, None] * g[:, None, :]

    def by_columns(buf, offset, pieces):
        column = 0
        for piece in pieces:
            piece = piece.reshape(chunk, -1)
            buf = lax.dynamic_update_slice(buf, piece, (offset, column))
            column += piece.shape[1]
        return buf

    def jaxgeom_form(buf, offset):
        return by_columns(buf, offset, [outer(a, g) for a, g in zip(inputs, grads)])

    def formed_pieces(buf, offset):
        pieces = lax.optimization_barrier([outer(a, g) for a, g in zip(inputs, grads)])
        return by_columns(buf, offset, pieces)

    def reshaped_apart(buf, offset):
        pieces = lax.optimization_barrier([outer(a, g) for a, g in zip(inputs, grads)])
        pieces = lax.optimization_barrier([p.reshape(chunk, -1) for p in pieces])
        return by_columns(buf, offset, pieces)

    rows = jnp.concatenate([outer(a, g).reshape(chunk, -1) for a, g in zip(inputs, grads)], 1)

    def whole_rows(buf, offset):
        return lax.dynamic_update_slice(buf, rows, (offset, 0))

    def flat_rows(buf, offset):
        flat = lax.dynamic_update_slice(buf.reshape(-1), rows.reshape(-1), (offset * d,))
        return flat.reshape(buf.shape)

    def scatter_windows(buf, offset):
        column = 0
        numbers = lax.ScatterDimensionNumbers(update_window_dims=(0, 2),
                                              inserted_window_dims=(),
                                              scatter_dims_to_operand_dims=(0, 1))
        for a, g in zip(inputs, grads):
            width, height = a.shape[1], g.shape[1]
            starts = jnp.stack([jnp.full((width,), offset),
                                column + height * jnp.arange(width)], 1)
            buf = lax.scatter(buf, starts, outer(a, g), numbers, indices_are_sorted=True,
                              unique_indices=True, mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)
            column += width * height
        return buf

    def feature_loop(buf, offset):
        column = 0
        for a, g in zip(inputs, grads):
            height = g.shape[1]

            def slab(i, buf, at=a.T, g=g, column=column, height=height):
                feature = lax.dynamic_index_in_dim(at, i, keepdims=False)[:, None]
                return lax.dynamic_update_slice(buf, feature * g, (offset, column + i * height))

            buf = lax.fori_loop(0, a.shape[1], slab, buf, unroll=4)
            column += a.shape[1] * height
        return buf

    def leaf_buffers(bufs, offset):
        return [lax.dynamic_update_slice(b, outer(a, g), (offset, 0, 0))
                for b, a, g in zip(bufs, inputs, grads)]

    def fresh_arrays(_, offset):
        return [outer(a, g) for a, g in zip(inputs, grads)]

    buffer = functools.partial(jnp.zeros, (n, d), jnp.float32)
    return {
        "jaxgeom": (jaxgeom_form, buffer),
        "formed pieces": (formed_pieces, buffer),
        "reshaped apart": (reshaped_apart, buffer),
        "whole rows": (whole_rows, buffer),
        "flat rows": (flat_rows, buffer),
        "scatter windows": (scatter_windows, buffer),
        "feature loop": (feature_loop, buffer),
        "leaf buffers": (leaf_buffers, lambda: [jnp.zeros((n, a, g), jnp.float32)
                                               for a, g in layers]),
        "fresh arrays": (fresh_arrays, lambda: None),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bench_small", choices=["bench_small", "bench_mlp"])
    parser.add_argument("--examples", type=int, default=None,
                        help="rows N (default: the model's examples; one Monte-Carlo trial)")
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import jax
    import numpy as np

    spec = models.SPECS[args.model]
    layers = [(a, g) for kind, a, g, t in models.layer_shapes(spec) if kind == "dense"]
    n, chunk = args.examples or spec.n, spec.batch_size
    offsets = list(range(0, n, chunk))
    calls, results = {}, {}
    for name, (write, make) in forms(layers, n, chunk).items():
        step = jax.jit(write, donate_argnums=(0,) if name != "fresh arrays" else ())
        state = {"buffer": make()}

        def call(step=step, state=state):
            for offset in offsets:
                state["buffer"] = step(state["buffer"], offset)
            return state["buffer"]

        jax.block_until_ready(call())  # compiled; every page written once
        calls[name] = call
        results[name] = state
    reference = np.asarray(results["jaxgeom"]["buffer"])
    for name in ("formed pieces", "reshaped apart", "scatter windows", "feature loop"):
        np.testing.assert_array_equal(np.asarray(results[name]["buffer"]), reference)
    leaves = np.concatenate([np.asarray(b).reshape(n, -1)
                             for b in results["leaf buffers"]["buffer"]], 1)
    np.testing.assert_array_equal(leaves, reference)

    runs = alternated(calls, args.blocks, args.repeats)
    base = statistics.median(runs["jaxgeom"])
    d = reference.shape[1]
    print(f"{args.model}: {len(offsets)} chunks of {chunk} rows into ({n}, {d}) float32 "
          f"({n * d * 4 / 2**20:.1f} MiB); layers (a with the bias, g): {layers}")
    print(f"{'form':<18}{'ms':>9}{'× jaxgeom':>11}")
    rows = {}
    for name, times in runs.items():
        median = statistics.median(times)
        rows[name] = dict(warm_s=median, vs_jaxgeom=median / base, runs=times)
        print(f"{name:<18}{median * 1e3:>9.3f}{median / base:>11.2f}")
    out = dict(run_header("bench_row_writes.py", argv), model=args.model, n=n, d=d,
               chunk=chunk, layers=layers, forms=rows)
    write_json(out, args.out)
    return out


if __name__ == "__main__":
    main()
