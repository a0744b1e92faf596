"""The kernels under the operations, XLA:CPU against PyTorch, shape for shape.

Usage::

    python benchmarks/bench_kernels.py --out kernels.json
    python benchmarks/bench_kernels.py --rows Gram      # the rows whose name has "Gram"

Many of ``bench_fim``'s operation rows are one or a few array kernels: ``PMatKFAC.mv`` is
three pairs of GEMMs, ``PMatEKFAC.vTMv`` two rotations and a weighted sum of squares,
``PMatDiag.trace`` one sum of ``d`` floats, ``PMatDiag.mv`` one elementwise product,
``PMatLowRank.mv`` two GEMVs with its ``(N K, d)`` factor; EKFAC's build factorises its
factors with ``eigh`` (LAPACK: SciPy's OpenBLAS for jaxlib, MKL in PyTorch's wheels), and
``PMatDense.solve`` (so BlockDiag's per block, KFAC's π-damped one per factor) is a Cholesky
factorisation and two triangular solves: the ``Cholesky solve`` rows time it written with
``jax.scipy.linalg`` (``cho_factor``/``cho_solve``, which hands LAPACK a transposed copy of
the row-major matrix) and as jaxgeom writes it (``jaxgeom._symmetric``: the symmetric
matrix's transpose, no copy), against ``torch.linalg.cholesky`` + ``torch.cholesky_solve``.
Where such a row is behind NNGeometry, the question is whether jaxgeom adds work around
the kernels or XLA's kernels themselves are slower than PyTorch's on the machine. This
script times the bare kernels of those rows, at the suite's shapes, each side written the
plain way:

- ``XLA``: one ``jax.jit`` call of the kernel, as the suite times an operation;
- ``XLA sync``: the same with ``jax_cpu_enable_async_dispatch = False`` (the computation
  runs in the calling thread: no hand-off to XLA's worker thread and wake-up after it,
  see ``docs/performance.md``, "CPU notes"); a separate process, the setting being
  process-wide;
- ``PyTorch``: the same kernel in eager PyTorch (CPU, its default threads), as NNGeometry
  runs it.

Both sides run in one process per mode, in alternated blocks (``bench_fim.paired``), and
each row prints the medians and the ratio PyTorch / XLA (``ᵖ``: paired; > 1: XLA faster).
Compilation is not timed. Needs ``torch`` (the peers' environment, ``benchmarks/README.md``).
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_fim  # noqa: E402
import models  # noqa: E402
from output import write_json  # noqa: E402

#: bench_mlp's KFAC layer matrices ``(a + 1, g)`` (inputs with the bias, outputs)
MLP_LAYERS = ((785, 512), (513, 512), (513, 10))
#: bench_mlp's number of parameters (the flat diagonal of ``PMatDiag``)
MLP_PARAMS = 669_706
#: bench_cnn's number of parameters: an elementwise product that outlasts the call's
#: hand-off to XLA:CPU's worker thread (the dispatch modes differ most)
CNN_PARAMS = 69_610
#: bench_resnet's dense layer ``(a + 1, g)``: the largest rotation of its EKFAC ``vTMv``
RESNET_DENSE = (2049, 512)
#: bench_resnet's parameter leaves' sizes (a kernel and a bias per layer): the slices of
#: the flat diagonal that ``PMatDiag``'s products with a params-shaped vector read
RESNET_LEAVES = tuple(size for _, a, g, _ in models.layer_shapes(models.SPECS["bench_resnet"])
                      for size in ((a - 1) * g, g))
#: bench_small's LowRank factor: ``N K`` rows of ``d`` parameters
LOWRANK = (9216, 6922)
#: a chunk's output gradients in bench_small's exact KFAC build: 256 examples × 9 outputs
#: of its 64-unit layers, and the same rows one column wider
GRAM_ROWS = ((2304, 64), (2304, 65), (2304, 256))
#: numbers of independent tiny kernels in one call, on both sides of XLA:CPU's threshold:
#: its thunk executor runs a program of at most 8 thunks (or of buffers of at most 512
#: bytes) one thunk after another in the calling thread, a larger one as a dataflow graph
#: whose ready thunks are handed to its thread pool
SMALL_GEMMS = (8, 12, 24)


def kernels(seed: int = 0) -> dict:
    """Row name → ``(description, make)``: ``make(lib)`` returns the argument-free call of
    that library's kernel (``lib``: ``"jax"`` or ``"torch"``), its inputs made once from the
    same float32 NumPy arrays (one Python function for both: the operators are
    the same)."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def normal(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    kfac = [(normal(a, a), normal(g, g), normal(g, a)) for a, g in MLP_LAYERS]
    a, g = RESNET_DENSE
    ekfac = (normal(g, g), normal(g, a), normal(a, a), rng.random((g, a), dtype=np.float32))
    diag = (rng.random(MLP_PARAMS, dtype=np.float32), normal(MLP_PARAMS))
    cnn_diag = (rng.random(CNN_PARAMS, dtype=np.float32), normal(CNN_PARAMS))
    resnet_diag = rng.random(sum(RESNET_LEAVES), dtype=np.float32)
    resnet_leaves = [normal(size) for size in RESNET_LEAVES]
    edges = np.cumsum((0, *RESNET_LEAVES))
    lowrank = (normal(*LOWRANK), normal(LOWRANK[1]))
    square = normal(2048, 2048)
    spd = [x @ x.T / x.shape[1] for x in (normal(785, 1024), normal(2049, 4096))]
    #: bench_small's Dense (6922) and its largest BlockDiag block (4160), a 2112² block
    systems = {n: (_spd(normal(n, n + 16)), normal(n)) for n in (2112, 4160, 6922)}
    tiny = normal(1000)
    smalls = [normal(16, 16) for _ in range(max(SMALL_GEMMS))]
    grams = {shape: normal(*shape) for shape in GRAM_ROWS}

    def on(lib, arrays, fn):
        if lib == "jax":
            import jax
            import jax.numpy as jnp

            args = jax.block_until_ready(jax.tree_util.tree_map(jnp.asarray, arrays))
            jitted = jax.jit(fn)
            return lambda: jitted(*args)
        import torch

        args = [torch.from_numpy(np.array(x)) for x in arrays]
        return lambda: fn(*args)

    def kfac_mv(*mats):  # G V A per layer (V as (g, a), NNGeometry's orientation)
        return [G @ V @ A for A, G, V in zip(mats[0::3], mats[1::3], mats[2::3])]

    def kfac_vtmv(*mats):
        return sum((V * (G @ V @ A)).sum() for A, G, V in zip(mats[0::3], mats[1::3],
                                                             mats[2::3]))

    def ekfac_vtmv(qg, v, qa, d):  # Σ d ⊙ (Q_Gᵀ V Q_A)²
        return (d * (qg.T @ v @ qa) ** 2).sum()

    flat_kfac = [m for layer in kfac for m in layer]
    rows = {
        "GEMM 2048²": ("A A, A: 2048 × 2048", (square,), lambda x: x @ x),
        "KFAC mv GEMMs (bench_mlp)": ("G V A for the three layers", flat_kfac, kfac_mv),
        "KFAC vTMv GEMMs (bench_mlp)": ("Σ ⟨V, G V A⟩", flat_kfac, kfac_vtmv),
        "EKFAC vTMv, dense layer (bench_resnet)": (
            "Σ d ⊙ (Q_Gᵀ V Q_A)², V: 512 × 2049", ekfac, ekfac_vtmv),
        "eigh 785² (bench_mlp EKFAC)": (
            "eigenvalues and vectors of an SPD 785 × 785", spd[:1], _eigh),
        "eigh 2049² (bench_resnet EKFAC)": (
            "eigenvalues and vectors of an SPD 2049 × 2049", spd[1:], _eigh),
        **{f"Cholesky solve {n}² ({how})": (
            f"(M + 10⁻³ I)⁻¹ v, M: SPD {n} × {n}", systems[n], fn)
           for n in systems
           for how, fn in (("jax.scipy.linalg", functools.partial(_cho_solve, how="scipy")),
                           ("jaxgeom", functools.partial(_cho_solve, how="jaxgeom")))},
        "sum of d floats (bench_mlp Diag trace)": (
            "Σ m, d = 669,706", diag[:1], lambda m: m.sum()),
        "elementwise product (bench_mlp Diag mv)": (
            "m ⊙ v, d = 669,706", diag, lambda m, v: m * v),
        "elementwise product (bench_cnn Diag mv)": (
            "m ⊙ v, d = 69,610", cnn_diag, lambda m, v: m * v),
        "weighted square sum (bench_mlp Diag vTMv)": (
            "Σ m v², d = 669,706", diag, lambda m, v: (m * v * v).sum()),
        "weighted square sum (bench_resnet Diag vTMv)": (
            "Σ m v², d = 1,534,986", (resnet_diag, np.concatenate(resnet_leaves)),
            lambda m, v: (m * v * v).sum()),
        "weighted square sum by leaf (bench_resnet Diag vTMv)": (
            f"Σₗ Σ m[l] vₗ², the {len(RESNET_LEAVES)} leaves of d = 1,534,986",
            (resnet_diag, *resnet_leaves),
            lambda m, *vs: sum((m[a:b] * v * v).sum()
                               for a, b, v in zip(edges[:-1], edges[1:], vs))),
        "weighted square sum, diagonal stored by leaf (bench_resnet Diag vTMv)": (
            f"Σₗ Σ mₗ vₗ², mₗ and vₗ the {len(RESNET_LEAVES)} leaves' own arrays",
            (*np.split(resnet_diag, edges[1:-1]), *resnet_leaves),
            lambda *mv: sum((m * v * v).sum() for m, v in zip(mv[:len(mv) // 2],
                                                              mv[len(mv) // 2:]))),
        "two GEMVs (bench_small LowRank mv)": (
            "Fᵀ (F v), F: 9216 × 6922", lowrank, lambda f, v: (f @ v) @ f),
        **{f"Gram {r} × {m} (xᵀx)": (f"Σ_rows x xᵀ, x: {r} × {m}", (grams[r, m],),
                                      lambda x: x.T @ x) for r, m in GRAM_ROWS},
        **{f"Gram {r} × {m} (jaxgeom's gram)": (
            f"Σ_rows x xᵀ, x: {r} × {m}; XLA: jaxgeom.pmat._gram.gram (a zero column "
            "appended)", (grams[r, m],), _gram) for r, m in GRAM_ROWS if m % 64 == 0},
        "sum of 1,000 floats (a call's fixed cost)": ("Σ x", (tiny,), lambda x: x.sum()),
        **{f"{k} small GEMMs, one result (a call of {k} kernels)": (
            f"Σₖ (Xₖ Xₖ)₀₀, {k} independent 16 × 16 products", smalls[:k],
            lambda *xs: sum((x @ x)[0, 0] for x in xs)) for k in SMALL_GEMMS},
    }
    return {name: (desc, lambda lib, arrays=arrays, fn=fn: on(lib, arrays, fn))
            for name, (desc, arrays, fn) in rows.items()}


def _eigh(m):
    """``eigh`` of either library (``torch.linalg`` or ``jax.numpy.linalg``)."""
    if type(m).__module__.startswith("torch"):
        import torch

        return torch.linalg.eigh(m)
    import jax.numpy as jnp

    return jnp.linalg.eigh(m)


def _gram(x):
    """``xᵀx``: jaxgeom's ``gram`` for a JAX array, the plain product for a torch tensor."""
    if type(x).__module__.startswith("torch"):
        return x.T @ x
    from jaxgeom.pmat._gram import gram

    return gram(x)


def _spd(x):
    """``x xᵀ / columns``, exactly symmetric (float64 product rounded once)."""
    import numpy as np

    return (x.astype(np.float64) @ x.T.astype(np.float64) / x.shape[1]).astype(np.float32)


def _cho_solve(m, v, how):
    """``(m + 10⁻³ I)⁻¹ v`` by Cholesky: PyTorch's for torch tensors, else JAX's, written
    with ``jax.scipy.linalg`` (``how="scipy"``) or with jaxgeom's ``spd_solve``."""
    if type(m).__module__.startswith("torch"):
        import torch

        shifted = m + 1e-3 * torch.eye(m.shape[0], dtype=m.dtype)
        return torch.cholesky_solve(v[:, None], torch.linalg.cholesky(shifted))[:, 0]
    import jax
    import jax.numpy as jnp

    from jaxgeom._symmetric import spd_solve

    shifted = m + 1e-3 * jnp.eye(m.shape[0], dtype=m.dtype)
    if how == "scipy":
        return jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(shifted), v)
    return spd_solve(shifted, v)


def run_mode(sync: bool, repeats: int, only: list[str] | None = None) -> dict:
    """Every kernel (or those whose name contains one of ``only``) on both sides in this
    process: separate medians, then paired."""
    bench_fim.configure_dispatch(sync)
    import jax

    out = {"jax": jax.__version__, "sync_dispatch": sync, "rows": {}}
    ours, theirs, warm = {}, {}, {}
    for name, (desc, make) in kernels().items():
        if only and not any(part in name for part in only):
            continue
        ours[name], theirs[name] = make("jax"), make("torch")
        mine = bench_fim.timed(ours[name], repeats)
        peer = bench_fim.timed(theirs[name], repeats)
        out["rows"][name] = dict(description=desc, xla=mine, torch=peer)
        warm[name] = (mine["warm_s"], peer["warm_s"])
    for name, result in bench_fim.paired(ours, theirs, warm).items():
        out["rows"][name]["paired"] = result
    return out


def _seconds(s: float) -> str:
    return f"{s * 1e6:.1f} µs" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def _ratio(row: dict) -> str:
    if "paired" in row:
        return f"{row['paired']['ratio']:.2f}ᵖ"
    return f"{row['torch']['warm_s'] / row['xla']['warm_s']:.2f}"


def table(results: dict) -> str:
    """The markdown table of both modes' rows."""
    default, sync = results["default"]["rows"], results["sync"]["rows"]
    lines = ["| kernel | shapes | XLA | XLA sync | PyTorch | PyTorch/XLA | PyTorch/XLA sync |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in default.items():
        other = sync[name]
        lines.append(
            f"| {name} | {row['description']} | {_seconds(row['xla']['warm_s'])} | "
            f"{_seconds(other['xla']['warm_s'])} | {_seconds(row['torch']['warm_s'])} | "
            f"{_ratio(row)} | {_ratio(other)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--repeats", type=int, default=5, help="warm repeats (median)")
    parser.add_argument("--mode", choices=("default", "sync"),
                        help="(internal) time one mode in this process, print its JSON")
    parser.add_argument("--report", help="print the table of an earlier --out JSON")
    parser.add_argument("--rows", nargs="+", metavar="PART",
                        help="only the kernels whose name contains one of these (e.g. Gram)")
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode == "sync", args.repeats, args.rows)))
        return
    if args.report:
        with open(args.report) as f:
            print(table(json.load(f)))
        return
    results = {}
    for mode in ("default", "sync"):  # one process each: the dispatch mode is process-wide
        rows = ["--rows", *args.rows] if args.rows else []
        child = subprocess.run([sys.executable, __file__, "--mode", mode, "--repeats",
                                str(args.repeats), *rows], capture_output=True, text=True,
                               check=True)
        results[mode] = json.loads(child.stdout.strip().splitlines()[-1])
    print(table(results))
    write_json(results, args.out)


if __name__ == "__main__":
    main()
