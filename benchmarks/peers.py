"""Peer runners: NNGeometry and curvlinops (PyTorch, on the CPU or CUDA) and kfac-jax, each
optional.

``nngeometry_case`` builds the same Fisher as jaxgeom with NNGeometry on the PyTorch twin
of the model (same float32 weights, same data, same chunks) and times the same
operations; ``kfac_jax_case`` builds kfac-jax's KFAC factors (exact Fisher and one
Monte-Carlo sample) and times its ``multiply`` and ``multiply_inverse``. Each returns a
dict of timings (``timed`` results) or ``{"skipped": reason}`` when the peer is not
installed (see benchmarks/README.md for the peer environment). ``curvlinops_case`` builds
curvlinops' operators of the same Fishers (KFAC and EKFAC of the exact Fisher — its "type-2"
— and of one Monte-Carlo sample, the exact GGN's products for ``PMatImplicit``) on the same
twin, data and chunks, and times its products, traces, norms and KFAC inverses.

kfac-jax 0.0.8 fails on jax >= 0.10 as soon as an estimator runs (``Primitive.
get_bind_params`` now returns only the params dict); :func:`_patch_kfac_jax` replaces
``tag_graph_matcher.eval_jaxpr_eqn`` with a version accepting both forms. Its conv input
factor ``patches_moments`` is ~13x slower on CPU than its own
``patches_moments_explicit``; the runner uses the explicit one (``explicit_patches``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import models
import numpy as np

NNGEOMETRY_OPS = ("mv", "vTMv", "trace", "frobenius_norm", "solve")


def available(name: str) -> str | None:
    """``None`` when peer ``name`` imports, else the reason it does not."""
    try:
        if name == "nngeometry":
            import nngeometry  # noqa: F401
            import torch  # noqa: F401
        elif name == "kfac_jax":
            import kfac_jax  # noqa: F401
        elif name == "curvlinops":
            import curvlinops  # noqa: F401
            import torch  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"{name} not installed ({type(e).__name__}: {e})"
    return None


# ----------------------------------------------------------------------------- NNGeometry


def _synchronized(fn: Callable[[], Any], device: str) -> Callable[[], Any]:
    """``fn`` followed by a wait for the device's queued kernels (CUDA runs asynchronously)."""
    if device == "cpu":
        return fn
    import torch

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def _torch_on(device: str, timed: Callable) -> tuple[Callable, str | None]:
    """PyTorch set up to run as jaxgeom does: every CPU thread; on CUDA, TF32 off in
    matmuls and convolutions and ``timed`` waiting for the kernels. ``(timed, None)``, or
    ``(timed, reason)`` when ``device`` cannot run."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    if device == "cpu":
        return timed, None
    if not torch.cuda.is_available():
        return timed, f"this PyTorch ({torch.__version__}) has no CUDA"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return (lambda fn, repeats: timed(_synchronized(fn, device), repeats)), None


def _cuda_peak_mb(fn: Callable[[], Any]) -> float:
    """Peak CUDA memory (MiB) allocated by PyTorch during one call, above that before it."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def nngeometry_case(spec: models.Spec, params: Any, x: np.ndarray, y: np.ndarray,
                    representation: str, timed: Callable, repeats: int, operations,
                    memory: Callable | None = None, regul: float = 1e-3,
                    device: str = "cpu", keep: dict | None = None,
                    vectors: str = "params") -> dict:
    """NNGeometry's ``FIM`` / ``FIM_MonteCarlo`` in ``representation`` and its operations,
    on ``device`` (``"cpu"`` or ``"cuda"``; on CUDA the timings wait for the kernels, the
    peak memory is PyTorch's CUDA allocations and TF32 is off, as for jaxgeom).

    ``vectors``: the operations' vector, of the kind jaxgeom's side takes
    (``bench_fim.VECTOR_KINDS``): ``"params"``, a ``PVector`` of one tensor per layer's
    weight and bias — the form of NNGeometry's gradients (``PVector.from_model_grad``),
    which its flat operations (``PMatDiag``, ``PMatDense``, …) concatenate —, or
    ``"flat"``, its flat ``PVector`` (``random_pvector``'s), which its layer-wise ones
    (``PMatKFAC``, ``PMatEKFAC``, ``PMatQuasiDiag``) view layer by layer.

    ``keep``: filled with each timed row's call (row name → function), for the paired
    re-timing against jaxgeom's (``bench_fim.paired``)."""
    reason = available("nngeometry")
    if reason:
        return dict(skipped=reason)
    import nngeometry
    import nngeometry.object as ngo
    import torch
    from nngeometry.layercollection import LayerCollection
    from nngeometry.object.vector import PVector, random_pvector

    torch.manual_seed(0)
    timed, reason = _torch_on(device, timed)
    if reason:
        return dict(skipped=reason)
    if device != "cpu":
        memory = _cuda_peak_mb
    rep = getattr(ngo, representation, None)
    if rep is None:
        return dict(skipped=f"NNGeometry has no {representation}")
    model = models.torch_model(spec, params).to(device)
    loader = chunk_loader(x, y, spec.batch_size)
    lc = LayerCollection.from_model(model)
    out: dict = {}
    holder: dict = {}
    ekfac = representation == "PMatEKFAC"

    def row(name, fn):
        if keep is not None:
            keep[name] = fn if device == "cpu" else _synchronized(fn, device)
        return timed(fn, repeats)

    def build():
        holder["F"] = nngeometry.FIM(model, loader, rep, variant="classif_logits",
                                     device=device)
        if ekfac:  # jaxgeom's EKFAC build includes the diagonal refit
            holder["F"].update_diag(loader)
        return holder["F"]

    def build_mc():
        F = nngeometry.FIM_MonteCarlo(model, loader, rep, variant="classif_logits",
                                      trials=1, device=device)
        if ekfac:  # likewise: the refit of the same (sampled) Fisher
            F.update_diag(loader)
        return F

    try:
        out["build"] = row("build", build)
        if memory is not None:
            out["build"]["peak_mb"] = memory(build)
        F = holder.pop("F")
        out["build_mc"] = row("build_mc", build_mc)
        if ekfac:
            out["refit"] = row("refit", lambda: F.update_diag(loader))
    except Exception as e:  # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return out
    v = random_pvector(lc, device=device, dtype=torch.float32)
    if vectors == "params":  # a tensor of its own per weight and bias, as a gradient's
        v = PVector(lc, dict_repr={layer: tuple(t.clone() for t in pieces)
                                   for layer, pieces in v.to_dict().items()})
    ops = {
        "mv": lambda: F.mv(v),
        "vTMv": lambda: F.vTMv(v),
        "trace": lambda: F.trace(),
        "frobenius_norm": lambda: F.frobenius_norm(),
        # a solve with a new matrix: PMatDense caches its factorisation on the object
        "solve": lambda: _without_cached_factors(F).solve(v, regul),
        "solve_repeat": lambda: F.solve(v, regul),  # with it (warm calls)
    }
    for op in operations:
        try:
            out[op] = row(op, ops[op])
        except NotImplementedError as e:
            out[op] = dict(skipped=f"NotImplementedError {e}".strip())
        except Exception as e:  # noqa: BLE001
            out[op] = dict(skipped=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    try:
        out["trace_value"] = float(F.trace())
    except Exception as e:  # noqa: BLE001
        out["trace_value_error"] = f"{type(e).__name__}: {str(e)[:160]}"
    return out


def chunks(x: np.ndarray, y: np.ndarray, batch_size: int) -> list[tuple[Any, Any]]:
    """The data as ``(inputs, labels)`` tensors of ``batch_size`` examples (NCHW inputs,
    ``int64`` labels): views of the two whole tensors, cut once."""
    return _cut(*_tensors(x, y), batch_size)


def _tensors(x: np.ndarray, y: np.ndarray) -> tuple[Any, Any]:
    import torch

    return torch.from_numpy(models.torch_inputs(x)), torch.from_numpy(y.astype(np.int64))


def _cut(inputs, labels, batch_size: int) -> list[tuple[Any, Any]]:
    return [(inputs[i:i + batch_size], labels[i:i + batch_size])
            for i in range(0, len(labels), batch_size)]


def chunk_loader(x: np.ndarray, y: np.ndarray, batch_size: int):
    """A ``DataLoader`` (NNGeometry takes nothing else: it reads ``len(loader.sampler)``
    and ``loader.batch_size``) whose passes yield :func:`chunks`' views.

    A plain ``DataLoader`` over a ``TensorDataset`` indexes the dataset example by example
    and stacks each batch anew: a pass took 2.9 ms on bench_small (1024 examples), 1.6 ms on
    bench_mlp, work that is the harness's and not NNGeometry's (jaxgeom's builds take the
    whole arrays and cut them inside the timed call)."""
    import torch

    class ChunkLoader(torch.utils.data.DataLoader):
        def __iter__(self):
            return iter(views)

    inputs, labels = _tensors(x, y)
    views = _cut(inputs, labels, batch_size)
    return ChunkLoader(torch.utils.data.TensorDataset(inputs, labels), batch_size=batch_size,
                       shuffle=False)


def _without_cached_factors(F):
    """``F`` with the factorisation that NNGeometry's ``PMatDense.solve`` caches on the
    object (``_ldl_factors`` for one ``regul``) dropped, so that a timed call factorises."""
    for name in ("_ldl_factors", "_ldl_regul"):
        F.__dict__.pop(name, None)
    return F


# ----------------------------------------------------------------------------- kfac-jax


def _patch_kfac_jax(explicit_patches: bool = True) -> None:
    import jax.extend as jex
    from kfac_jax._src import patches_second_moment as psm
    from kfac_jax._src import tag_graph_matcher as tgm

    if getattr(tgm, "_jaxgeom_bench_patched", False):
        return

    def eval_jaxpr_eqn(eqn, in_values):
        bound = eqn.primitive.get_bind_params(eqn.params)
        subfuns, bind_params = bound if isinstance(bound, tuple) else ((), bound)
        with jex.source_info_util.user_context(eqn.source_info.traceback):
            output = eqn.primitive.bind(*subfuns, *in_values, **bind_params)
        return output if isinstance(output, list) else [output]

    tgm.eval_jaxpr_eqn = eval_jaxpr_eqn
    if explicit_patches:
        psm.patches_moments = psm.patches_moments_explicit
    tgm._jaxgeom_bench_patched = True


def kfac_jax_case(apply_fn: Callable, params: Any, x: np.ndarray, y: np.ndarray,
                  timed: Callable, repeats: int, regul: float = 1e-3,
                  memory: Callable | None = None, batch_size: int | None = None,
                  keep: dict | None = None) -> dict:
    """kfac-jax's KFAC: factors of the exact Fisher (``fisher_exact``) and of one
    Monte-Carlo sample (``fisher_gradients``), and ``multiply`` / ``multiply_inverse``
    (after ``update_cache``), all jitted.

    The factors are accumulated over the same chunks of ``batch_size`` examples as
    jaxgeom's build (one jitted ``update_curvature_matrix_estimate`` per chunk, weights
    ``ema_old = 1``, ``ema_new = batch_size / N``: the mean over the data, memory bounded
    by one chunk, as a user with more data than memory would run it); ``build_one_batch``
    / ``build_mc_one_batch`` are the same with the whole data as one batch. ``keep``: as
    :func:`nngeometry_case`'s, plus ``"chunks"``: that list of chunks, on which jaxgeom's
    builds are paired with these (the same arrays on both sides: the cut is not timed)."""
    reason = available("kfac_jax")
    if reason:
        return dict(skipped=reason)
    import jax
    import jax.numpy as jnp
    import kfac_jax

    _patch_kfac_jax()
    n = x.shape[0]
    batch = (jnp.asarray(x), jnp.asarray(y))

    def loss(p, b):
        logits = apply_fn(p, b[0])
        kfac_jax.register_softmax_cross_entropy_loss(logits, b[1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, b[1][:, None], 1))

    out: dict = {}

    def row(name, fn):
        if keep is not None:
            keep[name] = fn
        return timed(fn, repeats)

    try:
        est = kfac_jax.BlockDiagonalCurvature(func=loss, default_estimation_mode="fisher_exact")
        state0 = est.init(jax.random.key(0), (params, batch), exact_powers_to_cache=-1,
                          approx_powers_to_cache=None)

        def update(mode):
            @jax.jit
            def f(state, p, b, rng, ema_old, ema_new):
                return est.update_curvature_matrix_estimate(
                    state, ema_old=ema_old, ema_new=ema_new, identity_weight=0.0,
                    batch_size=b[0].shape[0], rng=rng, func_args=(p, b), estimation_mode=mode)
            return f

        bs = n if batch_size is None else batch_size
        chunks = [(batch[0][i:i + bs], batch[1][i:i + bs]) for i in range(0, n - n % bs, bs)]

        keys = [jax.random.key(i) for i in range(len(chunks))]  # made once, not timed
        if keep is not None:  # jaxgeom is paired with it on these same arrays
            keep["chunks"] = chunks

        def streamed(step):
            def run():
                state = state0
                for i, chunk in enumerate(chunks):
                    state = step(state, params, chunk, keys[i],
                                 0.0 if i == 0 else 1.0, len(chunk[0]) / n)
                return state
            return run

        exact, mc = update("fisher_exact"), update("fisher_gradients")
        key = jax.random.key(1)
        out["build"] = row("build", streamed(exact))
        if memory is not None:
            out["build"]["peak_mb"] = memory(streamed(exact))
        out["build_mc"] = row("build_mc", streamed(mc))
        if bs != n:
            out["build_one_batch"] = timed(lambda: exact(state0, params, batch, key, 0.0, 1.0),
                                           repeats)
            out["build_mc_one_batch"] = timed(
                lambda: mc(state0, params, batch, key, 0.0, 1.0), repeats)
        state = streamed(exact)()
        v = jax.tree_util.tree_map(
            lambda a: jax.random.normal(jax.random.key(2), a.shape, a.dtype), params)
        multiply = jax.jit(lambda s, v: est.multiply(s, v, identity_weight=0.0,
                                                     exact_power=True, use_cached=False,
                                                     pmap_axis_name=None))
        cache = jax.jit(lambda s: est.update_cache(s, identity_weight=regul, exact_powers=-1,
                                                   approx_powers=None, eigenvalues=False,
                                                   pmap_axis_name=None))
        inverse = jax.jit(lambda s, v: est.multiply_inverse(
            s, v, identity_weight=regul, exact_power=True, use_cached=True,
            pmap_axis_name=None))
        out["mv"] = row("mv", lambda: multiply(state, v))
        out["inv"] = row("inv", lambda: cache(state))  # the π-damped inverse factors
        out["inv"]["note"] = "update_cache (inverse factors)"
        cached = cache(state)
        out["inv_mv"] = row("inv_mv", lambda: inverse(cached, v))
        out["inv_mv"]["note"] = "multiply_inverse with the cached inverse"
        mv = multiply(state, v)
        out["vTMv_value"] = float(sum(jnp.vdot(a, b) for a, b in zip(
            jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(mv))))
    except Exception as e:  # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return out


# ----------------------------------------------------------------------------- curvlinops

#: the representations curvlinops has an operator for, and the operator's class name
CURVLINOPS_OPERATORS = {"PMatKFAC": "KFACLinearOperator", "PMatEKFAC": "EKFACLinearOperator",
                        "PMatImplicit": "GGNLinearOperator"}


def curvlinops_case(spec: models.Spec, params: Any, x: np.ndarray, y: np.ndarray,
                    representation: str, timed: Callable, repeats: int, operations,
                    vector: Any, regul: float = 1e-3, device: str = "cpu",
                    keep: dict | None = None, vectors: str = "params") -> dict:
    """curvlinops' operator of the Fisher that jaxgeom's ``representation`` holds, on the
    PyTorch twin of the model (same weights, data and chunks), and its operations.

    - ``PMatKFAC`` / ``PMatEKFAC``: ``KFACLinearOperator`` / ``EKFACLinearOperator`` of the
      exact Fisher (``fisher_type="type-2"``: a backward pass per column of the loss
      Hessian's square root) and of one Monte-Carlo sample (``"mc"``), KFAC-expand, the
      bias a column of the weight's input factor (``separate_weight_and_bias=False``, as
      jaxgeom and NNGeometry), the mean over the data (``CrossEntropyLoss``'s mean). A
      build is the operator made and its factors computed (EKFAC's with the
      eigendecompositions and the corrected eigenvalues, as jaxgeom's build with its
      refit); ``refit`` recomputes the corrected eigenvalues. ``trace`` and
      ``frobenius_norm`` are its properties with their cache dropped before each call.
      KFAC's ``solve`` is a new ``KFACInverseLinearOperator`` with the π heuristic
      (``use_heuristic_damping``, NNGeometry's and kfac-jax's damping) applied to the
      vector — the factors' inverses and the product; ``inv`` the inverses alone, ``inv_mv``
      the product with them cached; ``solve_exact`` the exactly damped inverse
      (``use_exact_damping``: the factors' eigendecompositions). EKFAC's ``solve`` is its
      exactly damped inverse (the only damping curvlinops gives EKFAC), new each call;
    - ``PMatImplicit``: ``GGNLinearOperator`` (the exact GGN, the Fisher of the
      cross-entropy): its making is the build (``FisherMCLinearOperator`` for
      ``build_mc``), ``mv`` one pass over the data, ``vTMv`` that product dotted with the
      vector. No trace, norm or solve of its own (estimators only): not timed.

    ``vector``: jaxgeom's vector as a params-shaped pytree (Flax layout), taken to the
    twin's layout (``models.torch_model``): a list of a tensor per parameter for
    ``vectors="params"``, their concatenation for ``"flat"``. ``vTMv_value`` (and
    ``trace_value``) let the report check that both sides hold the same matrix."""
    reason = available("curvlinops")
    if reason:
        return dict(skipped=reason)
    if representation not in CURVLINOPS_OPERATORS:
        return dict(skipped=f"curvlinops has no {representation}")
    import curvlinops
    import torch

    timed, reason = _torch_on(device, timed)
    if reason:
        return dict(skipped=reason)
    model = models.torch_model(spec, params).to(device)
    theta = [p for p in model.parameters() if p.requires_grad]
    loader = [(a.to(device), b.to(device)) for a, b in chunks(x, y, spec.batch_size)]
    with torch.no_grad():
        v = [p.detach().clone() for p in models.torch_model(spec, vector).to(device).parameters()]
    if vectors == "flat":
        v = torch.cat([p.reshape(-1) for p in v])
    loss = torch.nn.CrossEntropyLoss()
    common = dict(progressbar=False, check_deterministic=False, num_data=len(y))
    kronecker = representation in ("PMatKFAC", "PMatEKFAC")
    operator = getattr(curvlinops, CURVLINOPS_OPERATORS[representation])

    def make(fisher_type):
        if not kronecker:
            if fisher_type == "type-2":
                return curvlinops.GGNLinearOperator(model, loss, theta, loader, **common)
            return curvlinops.FisherMCLinearOperator(model, loss, theta, loader, **common)
        F = operator(model, loss, theta, loader, fisher_type=fisher_type, mc_samples=1,
                     kfac_approx="expand", num_per_example_loss_terms=1,
                     separate_weight_and_bias=False, **common)
        F.compute_kronecker_factors()
        if representation == "PMatEKFAC":
            F.compute_eigenvalue_correction()
        return F

    def refit(F):
        F._corrected_eigenvalues.clear()  # it adds to them otherwise
        F.compute_eigenvalue_correction()

    def uncached(F, name):
        def get():
            F._reset_matrix_properties()
            return getattr(F, name)
        return get

    def inverse(F, **damping):
        return curvlinops.KFACInverseLinearOperator(F, damping=regul, **damping)

    def inverted(F):
        inv = inverse(F, use_heuristic_damping=True)
        for name in F._mapping:
            inv._compute_or_get_cached_inverse(name)
        return inv

    def dot(a, b):
        if isinstance(a, torch.Tensor):
            return torch.dot(a, b)
        return sum(torch.sum(p * q) for p, q in zip(a, b))

    out: dict = {}

    def row(name, fn):
        if keep is not None:
            keep[name] = fn if device == "cpu" else _synchronized(fn, device)
        return timed(fn, repeats)

    try:
        out["build"] = row("build", lambda: make("type-2"))
        out["build_mc"] = row("build_mc", lambda: make("mc"))
        F = make("type-2")
        if representation == "PMatEKFAC":
            out["refit"] = row("refit", lambda: refit(F))
    except Exception as e:  # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return out
    ops = {"mv": lambda: F @ v, "vTMv": lambda: dot(v, F @ v)}
    if kronecker:
        ops.update(trace=uncached(F, "trace"), frobenius_norm=uncached(F, "frobenius_norm"))
    if representation == "PMatKFAC":
        ops.update(solve=lambda: inverse(F, use_heuristic_damping=True) @ v,
                   solve_exact=lambda: inverse(F, use_exact_damping=True) @ v,
                   inv=lambda: inverted(F))
        cached = inverted(F)
        ops["inv_mv"] = lambda: cached @ v
    elif representation == "PMatEKFAC":
        ops["solve"] = lambda: inverse(F, use_exact_damping=True) @ v
    extra = ("inv", "inv_mv", "solve_exact") if "solve" in operations else ()
    for op in (*operations, *extra):
        if op not in ops:
            continue
        try:
            out[op] = row(op, ops[op])
        except Exception as e:  # noqa: BLE001
            out[op] = dict(skipped=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    for key, value in (("vTMv_value", ops["vTMv"]), ("trace_value", ops.get("trace"))):
        if value is not None:
            out[key] = float(value())
    return out
