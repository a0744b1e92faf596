"""Fisher builds and operations per representation, against floors and peers, in one command.

Usage::

    python benchmarks/bench_fim.py --out results.json          # all models (~20 min, 2 cores)
    python benchmarks/bench_fim.py --quick                     # smoke run: 2 repeats, mv/trace
    python benchmarks/bench_fim.py --models bench_mlp --representations PMatKFAC
    python benchmarks/bench_fim.py --report results.json       # the table of a saved run

Under the table the report checks the run against the performance targets (:func:`targets`).

Models (benchmarks/models.py, Flax for jaxgeom and the same network with the same float32
weights in PyTorch for NNGeometry, synthetic data with fixed seeds): ``bench_small``,
``bench_mlp``, ``bench_cnn``, ``bench_resnet``. For each (model, representation) that fits,
a **separate process** times, for jaxgeom:

- the exact Fisher build ``FIM(..., variant="classif_logits", batch_size=...)``, the
  Monte-Carlo build ``FIM_MonteCarlo(..., trials=1)``, EKFAC's diagonal ``refit``;
- ``mv``, ``vTMv``, ``trace``, ``frobenius_norm``, ``solve`` (jitted, the representation
  an argument; the vector of one kind on every side, ``--vectors``: :data:`VECTOR_KINDS`);
- the first call (tracing + compilation) apart from the median of the warm calls;
- the peak resident memory of a warm build above the process's memory before it (the
  kernel's high-water mark, reset through ``/proc/self/clear_refs``), against the bound
  ``1.5 × (storage + one chunk's activations)``;
- the XLA compilations triggered by a second build with new parameter values and by a
  third build whose last chunk is short (both should be 0);

and the same figures for NNGeometry (all representations), kfac-jax (KFAC) and curvlinops
(KFAC, EKFAC, the exact GGN's products for Implicit) where they are installed (peers.py).
Floors, measured in their own process in the same run on the same model and data: one
forward pass, forward+backward, per-example gradients
(``vmap(grad)``), the K output-gradient backward passes (vmapped), the exact Fisher-vector
product (jvp + vjp), and each representation's own contraction as plain GEMMs on random
arrays of the right shapes (KFAC ``aᵀa``, ``gᵀg``; Dense ``JᵀJ``; Diag ``(Σₖg²)ᵀ(a²)``,
per-example gradients for convolutions; QuasiDiag adds its weight-bias sums
``Σ (gₜ ⊙ ĝ) aₜᵀ``; EKFAC adds the factors' ``eigh`` — through their range for a factor
summed from few rows, as the build does — and the refit rotations). The floor
of a build is forward + K backward passes + its contraction.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import models  # noqa: E402
from output import INTERVAL_LEVEL, median_interval, write_json  # noqa: E402

#: the peers of the table: (name, key of their figures in a case's JSON, column, ratio column)
PEERS = (("NNGeometry", "nngeometry", "NNGeom", "NNG/jg"),
         ("kfac-jax", "kfac_jax", "kfac-jax", "kj/jg"),
         ("curvlinops", "curvlinops", "curvlinops", "cl/jg"))

#: the build rows of a case (EKFAC's refit: its diagonal on new data)
BUILDS = ("build", "build_mc", "refit")
OPERATIONS = ("mv", "vTMv", "trace", "frobenius_norm", "solve")
#: the kinds of vector the operations take (``--vectors``), the same on every side:
#: ``"params"``, shaped as the parameters — jaxgeom's ``PVector`` of a pytree, NNGeometry's
#: ``PVector`` of a tensor per weight and bias (the form of its gradients,
#: ``PVector.from_model_grad``) —, or ``"flat"``, one ``(d,)`` array (jaxgeom) or
#: NNGeometry's flat ``PVector`` (``random_pvector``'s)
VECTOR_KINDS = ("params", "flat")
#: KFAC only: the π-damped inverse as a representation (kfac-jax's ``update_cache``) and its
#: product with a vector (kfac-jax's ``multiply_inverse`` with the cached inverse); Dense
#: only: a repeated solve, against NNGeometry's solve with its cached factorisation
#: (jaxgeom: ``mv`` of the inverse ``F.inv(λ)``, computed once; the ``solve`` rows time a
#: solve with a new matrix on both sides); KFAC only, no peer: the exactly damped solve
#: ``(F + λI)⁻¹ v`` through the factors' eigendecompositions (jaxgeom's default damping;
#: the peers' KFAC solves are π-damped)
EXTRA_OPERATIONS = ("inv", "inv_mv", "solve_exact", "solve_repeat")
SOLVE_REGUL = 1e-3
CG_MAXITER = 20
MAX_DENSE_D = 10_000
K_EXACT = 9  # classif_logits with C = 10: C - 1 outputs per example
#: (model, representation, operation) not timed for jaxgeom, with the reason
SKIP = {
    ("bench_resnet", "PMatImplicit", "trace"): "the Diag build (see PMatDiag build); "
                                               "NNGeometry's implicit trace takes minutes",
}
#: the same for the peers
PEER_SKIP = {
    ("bench_small", "PMatLowRank", "solve"): "≈ 90 s (REFERENCE §5.2b): SVD on every call",
}
#: (model, representation) whose memory is also measured at 10 N (same batch_size)
SCALING = (("bench_mlp", "PMatDiag"), ("bench_mlp", "PMatKFAC"), ("bench_small", "PMatBlockDiag"))
SLOW_S, VERY_SLOW_S = 2.0, 60.0
FAST_BUDGET_S = 0.25  # fast calls are repeated until their warm runs add up to this
FAST_MAX_RUNS = 200
#: paired re-timing against a peer (:func:`paired`): blocks of PAIR_BLOCK_S of each side's
#: calls (at most PAIR_MAX_BLOCK_CALLS), alternated until they add up to PAIR_BUDGET_S
#: (PAIR_MIN_ROUNDS to PAIR_MAX_ROUNDS rounds), for rows whose warm calls each take under
#: PAIR_MAX_CALL_S
PAIR_BUDGET_S, PAIR_BLOCK_S, PAIR_MAX_BLOCK_CALLS = 1.5, 0.05, 2000
PAIR_MIN_ROUNDS, PAIR_MAX_ROUNDS, PAIR_MAX_CALL_S = 4, 40, 1.0

# ----------------------------------------------------------------------------- timing


def timed(fn: Callable[[], Any], repeats: int) -> dict:
    """First call and median of the warm calls: ``repeats`` of them, more for a fast call
    (until the warm calls add up to ``FAST_BUDGET_S`` s, at most ``FAST_MAX_RUNS``: the
    median of a sub-millisecond operation over 5 calls moves by 2× with the host's noise);
    one warm call when the first takes more than SLOW_S s, none above VERY_SLOW_S s
    (``warm_s`` is then the first call)."""
    import jax

    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    if first > VERY_SLOW_S:
        return dict(first_s=first, warm_s=first, runs=[])
    warm: list[float] = []
    wanted = 1 if first > SLOW_S else repeats
    with _timing_turn():
        while len(warm) < wanted or (sum(warm) < FAST_BUDGET_S and len(warm) < FAST_MAX_RUNS):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            warm.append(time.perf_counter() - start)
    return dict(first_s=first, warm_s=statistics.median(warm), runs=warm)


def paired(ours: dict, theirs: dict, warm: dict) -> dict:
    """Each row's jaxgeom calls and the peer's in alternated blocks (``A B B A A B …``, each
    block ≈ ``PAIR_BLOCK_S`` of one side's calls, its first call dropped): per row the two
    medians and the peer's over jaxgeom's. On a shared machine whose speed drifts by
    ±15–20% over minutes, the separate medians of the two sides, taken minutes apart, move
    their ratio by as much; alternated blocks see the same machine. Blocks rather than
    single calls: a call right after the other library's finds its worker threads still
    spinning (PyTorch's OpenMP, XLA's pool) and its caches cold.

    ``ours``/``theirs``: row name → call (already warm); ``warm``: row name → the two
    sides' separate warm times, which size the blocks and the rounds. Rows where either
    call takes ``PAIR_MAX_CALL_S`` or more keep their separate medians only.
    """
    import jax

    out = {}
    with _timing_turn():
        for name in sorted(ours.keys() & theirs.keys()):
            a, b = warm.get(name, (None, None))
            if a is None or b is None or max(a, b) >= PAIR_MAX_CALL_S:
                continue
            calls = {side: max(2, min(PAIR_MAX_BLOCK_CALLS, round(PAIR_BLOCK_S / t)) + 1)
                     for side, t in (("ours", a), ("theirs", b))}
            rounds = round(PAIR_BUDGET_S / ((calls["ours"] * a + calls["theirs"] * b) or 1))
            rounds = min(PAIR_MAX_ROUNDS, max(PAIR_MIN_ROUNDS, rounds))
            times: dict = {"ours": [], "theirs": []}
            round_ratios = []
            for r in range(rounds):
                block: dict = {"ours": [], "theirs": []}
                for side in ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours"):
                    fn = ours[name] if side == "ours" else theirs[name]
                    for i in range(calls[side]):
                        start = time.perf_counter()
                        jax.block_until_ready(fn())
                        if i:
                            block[side].append(time.perf_counter() - start)
                    times[side].extend(block[side])
                round_ratios.append(statistics.median(block["theirs"])
                                    / statistics.median(block["ours"]))
            mine, peer = (statistics.median(times[k]) for k in ("ours", "theirs"))
            low, high, level = median_interval(round_ratios)
            out[name] = dict(jaxgeom_s=mine, peer_s=peer, ratio=peer / mine, rounds=rounds,
                             calls_per_block=calls, round_ratios=round_ratios,
                             interval=[low, high], interval_level=level)
    return out


#: the environment variables that change how fast a run is, recorded with it: the C
#: library's allocator (docs/performance.md, "Scratch memory"), threads and XLA's flags
ENVIRONMENT_PREFIXES = ("GLIBC_TUNABLES", "MALLOC_", "OMP_", "GOMP_", "KMP_", "MKL_",
                        "OPENBLAS_", "XLA_", "JAX_", "TF_CPP_")


def run_environment() -> dict[str, str]:
    """The variables of :data:`ENVIRONMENT_PREFIXES` set in this process."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENVIRONMENT_PREFIXES)}


@contextlib.contextmanager
def _timing_turn():
    """This process's turn to time: an exclusive lock on ``$JAXGEOM_BENCH_LOCK`` when
    cases run side by side (``--jobs``), so that warm calls never overlap; else nothing."""
    path = os.environ.get("JAXGEOM_BENCH_LOCK")
    if not path:
        yield
        return
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_mb(fn: Callable[[], Any]) -> float:
    """Peak resident memory (MiB) of one call of ``fn`` above the memory before it."""
    import jax

    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the high-water mark VmHWM
        base = _status("VmRSS")
        jax.block_until_ready(fn())
        return (_status("VmHWM") - base) / 2**20
    except OSError:  # no clear_refs: fall back to ru_maxrss (includes earlier peaks)
        import resource

        base = _status("VmRSS")
        jax.block_until_ready(fn())
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base) / 2**20


class CompileCounter:
    """Counts XLA backend compilations (jax.monitoring events) and names what they were;
    ``compiled``: each one's ``(name, seconds)``."""

    def __init__(self):
        import jax

        self.compiled: list[tuple[str, float]] = []
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.compiled]

    def _listen(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.compiled.append((str(kwargs.get("fun_name", "?")), float(duration)))

    def during(self, fn: Callable[[], Any]) -> list[str]:
        """The names of the functions compiled during one call of ``fn``."""
        import jax

        before = len(self.names)
        jax.block_until_ready(fn())
        return self.names[before:]


def accelerator() -> str | None:
    """The accelerator JAX runs on (``None`` on the CPU), e.g. ``"gpu: NVIDIA H200"``."""
    import jax

    if jax.default_backend() == "cpu":
        return None
    return f"{jax.default_backend()}: {jax.devices()[0].device_kind}"


def configure_dispatch(sync: bool) -> None:
    """With ``sync`` (``--cpu-sync-dispatch``): ``jax_cpu_enable_async_dispatch = False``,
    before the backend starts. XLA:CPU then runs each computation in the calling thread
    instead of handing it to a worker thread and waiting for it: on these VMs the wait
    costs ≈ 45 µs whenever the computation is not over when Python asks for its result
    (docs/performance.md, "CPU notes")."""
    if sync:
        import jax

        jax.config.update("jax_cpu_enable_async_dispatch", False)


def configure_precision() -> None:
    """Full float32 matrix products on accelerators, for jaxgeom and the peers alike.

    On GPUs JAX's default precision runs float32 products as TF32 (10-bit mantissa)
    while PyTorch's default does not for matmuls; the suite compares the same arithmetic
    (``peers.py`` turns TF32 off in PyTorch's matmuls and convolutions too)."""
    import jax

    if jax.default_backend() != "cpu":
        jax.config.update("jax_default_matmul_precision", "highest")


def _device_bytes(key: str) -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    return None if not stats else stats.get(key)


# ----------------------------------------------------------------------------- floors


def _setup(spec: models.Spec, n: int | None = None):
    import jax.numpy as jnp

    params = models.init_params(spec)
    x, y = models.make_data(spec, n)
    return models.make_apply(spec), params, x, y, jnp.asarray(x), jnp.asarray(y)


def _chunks(a, bs):
    n = a.shape[0] - a.shape[0] % bs
    return a[:n].reshape(-1, bs, *a.shape[1:])


def floors_case(spec: models.Spec, repeats: int) -> dict:
    """Floor timings of one model (forward, backward passes, contractions as GEMMs)."""
    import jax
    import jax.numpy as jnp

    from jaxgeom._compile import model_jit  # the model's passes compiled as jaxgeom's steps

    apply_fn, params, _, _, x, y = _setup(spec)
    bs = spec.batch_size
    xs, ys = _chunks(x, bs), _chunks(y, bs)

    def loss(p, xb, yb):
        logp = jax.nn.log_softmax(apply_fn(p, xb))
        return -jnp.mean(jnp.take_along_axis(logp, yb[:, None], 1))

    forward = model_jit(apply_fn)
    grad = model_jit(jax.grad(loss))

    @model_jit
    def per_example(p, xs, ys):
        def chunk(acc, xy):
            g = jax.vmap(jax.grad(lambda q, a, b: loss(q, a[None], b[None])),
                         in_axes=(None, 0, 0))(p, *xy)
            return jax.tree_util.tree_map(lambda s, gi: s + jnp.sum(gi**2, 0), acc, g), None

        return jax.lax.scan(chunk, jax.tree_util.tree_map(jnp.zeros_like, p), (xs, ys))[0]

    def k_backward(k):
        # K separate VJPs of the batched model after one forward (a Python loop: XLA:CPU
        # runs it ~3x faster than vmap(vjp), whose batched dots it does not fuse)
        @model_jit
        def f(p, x):
            out, vjp = jax.vjp(lambda q: apply_fn(q, x), p)
            cot = jax.random.normal(jax.random.key(0), (k, *out.shape), out.dtype)
            return [vjp(cot[i])[0] for i in range(k)]
        return f

    @model_jit
    def fisher_vector(p, v, x):
        out, jv = jax.jvp(lambda q: apply_fn(q, x), (p,), (v,))
        prob = jax.nn.softmax(out)
        w = prob * jv - prob * jnp.sum(prob * jv, -1, keepdims=True)
        return jax.vjp(lambda q: apply_fn(q, x), p)[1](w / x.shape[0])[0]

    def k_backward_vmapped(k):
        @model_jit
        def f(p, x):
            out, vjp = jax.vjp(lambda q: apply_fn(q, x), p)
            cot = jax.random.normal(jax.random.key(0), (k, *out.shape), out.dtype)
            return jax.vmap(vjp)(cot)[0]
        return f

    k_bwd = k_backward(K_EXACT)  # one jitted function: compiled on the first call only
    k_bwd_vmapped = k_backward_vmapped(K_EXACT)
    res = {
        "forward": timed(lambda: forward(params, x), repeats),
        "forward+backward": timed(lambda: grad(params, x, y), repeats),
        "per-example grads": timed(lambda: per_example(params, xs, ys), repeats),
        "K backward (loop)": timed(lambda: k_bwd(params, x), repeats),
        "K backward (vmap)": timed(lambda: k_bwd_vmapped(params, x), repeats),
        "exact F·v": timed(lambda: fisher_vector(params, params, x), repeats),
    }
    # the floor is the faster of the two (the loop on XLA:CPU, vmap on GPUs)
    variant = min(("loop", "vmap"), key=lambda v: res[f"K backward ({v})"]["warm_s"])
    res["K backward"] = dict(res[f"K backward ({variant})"], variant=variant)
    for k in (K_EXACT, 1):
        try:
            fns = contraction_floors(spec, k)
        except Exception as e:  # noqa: BLE001
            res[f"contractions K={k}"] = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
            continue
        for name, fn in fns.items():
            try:
                res[f"{name} K={k}"] = timed(fn, repeats)
            except Exception as e:  # noqa: BLE001
                res[f"{name} K={k}"] = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
    return res


def contraction_floors(spec: models.Spec, k: int) -> dict[str, Callable[[], Any]]:
    """Each representation's own contraction as plain GEMMs on random arrays of the
    shapes of the model's layers (``k`` outputs per example), chunked like the builds."""
    import jax
    import jax.numpy as jnp

    n, bs = spec.n, spec.batch_size
    shapes = models.layer_shapes(spec)
    d = models.num_params(spec)
    key = jax.random.key(0)
    # per layer: a (chunks, bs·T, a), g (chunks, bs·k·T, g)
    acts = [(jax.random.normal(key, (n // bs, bs * t, a)),
             jax.random.normal(key, (n // bs, bs * k * t, g))) for _, a, g, t in shapes]

    def scan_sum(f, xs):
        def body(acc, x):
            return jax.tree_util.tree_map(jnp.add, acc, f(*x)), None

        first = jax.eval_shape(f, *jax.tree_util.tree_map(lambda a: a[0], xs))
        zero = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), first)
        return jax.lax.scan(body, zero, xs)[0]

    @jax.jit
    def kfac(acts):
        return [scan_sum(lambda a, g: (a.T @ a, g.T @ g), (a, g)) for a, g in acts]

    @jax.jit
    def diag(acts):
        out = []
        for (_, _, gw, t), (a, g) in zip(shapes, acts):
            if t == 1:  # (Σₖ g²)ᵀ (a²)
                out.append(scan_sum(lambda a, g, gw=gw: (jnp.sum(
                    (g**2).reshape(bs, k, gw), 1)).T @ a**2, (a, g)))
            else:  # per-example gradients Σₜ gₜ aₜᵀ, squared
                def f(a, g, t=t, gw=gw):
                    pe = jnp.einsum("nktg,nta->nkga", g.reshape(bs, k, t, gw),
                                    a.reshape(bs, t, -1))
                    return jnp.sum(pe**2, (0, 1))
                out.append(scan_sum(f, (a, g)))
        return out

    @jax.jit
    def quasidiag_cross(acts):  # QuasiDiag's weight-bias sums Σₙₖₜ (gₜ ⊙ ĝ) aₜᵀ, ĝ = Σₜ gₜ
        def f(a, g, t, gw):
            g = g.reshape(bs, k, t, gw)
            return jnp.einsum("nktg,nta->ga", g * jnp.sum(g, 2, keepdims=True),
                              a.reshape(bs, t, -1))
        return [scan_sum(functools.partial(f, t=t, gw=gw), (a, g))
                for (_, _, gw, t), (a, g) in zip(shapes, acts)]

    def factors():
        return [(a[0].T @ a[0], g[0].T @ g[0]) for a, g in acts]

    # the factors' eigendecompositions as EKFAC's build does them: a factor summed from few
    # rows (N T for A, N K T for G) through its range (``_spectral.eigh_psd``), else ``eigh``
    from jaxgeom.pmat._spectral import eigh_psd, useful_rank_bound

    bounds = [(useful_rank_bound(a, n * t), useful_rank_bound(g, n * k * t))
              for _, a, g, t in shapes]
    eigh = jax.jit(lambda fs: [(eigh_psd(a, ba), eigh_psd(g, bg))
                               for (a, g), (ba, bg) in zip(fs, bounds)])
    fs = factors()
    bases = [(jnp.linalg.eigh(a)[1], jnp.linalg.eigh(g)[1]) for a, g in fs]

    @jax.jit
    def refit(acts, bases):
        out = []
        for (_, _, gw, t), (a, g), (qa, qg) in zip(shapes, acts, bases):
            def f(a, g, t=t, gw=gw, qa=qa, qg=qg):
                a, g = a @ qa, g @ qg
                if t == 1:
                    return jnp.sum((g**2).reshape(bs, k, gw), 1).T @ a**2
                pe = jnp.einsum("nktg,nta->nkga", g.reshape(bs, k, t, gw),
                                a.reshape(bs, t, -1))
                return jnp.sum(pe**2, (0, 1))
            out.append(scan_sum(f, (a, g)))
        return out

    out = {"kfac_gemms": lambda: kfac(acts), "diag_contraction": lambda: diag(acts),
           "quasidiag_cross": lambda: quasidiag_cross(acts)}
    if k == K_EXACT:
        out["ekfac_eigh"] = lambda: eigh(fs)
    out["ekfac_refit_gemms"] = lambda: refit(acts, bases)
    if d <= MAX_DENSE_D:  # Jacobian-based representations: J (bs·k, d) per chunk
        jac = jax.random.normal(key, (n // bs, bs * k, d))
        offsets = [0]
        for _, a, g, _ in shapes:
            offsets.append(offsets[-1] + a * g)
        dense = jax.jit(lambda j: scan_sum(lambda j: j.T @ j, (j,)))
        blocks = jax.jit(lambda j: [scan_sum(lambda j: j.T @ j, (j[..., s:e],))
                                    for s, e in zip(offsets[:-1], offsets[1:])])
        outer = jax.jit(lambda acts: [
            jnp.einsum("ckg,ca->ckga", g.reshape(-1, k, g.shape[-1]), a.reshape(-1, a.shape[-1]))
            for a, g in acts])
        out["dense_jtj"] = lambda: dense(jac)
        out["blockdiag_jtj"] = lambda: blocks(jac)
        out["lowrank_outer"] = lambda: outer(acts)
    return out


def build_floor(floors: dict, rep: str, mc: bool = False, refit: bool = False
                ) -> tuple[float, str] | None:
    """The floor of a build (seconds, description), from a model's floor timings."""
    k = 1 if mc else K_EXACT
    w = {name: t["warm_s"] for name, t in floors.items() if "warm_s" in t}
    passes = w["forward+backward"] if mc else w["forward"] + w["K backward"]
    pname = "fwd+bwd" if mc else "fwd + K bwd"
    contraction = {
        "PMatKFAC": ["kfac_gemms"], "PMatDiag": ["diag_contraction"],
        "PMatQuasiDiag": ["diag_contraction", "quasidiag_cross"], "PMatDense": ["dense_jtj"],
        "PMatBlockDiag": ["blockdiag_jtj"], "PMatLowRank": ["lowrank_outer"],
        "PMatEKFAC": ["kfac_gemms", "ekfac_refit_gemms"],
    }.get(rep)
    if contraction is None:
        return None
    if refit:
        contraction = ["ekfac_refit_gemms"]
    names = [f"{c} K={k}" for c in contraction]
    if any(n not in w for n in names):
        return None
    total = passes + sum(w[n] for n in names)
    desc = " + ".join([pname] + contraction)
    if rep == "PMatEKFAC" and not refit:  # two passes and the factors' eigh
        total += passes + w.get(f"ekfac_eigh K={K_EXACT}", 0.0)
        desc = f"2×({pname}) + " + " + ".join(contraction) + " + eigh"
    return total, desc


# ----------------------------------------------------------------------------- one case


def _operation(name: str, rep: str, pmat):
    options, note = {}, ""
    if name == "solve" and getattr(pmat, "SOLVE_METHODS", ("cg",))[0] == "cg":
        options, note = dict(maxiter=CG_MAXITER), f"cg, maxiter={CG_MAXITER}"
    if name == "solve" and rep == "PMatKFAC":  # NNGeometry's (default) damping
        options, note = dict(damping="pi"), "π-damped (Cholesky), as NNGeometry's"
    return {
        "mv": lambda m, v: m.mv(v),
        "vTMv": lambda m, v: m.vTMv(v),
        "trace": lambda m, v: m.trace(),
        "frobenius_norm": lambda m, v: m.frobenius_norm(),
        "solve": lambda m, v: m.solve(v, SOLVE_REGUL, **options),
    }[name], note


def _time_operation(name, rep, pmat, v, repeats, keep: dict | None = None,
                    label: str | None = None) -> dict:
    """Time ``pmat``'s operation ``name`` (jitted, else eager); ``keep[label or name]``:
    the timed call, for :func:`paired`."""
    import jax

    fn, note = _operation(name, rep, pmat)
    if fn is None:
        return dict(skipped=note)
    jitted = jax.jit(fn)
    keep = {} if keep is None else keep
    try:
        keep[label or name] = lambda: jitted(pmat, v)
        result = timed(keep[label or name], repeats)
        result["jit"] = True
    except NotImplementedError as e:
        return dict(skipped=f"NotImplementedError: {str(e)[:160]}")
    except Exception as e:  # noqa: BLE001 - not traceable: eager calls
        try:
            keep[label or name] = lambda: fn(pmat, v)
            result = timed(keep[label or name], repeats)
        except NotImplementedError as e2:
            return dict(skipped=f"NotImplementedError: {str(e2)[:160]}")
        result["jit"] = False
        result["jit_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    if note:
        result["note"] = note
    return result


def _storage_bytes(pmat, exclude: Any = ()) -> int:
    import jax

    skip = {id(a) for a in jax.tree_util.tree_leaves(exclude)}
    return sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(pmat)
               if id(a) not in skip and hasattr(a, "dtype"))


def chunk_bytes(spec: models.Spec, rep: str) -> int:
    """One chunk's working set: the layer inputs and K output gradients of ``batch_size``
    examples (convolution inputs as patches), plus a chunk of per-example Jacobians for
    the Jacobian-based representations or per-example conv gradients for the diagonal
    ones."""
    bs, k = spec.batch_size, K_EXACT
    total = bs * (k + 1) * models.activation_floats(spec)
    if rep in ("PMatDense", "PMatBlockDiag", "PMatLowRank"):
        total += bs * k * models.num_params(spec)
    elif rep in ("PMatDiag", "PMatQuasiDiag", "PMatEKFAC"):
        conv = [a * g for kind, a, g, _ in models.layer_shapes(spec) if kind == "conv"]
        total += bs * k * max(conv, default=0)
    return 4 * total


def run_case(spec: models.Spec, rep: str, repeats: int, operations, peers: bool,
             n: int | None = None, build_only: bool = False, vectors: str = "params") -> dict:
    import jax
    import numpy as np

    import jaxgeom

    counter = CompileCounter()
    apply_fn, params, x_np, y_np, x, y = _setup(spec, n)
    n = x.shape[0]
    bs = spec.batch_size
    d = models.num_params(spec)
    cls = getattr(jaxgeom, rep)
    holder: dict = {}
    ours: dict = {}  # row → jaxgeom's timed call, for the paired re-timing (:func:`paired`)

    def build(p=params, data=(x, y)):
        holder["F"] = jaxgeom.FIM(apply_fn, p, data, cls, variant="classif_logits",
                                  batch_size=bs)
        return holder["F"]

    res: dict = dict(model=spec.name, representation=rep, n=n, d=d, batch_size=bs)
    try:
        # the first build's peak above the memory after imports, model and data (it
        # includes compilation, the same at N and 10 N)
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        base = _status("VmRSS")
        device_base = _device_bytes("bytes_in_use")
        ours["build"] = build
        res["build"] = timed(build, repeats)
        res["first_build_peak_mb"] = (_status("VmHWM") - base) / 2**20
        holder.clear()
        res["build"]["peak_mb"] = peak_mb(build)
        if accelerator() is not None:  # the allocator's own figures (largest allocation, pool)
            res["device_memory_stats"] = jax.devices()[0].memory_stats()
        if device_base is not None:
            # accelerator memory has no resettable high-water mark: the peak over every
            # build so far, compilation (autotuning scratch) included — an upper bound
            res["build"]["device_peak_mb"] = (_device_bytes("peak_bytes_in_use")
                                              - device_base) / 2**20
        F = holder.pop("F")
    except Exception as e:  # noqa: BLE001
        res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        return res
    storage = _storage_bytes(F, exclude=(params, x, y))
    res["storage_mb"] = storage / 2**20
    res["bound_mb"] = 1.5 * (storage + chunk_bytes(spec, rep)) / 2**20
    if build_only:
        return res
    # recompilation: new parameter values, then data whose last chunk is short (cut
    # before counting: slicing compiles too)
    params2 = jax.tree_util.tree_map(lambda a: a * 1.01 + 0.001, params)
    short = n - bs // 2
    x_short, y_short = jax.block_until_ready((x[:short], y[:short]))
    for key, fn in (("compiles_new_params", lambda: build(params2)),
                    ("compiles_short_last_chunk", lambda: build(params, (x_short, y_short)))):
        names = counter.during(fn)
        res[key], res[f"{key}_names"] = len(names), names
    holder.clear()
    mc_key = jax.random.key(3)  # made once, not timed (an eager key costs ~0.1 ms on a CPU)
    ours["build_mc"] = lambda data=(x, y): jaxgeom.FIM_MonteCarlo(
        apply_fn, params, data, cls, key=mc_key, trials=1, batch_size=bs)
    res["build_mc"] = timed(ours["build_mc"], repeats)
    if rep == "PMatEKFAC":
        ours["refit"] = lambda F=F: F.refit(apply_fn, params, (x, y), batch_size=bs)
        res["refit"] = timed(ours["refit"], repeats)
    v = jaxgeom.random_pvector(jax.random.key(2), params)
    vector_tree = v.tree  # the peers' vector is this one (curvlinops: in the twin's layout)
    if vectors == "flat":
        v = v.to_flat()
    res["vectors"] = vectors
    for op in operations:
        if (spec.name, rep, op) in SKIP:
            res[op] = dict(skipped=SKIP[spec.name, rep, op])
        else:
            res[op] = _time_operation(op, rep, F, v, repeats, ours)
    if rep == "PMatKFAC" and "solve" in operations:
        inverse = jax.jit(lambda m, r: m.inv(r, damping="pi"))
        ours["inv"] = lambda F=F: inverse(F, SOLVE_REGUL)
        res["inv"] = timed(ours["inv"], repeats)
        res["inv"]["note"] = "π-damped inverse, as kfac-jax's update_cache"
        res["inv_mv"] = _time_operation("mv", rep, inverse(F, SOLVE_REGUL), v, repeats,
                                        ours, "inv_mv")
        res["inv_mv"]["note"] = "mv of the π-damped inverse, as kfac-jax's cached inverse"
        exact = jax.jit(lambda m, v: m.solve(v, SOLVE_REGUL, damping="exact"))
        ours["solve_exact"] = lambda F=F: exact(F, v)
        res["solve_exact"] = timed(ours["solve_exact"], repeats)
        res["solve_exact"]["note"] = ("(F + λI)⁻¹ v, exact damping, through the factors' "
                                      "eigendecompositions (curvlinops' use_exact_damping)")
    if rep == "PMatDense" and "solve" in operations:
        res["solve_repeat"] = _time_operation("mv", rep, jax.jit(lambda m: m.inv(SOLVE_REGUL))(F),
                                              v, repeats, ours, "solve_repeat")
        res["solve_repeat"]["note"] = "mv of (F + λI)⁻¹ computed once (F.inv(λ))"
    if (spec.name, rep, "trace") not in SKIP:
        try:
            res["trace_value"] = float(F.trace())
        except Exception as e:  # noqa: BLE001
            res["trace_value_error"] = f"{type(e).__name__}: {str(e)[:160]}"
    if peers and "vTMv" in operations and (spec.name, rep, "vTMv") not in SKIP:
        res["vTMv_value"] = float(F.vTMv(v))  # curvlinops' is of the same vector
    del F
    holder.clear()
    if peers:
        import peers as peers_lib

        ops = [op for op in operations if (spec.name, rep, op) not in SKIP]
        ng_ops = [op for op in ops if (spec.name, rep, op) not in PEER_SKIP]
        ng_ops += ["solve_repeat"] if "solve_repeat" in res else []
        theirs: dict = {}
        res["nngeometry"] = peers_lib.nngeometry_case(
            spec, params, x_np, y_np, rep, timed, repeats, ng_ops, memory=peak_mb,
            regul=SOLVE_REGUL, device="cpu" if accelerator() is None else "cuda", keep=theirs,
            vectors=vectors)
        _pair(res, "nngeometry", ours, theirs)
        for op in ops:
            if (spec.name, rep, op) in PEER_SKIP and "skipped" not in res["nngeometry"]:
                res["nngeometry"][op] = dict(skipped=PEER_SKIP[spec.name, rep, op])
        if rep in peers_lib.CURVLINOPS_OPERATORS:
            theirs = {}
            res["curvlinops"] = peers_lib.curvlinops_case(
                spec, params, x_np, y_np, rep, timed, repeats, ops, vector_tree,
                regul=SOLVE_REGUL, device="cpu" if accelerator() is None else "cuda",
                keep=theirs, vectors=vectors)
            _pair(res, "curvlinops", ours, theirs)
        if rep == "PMatKFAC":
            theirs = {}
            res["kfac_jax"] = peers_lib.kfac_jax_case(apply_fn, params, np.asarray(x_np),
                                                      np.asarray(y_np), timed, repeats,
                                                      SOLVE_REGUL, memory=peak_mb,
                                                      batch_size=bs, keep=theirs)
            _pair(res, "kfac_jax", _on_peer_chunks(ours, theirs, res, timed, repeats), theirs)
            vtmv = res["kfac_jax"].get("vTMv_value")
            if vtmv is not None:
                F = build()
                vj = jax.tree_util.tree_map(
                    lambda a: jax.random.normal(jax.random.key(2), a.shape, a.dtype), params)
                res["kfac_jax"]["jaxgeom_vTMv_value"] = float(F.vTMv(vj))
    return res


def _on_peer_chunks(ours: dict, theirs: dict, res: dict, timed, repeats: int) -> dict:
    """``ours`` with the builds made from the list of chunks the peer was given
    (``theirs["chunks"]``, popped) instead of the whole arrays: kfac-jax has no chunking of
    its own, so its harness cuts the chunks once, untimed; jaxgeom is paired with it on
    those same arrays. Their separate warm times go to ``res[...]["on_peer_chunks_s"]``."""
    chunks = theirs.pop("chunks", None)
    if chunks is None:
        return ours
    mine = dict(ours)
    for row, build in (("build", ours.get("build")), ("build_mc", ours.get("build_mc"))):
        if build is None or row not in theirs:
            continue
        mine[row] = lambda build=build: build(data=chunks)
        res[row].setdefault("on_peer_chunks_s", timed(mine[row], repeats)["warm_s"])
    return mine


def _pair(res: dict, peer: str, ours: dict, theirs: dict) -> None:
    """``res[peer]["paired"]``: :func:`paired` on the rows both sides timed."""
    warm = {name: (res.get(name, {}).get("warm_s"), res[peer].get(name, {}).get("warm_s"))
            for name in theirs}
    if "error" not in res[peer] and "skipped" not in res[peer]:
        res[peer]["paired"] = paired(ours, theirs, warm)


# ----------------------------------------------------------------------------- driver


def _subprocess(args: list[str], timeout: float, env: dict | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args, "--json", "-"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {timeout:.0f} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return dict(error=f"exit {proc.returncode}: " + " | ".join(tail)[:400])


def versions() -> dict:
    import jax

    import jaxgeom

    out = dict(python=platform.python_version(), jax=jax.__version__,
               jaxgeom=jaxgeom.__version__)
    for name, distribution in (("torch", "torch"), ("nngeometry", "nngeometry"),
                               ("kfac_jax", "kfac-jax"),
                               ("curvlinops", "curvlinops-for-pytorch")):
        try:
            from importlib.metadata import version

            out[name] = version(distribution)
        except Exception:  # noqa: BLE001
            out[name] = None
    return out


def run_all(args) -> dict:
    """Every case of ``args`` in its own process, ``args.jobs`` of them at a time.

    With several jobs the cases compile side by side, while their timed warm calls take
    turns: ``timed`` holds an exclusive lock on the file ``$JAXGEOM_BENCH_LOCK`` around
    them, so no two processes time at once (first calls, compilation included, do
    overlap, and are then slower than alone). Meant for accelerators, where compilation
    takes most of a case; on a 2-core CPU keep one job."""
    import concurrent.futures
    import tempfile

    repeats = 2 if args.quick else args.repeats
    operations = ("mv", "trace") if args.quick else tuple(args.operations)
    results = dict(
        command=" ".join(["python", "benchmarks/bench_fim.py", *sys.argv[1:]]),
        machine=dict(platform=platform.platform(), processor=platform.processor(),
                     cpu_count=os.cpu_count(), accelerator=accelerator()),
        versions=versions(),
        settings=dict(repeats=repeats, dtype="float32", variant="classif_logits",
                      solve_regul=SOLVE_REGUL, cg_maxiter=CG_MAXITER, peers=not args.no_peers,
                      jobs=args.jobs, xla_flags=os.environ.get("XLA_FLAGS"),
                      cpu_sync_dispatch=args.cpu_sync_dispatch, vectors=args.vectors,
                      environment=run_environment()),
        models={},
    )
    # tasks: (model, kind, rep, argv); floors first, the longest to compile
    tasks: list[tuple[str, str, str | None, list[str]]] = []
    for name in args.models:
        spec = models.SPECS[name]
        r = str(min(repeats, spec.repeats or repeats))
        c = (["--repeats", r, "--operations", *operations]
             + (["--no-peers"] if args.no_peers else [])
             + (["--cpu-sync-dispatch"] if args.cpu_sync_dispatch else [])
             + ["--vectors", args.vectors])
        results["models"][name] = dict(d=models.num_params(spec), n=spec.n,
                                       batch_size=spec.batch_size, repeats=int(r),
                                       representations={}, scaling={}, floors={})
        if not args.only_scaling:
            tasks.insert(sum(t[1] == "floors" for t in tasks),
                         (name, "floors", None, ["--case", name, "floors", *c]))
            tasks += [(name, "case", rep, ["--case", name, rep, *c])
                      for rep in spec.representations
                      if not args.representations or rep in args.representations]
        if not args.quick and not args.no_scaling:
            for m, rep in SCALING:
                if m == name and (not args.representations or rep in args.representations):
                    tasks.append((name, "n", rep, ["--case", name, rep, "--build-only", *c]))
                    tasks.append((name, "n10", rep, ["--case", name, rep, "--build-only",
                                                     "--n", str(10 * spec.n), *c]))
    for name in args.models:
        spec = models.SPECS[name]
        print(f"== {name}: d = {models.num_params(spec):,}, N = {spec.n}, K = {K_EXACT}, "
              f"batch_size = {spec.batch_size} {spec.note}", flush=True)

    def record(task, res):
        name, kind, rep, _ = task
        entry = results["models"][name]
        if kind == "floors":
            entry["floors"] = res
            print(f"   {name} floors: {_summary(res)}", flush=True)
        elif kind == "case":
            entry["representations"][rep] = res
            print(f"   {name} {rep}: {_summary(res)}", flush=True)
        else:
            entry["scaling"].setdefault(rep, {})[kind] = res
            print(f"   {name} {rep} memory at {'10 N' if kind == 'n10' else 'N'}: "
                  f"{_summary(res)}", flush=True)
        write_json(results, args.out, announce=False)  # after every case

    env = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.jobs > 1:
            env = dict(os.environ, JAXGEOM_BENCH_LOCK=os.path.join(tmp, "timing.lock"))
            env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the device
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {pool.submit(_subprocess, t[3], args.timeout, env): t for t in tasks}
            for future in concurrent.futures.as_completed(futures):
                record(futures[future], future.result())
    return results


def _summary(res: dict) -> str:
    if "error" in res:
        return "ERROR " + res["error"]
    parts = []
    for key in ("forward", "K backward", "build", "build_mc", "refit"):
        if key in res:
            parts.append(f"{key} {_fmt_s(res[key]['warm_s'])}")
    if "build" in res and "peak_mb" in res["build"]:
        parts.append(f"peak {res['build']['peak_mb']:.0f} MiB (n = {res['n']})")
    return ", ".join(parts)


# ----------------------------------------------------------------------------- report


def _fmt_s(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def _fmt_r(r: float | None) -> str:
    if r is None:
        return ""
    return f"{r:.0f}" if r >= 100 else f"{r:.1f}" if r >= 10 else f"{r:.2f}"


def _row_floor(floors, rep, op):
    w = {name: t["warm_s"] for name, t in floors.items() if "warm_s" in t}
    if op == "build":
        return build_floor(floors, rep)
    if op == "build_mc":
        return build_floor(floors, rep, mc=True)
    if op == "refit":
        return build_floor(floors, rep, refit=True)
    if op == "mv" and rep == "PMatImplicit":
        return w["exact F·v"], "exact F·v"
    if op == "trace" and rep == "PMatImplicit":  # Σₙₖ ‖∇θ fₖ(xₙ)‖²: every output's gradients
        return w["forward"] + w["K backward"], "fwd + K bwd"
    gram = f"dense_jtj K={K_EXACT}"
    if op in ("frobenius_norm", "solve") and rep == "PMatLowRank" and gram in w:
        # the d × d Gram FᵀF of the (N K, d) factor, as a plain GEMM (the suite's LowRank
        # model has d < N K, where both operations go through that Gram)
        return w[gram], "dense_jtj"
    return w["forward+backward"], "fwd+bwd"


@dataclasses.dataclass(frozen=True)
class PeerTime:
    """A peer's figure on one row: its warm median (``None``: not timed) and the ratio
    peer / jaxgeom (paired where both sides' calls were timed in alternated blocks)."""

    name: str
    time: float | None = None
    ratio: float | None = None
    paired: bool = False
    skipped: bool = False
    #: the paired rounds' interval of the ratio (:func:`median_interval`; ``None``: not
    #: paired, or paired before the rounds were kept)
    interval: tuple[float, float] | None = None


@dataclasses.dataclass(frozen=True)
class OpRecord:
    """One timed row of a case: a build or an operation, its floor and the peers' times."""

    model: str
    rep: str
    op: str
    timing: dict
    warm: float | None = None
    floor: tuple[float, str] | None = None
    peers: tuple[PeerTime, ...] = ()
    skipped: str | None = None


def _op_records(model: str, rep: str, res: dict, floors: dict):
    """The rows of one case's JSON in the table's order (builds, then operations)."""
    for op in (*BUILDS, *OPERATIONS, *EXTRA_OPERATIONS):
        t = res.get(op)
        if t is None:
            continue
        if "skipped" in t:
            yield OpRecord(model, rep, op, t, skipped=t["skipped"])
            continue
        try:
            fl = _row_floor(floors, rep, op) if floors else None
        except KeyError:
            fl = None
        warm = t["warm_s"]
        peers = []
        for name, key, _, _ in PEERS:
            peer = res.get(key, {})
            pt = peer.get(op, {})
            pair = peer.get("paired", {}).get(op)
            mine = t.get("on_peer_chunks_s", warm) if key == "kfac_jax" else warm
            if "warm_s" in pt:
                ratio = pair["ratio"] if pair else pt["warm_s"] / mine
                interval = tuple(pair["interval"]) if pair and "interval" in pair else None
                peers.append(PeerTime(name, pt["warm_s"], ratio, bool(pair), interval=interval))
            else:
                peers.append(PeerTime(name, skipped="skipped" in pt))
        yield OpRecord(model, rep, op, t, warm, fl, tuple(peers))


#: the targets of the performance issue (benchmarks/README.md, "Against the targets")
BUILD_FLOOR_TARGET = 1.5  # every build within 1.5× its floor
PEER_OFF_FLOOR, PEER_MARGIN = 3.0, 3.0  # 3× ahead wherever a peer is > 3× off its floor
SMALL_CALL_S = 1e-3  # rows behind a peer are listed apart below this (dispatch-bound)


def _own_floor(r: OpRecord) -> bool:
    """Whether the row's floor is its own unavoidable work (builds; Implicit ``mv`` and
    ``trace``; LowRank's Gram), not ``fwd+bwd`` given for scale."""
    return r.floor is not None and (r.op in BUILDS or r.floor[1] != "fwd+bwd")


def targets(results: dict) -> list[str]:
    """The run against the issue's targets: rows behind a peer (calls under
    ``SMALL_CALL_S`` apart; then those of them whose paired rounds' interval of the ratio,
    :func:`median_interval`, reaches 1: at parity within the noise), rows short of 3×
    where a peer is more than 3× off the row's own floor, builds above 1.5× their floor,
    warm peaks above their memory bound, and XLA compilations on new parameter values or
    on data of a new length. One line each."""
    behind, small, short, slow_builds, memory, compiles = [], [], [], [], [], []
    within_noise = []  # rows behind whose paired rounds' interval reaches 1
    rows, compared, behind_rows = 0, 0, set()
    for model, entry in results["models"].items():
        floors = entry.get("floors", {}) if "error" not in entry.get("floors", {}) else {}
        for rep, res in entry["representations"].items():
            if "error" in res:
                continue
            for r in _op_records(model, rep, res, floors):
                if r.skipped:
                    continue
                rows += 1
                compared += any(peer.ratio is not None for peer in r.peers)
                where = f"{model} {rep} {r.op}"
                for peer in r.peers:
                    if peer.ratio is None:
                        continue
                    mark = "ᵖ" if peer.paired else ""
                    if peer.ratio < 1:
                        item = f"{where} {_fmt_r(peer.ratio)}{mark} ({peer.name})"
                        (small if r.warm < SMALL_CALL_S else behind).append(item)
                        behind_rows.add(where)
                        if peer.interval is not None and peer.interval[1] >= 1:
                            low, high = peer.interval
                            within_noise.append(f"{where} {_fmt_r(peer.ratio)}{mark} "
                                                f"[{_fmt_r(low)}, {_fmt_r(high)}] ({peer.name})")
                    if (_own_floor(r) and peer.time / r.floor[0] > PEER_OFF_FLOOR
                            and peer.ratio < PEER_MARGIN):
                        short.append(f"{where} {_fmt_r(peer.ratio)}{mark} ({peer.name} "
                                     f"{_fmt_r(peer.time / r.floor[0])}× its floor)")
                if (r.op in BUILDS and r.floor is not None
                        and r.warm / r.floor[0] > BUILD_FLOOR_TARGET):
                    slow_builds.append(f"{where} {_fmt_r(r.warm / r.floor[0])}")
            build = res.get("build", {})
            if "peak_mb" in build and build["peak_mb"] > res.get("bound_mb", float("inf")):
                memory.append(f"{model} {rep} {build['peak_mb']:.0f} MiB "
                              f"(bound {res['bound_mb']:.0f})")
            new_params = res.get("compiles_new_params")
            names = res.get("compiles_short_last_chunk_names") or []
            if new_params:
                compiles.append(f"{model} {rep}: {new_params} for new parameter values")
            beyond = [n for n in names if n != "jit(_window)"]
            if beyond:
                compiles.append(f"{model} {rep}: {', '.join(beyond)} for data of a new "
                                "length, besides jit(_window) (its data's own shape)")
        for rep, sc in entry.get("scaling", {}).items():
            try:
                a, b = sc["n"]["build"]["peak_mb"], sc["n10"]["build"]["peak_mb"]
            except (KeyError, TypeError):
                continue
            if b > sc["n10"]["bound_mb"]:
                memory.append(f"{model} {rep} at 10 N: {b:.0f} MiB (bound "
                              f"{sc['n10']['bound_mb']:.0f}; {a:.0f} at N)")

    def line(label, items):
        return f"{label}: {len(items)}" + (": " + "; ".join(items) if items else " (none)")

    return [
        f"{rows} timed rows, {compared} against a peer, {len(behind_rows)} behind one",
        line(f"behind a peer, calls of {SMALL_CALL_S * 1e3:g} ms or more", behind),
        line(f"behind a peer, calls under {SMALL_CALL_S * 1e3:g} ms", small),
        line(f"of those behind, at parity within the {INTERVAL_LEVEL:.0%} interval of their "
             "paired rounds' ratios", within_noise),
        line(f"short of {PEER_MARGIN:g}× where the peer is more than {PEER_OFF_FLOOR:g}× off "
             "the row's own floor (builds, Implicit mv/trace, LowRank's Gram)", short),
        line(f"builds above {BUILD_FLOOR_TARGET:g}× their floor", slow_builds),
        line("warm builds above their memory bound", memory),
        line("compilations beyond the data's own shape", compiles),
    ]


def table_rows(results: dict) -> tuple[list[tuple], list[str]]:
    header = ("model", "representation", "op", "jaxgeom", "first", "floor", "×floor",
              *(c for _, _, column, ratio in PEERS for c in (column, ratio)),
              "peak MiB", "bound", "recompiles")
    rows, notes = [header], []
    for model, entry in results["models"].items():
        floors = entry.get("floors", {})
        if "error" in floors:
            notes.append(f"{model} floors: ERROR {floors['error']}")
            floors = {}
        for name in ("forward", "forward+backward", "per-example grads", "K backward",
                     "exact F·v", "kfac_gemms K=9", "kfac_gemms K=1"):
            if name in floors:
                rows.append((model, "floor", name, _fmt_s(floors[name]["warm_s"]),
                             _fmt_s(floors[name]["first_s"])) + ("",) * (len(header) - 5))
        for rep, res in entry["representations"].items():
            if "error" in res:
                rows.append((model, rep, "ERROR") + ("",) * (len(header) - 3))
                notes.append(f"{model} {rep}: {res['error']}")
                continue
            ng, kj = res.get("nngeometry", {}), res.get("kfac_jax", {})
            cl = res.get("curvlinops", {})
            for peer_name, key, _, _ in PEERS:
                peer = res.get(key, {})
                if "skipped" in peer:
                    notes.append(f"{model} {rep} {peer_name}: skipped ({peer['skipped']})")
                if "error" in peer:
                    notes.append(f"{model} {rep} {peer_name}: ERROR {peer['error']}")
            for r in _op_records(model, rep, res, floors):
                if r.skipped:
                    notes.append(f"{model} {rep}.{r.op}: {r.skipped}")
                    continue
                t, fl = r.timing, r.floor
                cells = [model, rep, r.op + ("" if t.get("jit", True) else " (eager)"),
                         _fmt_s(r.warm) + ("" if t["runs"] else "*"), _fmt_s(t["first_s"]),
                         fl[1] if fl else "", _fmt_r(r.warm / fl[0]) if fl else ""]
                for peer in r.peers:
                    if peer.time is not None:
                        cells += [_fmt_s(peer.time),
                                  _fmt_r(peer.ratio) + ("ᵖ" if peer.paired else "")]
                    else:
                        cells += ["skip" if peer.skipped else "", ""]
                if r.op == "build":
                    peak = (f"{t['device_peak_mb']:.0f} (dev)" if "device_peak_mb" in t
                            else f"{t.get('peak_mb', 0):.0f}")
                    cells += [peak, f"{res.get('bound_mb', 0):.0f}",
                              f"{res.get('compiles_new_params')}/"
                              f"{res.get('compiles_short_last_chunk')}"]
                else:
                    cells += ["", "", ""]
                rows.append(tuple(cells))
            for key, what in (("compiles_new_params", "new parameter values"),
                              ("compiles_short_last_chunk", "a short last chunk")):
                if res.get(f"{key}_names"):
                    notes.append(f"{model} {rep}: compiled for {what}: "
                                 + ", ".join(res[f"{key}_names"]))
            if "trace_value" in res and "trace_value" in ng:
                a, b = res["trace_value"], ng["trace_value"]
                rel = abs(a - b) / max(abs(b), 1e-30)
                notes.append(f"{model} {rep}: trace jaxgeom {a:.6g}, NNGeometry {b:.6g}, "
                             f"rel. diff {rel:.1e} {'OK' if rel < 1e-3 else 'MISMATCH'}")
            if "trace_value" in res and "trace_value" in cl:
                a, b = res["trace_value"], cl["trace_value"]
                rel = abs(a - b) / max(abs(b), 1e-30)
                notes.append(f"{model} {rep}: trace jaxgeom {a:.6g}, curvlinops {b:.6g}, "
                             f"rel. diff {rel:.1e} {'OK' if rel < 1e-3 else 'MISMATCH'}")
            if "vTMv_value" in res and "vTMv_value" in cl:
                a, b = res["vTMv_value"], cl["vTMv_value"]
                rel = abs(a - b) / max(abs(b), 1e-30)
                notes.append(f"{model} {rep}: vᵀFv of the same v, jaxgeom {a:.6g}, curvlinops "
                             f"{b:.6g}, rel. diff {rel:.1e} {'OK' if rel < 1e-3 else 'MISMATCH'}")
            if "vTMv_value" in kj and "jaxgeom_vTMv_value" in kj:
                a, b = kj["jaxgeom_vTMv_value"], kj["vTMv_value"]
                notes.append(f"{model} {rep}: vᵀFv jaxgeom {a:.6g}, kfac-jax {b:.6g}, "
                             f"rel. diff {abs(a - b) / max(abs(b), 1e-30):.1e}")
            if "inv" in kj:
                notes.append(f"{model} {rep}: kfac-jax's update_cache is on the inv row, "
                             "its multiply_inverse with the cache on the inv_mv row")
            same = [f"{op} {_fmt_s(res[op]['on_peer_chunks_s'])}" for op in ("build", "build_mc")
                    if "on_peer_chunks_s" in res.get(op, {})]
            if same:
                notes.append(f"{model} {rep}: kj/jg of the builds: jaxgeom on kfac-jax's list "
                             f"of chunks, cut before timing as kfac-jax's ({', '.join(same)}; "
                             "the jaxgeom column cuts them out of the whole arrays)")
            one = [f"{k.replace('_one_batch', '')} {_fmt_s(kj[k]['warm_s'])}"
                   for k in ("build_one_batch", "build_mc_one_batch")
                   if k in kj and "warm_s" in kj[k]]
            if one:
                notes.append(f"{model} {rep}: kfac-jax with the whole data as one batch "
                             f"(no chunks, memory unbounded): {', '.join(one)}")
        for rep, sc in entry.get("scaling", {}).items():
            try:
                a, b = sc["n"], sc["n10"]
                warm = ""
                if "peak_mb" in a["build"] and "peak_mb" in b["build"]:
                    warm = (f"a warm build's peak above the memory before it "
                            f"{a['build']['peak_mb']:.0f} → {b['build']['peak_mb']:.0f} MiB, ")
                notes.append(
                    f"{model} {rep} memory from N = {a['n']} to {b['n']}: {warm}the first "
                    f"build's (compilation included) {a['first_build_peak_mb']:.0f} → "
                    f"{b['first_build_peak_mb']:.0f} MiB (bound {b['bound_mb']:.0f} MiB); "
                    f"build {_fmt_s(a['build']['warm_s'])} → {_fmt_s(b['build']['warm_s'])}")
            except (KeyError, TypeError):
                notes.append(f"{model} {rep} memory scaling: {sc}")
    return rows, notes


def vectors_described(results: dict) -> str:
    """The kind of vector a run's operations took on each side (``--vectors``)."""
    kind = results.get("settings", {}).get("vectors")
    if kind == "params":
        return ("shaped as the parameters on every side (jaxgeom a PVector of a pytree, "
                "NNGeometry a PVector of a tensor per weight and bias, as its gradients)")
    if kind == "flat":
        return "flat on every side (jaxgeom a (d,) array, NNGeometry a flat PVector)"
    return ("jaxgeom a PVector of a pytree, NNGeometry a flat PVector (a run from before "
            "--vectors: the two sides' vectors of different kinds)")


def print_report(results: dict, markdown: bool = False) -> None:
    rows, notes = table_rows(results)
    if markdown:
        print("| " + " | ".join(rows[0]) + " |")
        print("|" + " --- |" * len(rows[0]))
        for r in rows[1:]:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        for i, row in enumerate(rows):
            print("  ".join(c.ljust(w) if j < 3 else c.rjust(w)
                            for j, (c, w) in enumerate(zip(row, widths))).rstrip())
            if i == 0:
                print("  ".join("-" * w for w in widths))
    print()
    for note in notes:
        print(f"- {note}")
    print("\n* no warm call (first call > 60 s). ×floor: warm time / floor of the same run; "
          "NNG/jg, kj/jg, cl/jg: peer warm time / jaxgeom warm time (> 1: jaxgeom "
          "faster); "
          "ᵖ: the ratio of the medians of the two sides' calls timed in alternated "
          "blocks (the seconds columns are the separate medians); "
          "recompiles: XLA compilations of a build with new param values / with a short "
          "last chunk; peak: resident memory of a warm build (on an accelerator, "
          "'(dev)': its memory's peak over the case's builds, compilation included); "
          "bound: 1.5 × (storage + one chunk).")
    print(f"\nThe operations' vectors: {vectors_described(results)}.")
    print("\nAgainst the targets:")
    for line in targets(results):
        print(f"- {line}")
    accel = results.get("machine", {}).get("accelerator")
    if accel:
        print(f"\nRun on {accel} (float32 products at full precision, no TF32, for "
              "jaxgeom and the peers).")
    environment = results.get("settings", {}).get("environment")
    if environment:
        print("\nRun with " + " ".join(f"{k}={v}" for k, v in environment.items()))


def command_line() -> argparse.ArgumentParser:
    """The script's options (:func:`main`)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(models.SPECS),
                        choices=list(models.SPECS))
    parser.add_argument("--representations", nargs="+", default=None, metavar="PMAT")
    parser.add_argument("--repeats", type=int, default=5, help="warm repeats (median)")
    parser.add_argument("--operations", nargs="+", default=list(OPERATIONS))
    parser.add_argument("--quick", action="store_true",
                        help="2 repeats, mv and trace only, no memory scaling")
    parser.add_argument("--no-peers", action="store_true",
                        help="skip NNGeometry, kfac-jax, curvlinops")
    parser.add_argument("--no-scaling", action="store_true", help="skip the 10 N memory runs")
    parser.add_argument("--only-scaling", action="store_true",
                        help="only the memory runs at N and 10 N")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per case")
    parser.add_argument("--jobs", type=int, default=1,
                        help="cases run at a time (they compile side by side, time in turn)")
    parser.add_argument("--out", default=None, help="write the results as JSON")
    parser.add_argument("--report", nargs="+", default=None, metavar="JSON",
                        help="print saved runs (several files: merged case by case)")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    parser.add_argument("--cpu-sync-dispatch", action="store_true",
                        help="jax_cpu_enable_async_dispatch = False in every case process")
    parser.add_argument("--vectors", choices=VECTOR_KINDS, default="params",
                        help="the operations' vectors, the same kind on every side: "
                             "params-shaped (a gradient's form; default) or flat (d,)")
    # internal: one case in this process
    parser.add_argument("--case", nargs=2, metavar=("MODEL", "REP"), help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = command_line().parse_args(argv)
    if args.case:
        configure_dispatch(args.cpu_sync_dispatch)
        configure_precision()
        spec = models.SPECS[args.case[0]]
        if args.case[1] == "floors":
            res = floors_case(spec, args.repeats)
        else:
            res = run_case(spec, args.case[1], args.repeats, tuple(args.operations),
                           peers=not args.no_peers, n=args.n, build_only=args.build_only,
                           vectors=args.vectors)
        print(json.dumps(res))
        return res
    if args.report:
        results = None
        for path in args.report:
            with open(path) as f:
                run = json.load(f)
            if results is None:
                results = run
                results["commands"] = [run.get("command")]
            else:
                for name, entry in run["models"].items():
                    old = results["models"].setdefault(name, entry)
                    if old is not entry:  # later runs add cases and replace the floors
                        old["representations"].update(entry["representations"])
                        old["scaling"].update(entry.get("scaling", {}))
                        for key, t in entry.get("floors", {}).items():
                            if not isinstance(t, dict):  # a floors process that failed
                                continue
                            # a later floor replaces an earlier one unless it has no warm
                            # call (its time then includes compilation)
                            if t.get("runs") or "warm_s" not in old["floors"].get(key, {}):
                                old["floors"][key] = t
                results["commands"].append(run.get("command"))
        write_json(results, args.out, announce=False)  # --out with --report: the merged runs
    else:
        results = run_all(args)
    print()
    print_report(results, args.markdown)
    if args.out:
        print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
