"""PMatImplicit: matrix-free products and streamed views against the brute-force Fisher."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import (
    constant_columns,
    make_counted_mlp,
    make_equinox_mlp,
    make_linen_cnn,
    make_linen_mlp,
    reference_fisher,
)
from pmat_checks import check_products, compilations

from jaxgeom import FIM, FIM_MonteCarlo, SecondMoment, random_pvector, streaming
from jaxgeom.pfmap import Jacobian, PFMapImplicit
from jaxgeom.pmat.blockdiag import PMatBlockDiag
from jaxgeom.pmat.dense import PMatDense
from jaxgeom.pmat.diag import PMatDiag
from jaxgeom.pmat.implicit import PMatImplicit
from jaxgeom.pmat.kfac import PMatKFAC

TOL = dict(rtol=1e-8, atol=1e-10)
REGUL = 1e-3


@pytest.fixture(scope="module", params=[make_linen_mlp, make_linen_cnn, make_equinox_mlp])
def case(request):
    t = request.param()
    F = FIM(t.apply_fn, t.params, (t.x, t.y), PMatImplicit, batch_size=2)
    return t, F, np.asarray(reference_fisher(t.apply_fn, t.params, t.x))


@pytest.fixture(scope="module")
def mlp():
    """The linen MLP's Fisher, implicit (in chunks of 3) and dense."""
    t = make_linen_mlp()
    implicit = FIM(t.apply_fn, t.params, (t.x, t.y), PMatImplicit, batch_size=3)
    return t, implicit, FIM(t.apply_fn, t.params, (t.x, t.y), PMatDense)


def vec(t, seed=0):
    return random_pvector(jax.random.PRNGKey(seed), t.params)


def test_stores_only_function_params_and_data(case):
    t, F, ref = case
    assert F.num_examples == t.x.shape[0] and F.batch_size == 2
    assert len(F.data) == 1 and F.data[0] is t.x  # the inputs, not a copy
    assert F.size() == ref.shape


def test_products_and_streamed_views(case):
    t, F, ref = case
    check_products(F, ref, t.params)
    np.testing.assert_allclose(F.to_dense(), ref, **TOL)


def test_scaling(case):
    t, F, ref = case
    v = np.asarray(vec(t, 3).to_flat())
    for M, s in [(-1.5 * F, -1.5), (F / 4, 0.25), (-F, -1.0)]:
        assert isinstance(M, PMatImplicit)
        np.testing.assert_allclose(M.mv(v), s * ref @ v, **TOL)
        np.testing.assert_allclose(M.vTMv(v), s * v @ ref @ v, **TOL)
        np.testing.assert_allclose(M.trace(), s * np.trace(ref), **TOL)
        np.testing.assert_allclose(M.frobenius_norm(), abs(s) * np.linalg.norm(ref), **TOL)


def test_cg_solve(case):
    t, F, ref = case
    v = vec(t, 2)
    rhs = F.mv(v) + REGUL * v
    x = F.solve(rhs, REGUL, rtol=1e-12)
    np.testing.assert_allclose(x.to_flat(), v.to_flat(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="valid methods"):
        F.solve(rhs, REGUL, method="cholesky")


def test_cg_preconditioners(mlp):
    t, F, dense = mlp
    v = vec(t, 6)
    rhs = F.mv(v) + REGUL * v
    exact = dense.solve(rhs, REGUL).to_flat()
    # the exact preconditioner solves in one iteration
    x = F.solve(rhs, REGUL, preconditioner=dense, maxiter=1)
    np.testing.assert_allclose(x.to_flat(), exact, rtol=1e-6, atol=1e-7)
    # starting from the solution, one iteration keeps it
    x = F.solve(rhs, REGUL, x0=exact, maxiter=1)
    np.testing.assert_allclose(x.to_flat(), exact, rtol=1e-6, atol=1e-7)
    # a cheap preconditioner: Jacobi (the diagonal of the same matrix), as a callable
    diag = F.get_diag()
    x = F.solve(rhs, REGUL, preconditioner=lambda r: r / (diag + REGUL), rtol=1e-12)
    np.testing.assert_allclose(x.to_flat(), exact, rtol=1e-6, atol=1e-7)


def test_cg_with_diagonal_representation_preconditioner(mlp):
    t, F, _ = mlp
    P = FIM(t.apply_fn, t.params, (t.x, t.y), PMatDiag)
    v = vec(t, 7)
    x = F.solve(F.mv(v) + REGUL * v, REGUL, preconditioner=P, rtol=1e-12)
    np.testing.assert_allclose(x.to_flat(), v.to_flat(), rtol=1e-6, atol=1e-7)


def test_eager_cg_is_the_traced_cg_and_compiles_once(mlp):
    """Called eagerly on one batch, CG on the implicit matrix is one compiled call (the
    ``lax.while_loop`` CG of a ``jit``): after ``k`` iterations, the iterate under
    ``jit``; a second solve with a new right-hand side and tolerance compiles nothing."""
    t, F, dense = mlp
    v, w = vec(t, 8), vec(t, 9)
    traced = jax.jit(lambda M, b, k: M.solve(b, REGUL, maxiter=k), static_argnums=2)
    for k in (1, 3, 10):
        np.testing.assert_allclose(F.solve(v, REGUL, maxiter=k).to_flat(),
                                   traced(F, v, k).to_flat(), rtol=1e-9, atol=1e-12)
    F.solve(v, REGUL, rtol=1e-6)
    with compilations() as compiled:
        x = F.solve(w, 2 * REGUL, rtol=1e-12)
    assert compiled == []
    x = F.solve(w, REGUL, rtol=1e-12)
    np.testing.assert_allclose(x.to_flat(), dense.solve(w, REGUL).to_flat(), rtol=1e-6,
                               atol=1e-7)


def test_eager_solve_of_rows_compiles_once(mlp):
    """A stack of rows is solved as one vector is (one compiled call, the rows a ``vmap``
    of the CG): the same solutions, and nothing compiled at the next call."""
    t, F, dense = mlp
    rows = jnp.stack([vec(t, 8).to_flat(), vec(t, 9).to_flat()])
    F.solve(rows, REGUL, rtol=1e-6)
    other = rows[::-1]
    with compilations() as compiled:
        x = F.solve(other, REGUL, rtol=1e-12)
    assert compiled == []
    np.testing.assert_allclose(x, dense.solve(other, REGUL), rtol=1e-6, atol=1e-7)
    assert F.solve(rows[:0], REGUL).shape == (0, rows.shape[1])


def test_products_over_several_chunks_compile_one_step(mlp):
    """Every chunk of a product runs the same compiled step, the first one included (its
    running sum starts from zeros): ``M V`` over two chunks as written (a Python loop of
    chunk steps: the form under an eager ``grad`` or ``vmap``) compiles the step once, and
    equals the dense product; a vector is one row, no reshape around the call."""
    t, _, dense = mlp
    F = FIM(t.apply_fn, t.params, (t.x, t.y), PMatImplicit, batch_size=4)  # chunks 4 + 3
    ref = np.asarray(dense.to_dense())
    rows = jnp.stack([vec(t, s).to_flat() for s in range(5)])
    with compilations() as compiled:
        out = PMatImplicit.mmap.eager_method(F, rows)
    assert compiled.count("_chunk_jtjv") == 1
    np.testing.assert_allclose(out, np.asarray(rows) @ ref, **TOL)
    v = vec(t, 7)
    np.testing.assert_allclose(F.mv(v).to_flat(), ref @ np.asarray(v.to_flat()), **TOL)
    assert F.mv(v.to_flat()).shape == (ref.shape[0],)


def test_eager_products_are_one_compiled_call_each(mlp):
    """Called eagerly, ``mv``, ``vTMv``, ``mmap`` and the flat ``_mv`` of an eager CG are
    one compiled call each over all the chunks (the ``lax.scan`` of a ``jit``), compiled as
    a model step once: new vectors, new rows and a new scale compile nothing, and the
    numbers are the dense matrix's."""
    t, _, dense = mlp
    F = FIM(t.apply_fn, t.params, (t.x, t.y), PMatImplicit, batch_size=4)  # chunks 4 + 3
    half = 0.5 * F
    ref = np.asarray(dense.to_dense())
    vs = [vec(t, s) for s in range(3)]
    flats = [np.asarray(v.to_flat()) for v in vs]
    rows = [jnp.stack([v.to_flat(), 2 * v.to_flat()]) for v in vs]
    products = {
        "mv": (lambda M, s: M.mv(vs[s]).to_flat(), lambda s: ref @ flats[s]),
        "_mv": (lambda M, s: M._mv(vs[s].to_flat()), lambda s: ref @ flats[s]),
        "vTMv": (lambda M, s: M.vTMv(vs[s]), lambda s: flats[s] @ ref @ flats[s]),
        "mmap": (lambda M, s: M.mmap(rows[s]), lambda s: np.asarray(rows[s]) @ ref),
        "quadratic_forms": (lambda M, s: M.quadratic_forms(rows[s]),
                            lambda s: np.asarray(rows[s]) @ ref @ np.asarray(rows[s]).T),
    }
    for name, (product, expected) in products.items():
        with compilations() as compiled:
            np.testing.assert_allclose(product(F, 0), expected(0), **TOL)
        # one program (none if an earlier test compiled it), no chunk steps of its own
        assert compiled in ([], ["_compiled_model_call"]), (name, compiled)
        with compilations() as compiled:
            np.testing.assert_allclose(product(F, 1), expected(1), **TOL)
            np.testing.assert_allclose(product(half, 2), 0.5 * expected(2), **TOL)
        assert compiled == [], name


def test_eager_diagonal_and_trace_are_one_checked_compiled_call(mlp, monkeypatch):
    """Called eagerly on one batch, ``get_diag`` and ``trace`` (a diagonal's build over the
    data) are one compiled call each, answering their chunks' finiteness flags: the dense
    matrix's numbers, nothing compiled again for a new scale, and a non-finite chunk
    raises the error of the eager loop over a list of batches, naming the same examples."""
    t, _, dense = mlp
    ref = np.asarray(dense.to_dense())
    F = FIM(t.apply_fn, t.params, (t.x, t.y), PMatImplicit, batch_size=4)  # chunks 4 + 3
    update = streaming._update
    for name, expected in (("get_diag", np.diag(ref)), ("trace", np.trace(ref))):
        with compilations() as compiled:
            np.testing.assert_allclose(getattr(F, name)(), expected, **TOL)
        assert compiled in ([], ["_compiled_model_call"]), (name, compiled)
        with compilations() as compiled:
            np.testing.assert_allclose(getattr(0.5 * F, name)(), 0.5 * expected, **TOL)
        assert compiled == [], name
        steps = []  # no chunk step dispatched from Python: the scan is in the compiled call
        monkeypatch.setattr(streaming, "_update",
                            lambda *a, seen=steps: seen.append(a) or update(*a))
        getattr(F, name)()
        monkeypatch.undo()
        assert steps == [], name

    for bad, where in ((jnp.nan, 5), (jnp.inf, 2)):
        x = t.x.at[where, 0].set(bad)
        one_batch = FIM(t.apply_fn, t.params, (x, t.y), PMatImplicit, batch_size=4)
        batches = FIM(t.apply_fn, t.params, [(x[:4], t.y[:4]), (x[4:], t.y[4:])],
                      PMatImplicit, batch_size=4)
        first, last = (4, 6) if where >= 4 else (0, 3)
        for name in ("get_diag", "trace"):
            messages = []
            for M in (one_batch, batches):
                with pytest.raises(FloatingPointError,
                                   match=rf"examples {first}\.\.{last}\b") as raised:
                    getattr(M, name)()
                messages.append(str(raised.value))
            assert messages[0] == messages[1]


def test_quadratic_forms_are_forward_mode_products_over_the_chunks(mlp):
    """``R M Rᵀ`` of a few directions: per chunk one ``jvp`` per row and no ``vjp`` (the
    chunk step ``_chunk_jv_gram``), over a list of batches as a loop of that step, equal
    to the dense forms; a single vector or a map of another rank is refused."""
    t, _, dense = mlp
    batches = [(t.x[:4], t.y[:4]), (t.x[4:], t.y[4:])]
    F = FIM(t.apply_fn, t.params, batches, PMatImplicit, batch_size=4)
    rows = np.stack([np.asarray(vec(t, s).to_flat()) for s in range(3)])
    with compilations() as compiled:
        forms = F.quadratic_forms(rows)
    assert compiled.count("_chunk_jv_gram") <= 1 and "_chunk_jtjv" not in compiled
    np.testing.assert_allclose(forms, rows @ np.asarray(dense.to_dense()) @ rows.T, **TOL)
    np.testing.assert_array_equal(forms, np.asarray(forms).T)
    for bad in (rows[0], rows[None]):
        with pytest.raises(ValueError, match=r"quadratic_forms takes an \(m, \d+\) stack"):
            F.quadratic_forms(bad)


def test_eager_products_over_a_list_of_batches_stay_a_loop_of_steps(mlp):
    """On a list of batches (a loader's, kept), an eager product is a loop of compiled
    chunk steps, not one compiled call holding a scan per batch (a program that would grow
    with their number): the chunk step compiled once at most, and the numbers of the
    dense matrix of all the examples."""
    t, _, dense = mlp
    batches = [(t.x[:4], t.y[:4]), (t.x[4:], t.y[4:])]  # 4 + 3 examples, chunks of 4
    F = FIM(t.apply_fn, t.params, batches, PMatImplicit, batch_size=4)
    assert len(F.data) == 2
    v = vec(t, 4)
    with compilations() as compiled:
        out = F.mv(v)
    assert "_compiled_model_call" not in compiled and compiled.count("_chunk_jtjv") <= 1
    np.testing.assert_allclose(out.to_flat(), np.asarray(dense.to_dense()) @ v.to_flat(),
                               **TOL)


def test_under_jit(mlp):
    t, F, dense = mlp
    ref = np.asarray(dense.to_dense())
    v = vec(t, 5)
    out = jax.jit(lambda M, u: M.mv(u))(F, v)
    np.testing.assert_allclose(out.to_flat(), ref @ np.asarray(v.to_flat()), **TOL)
    rhs = F.mv(v) + REGUL * v
    solve = jax.jit(lambda M, b, P: M.solve(b, REGUL, preconditioner=P, rtol=1e-12))
    np.testing.assert_allclose(solve(F, rhs, dense).to_flat(), v.to_flat(), rtol=1e-6,
                               atol=1e-7)
    scaled = jax.jit(lambda M: 2 * M)(F)
    assert isinstance(scaled, PMatImplicit) and scaled.fn == F.fn
    np.testing.assert_allclose(jax.jit(lambda M: M.trace())(scaled), 2 * np.trace(ref), **TOL)


def test_products_inside_jit_scan_the_chunks(mlp):
    """Inside a ``jit`` the chunks of a product are one ``lax.scan``: ``mv``, ``mmap``,
    ``vTMv`` and the CG ``solve`` of a matrix in chunks of 3 (7 examples, and a list of two
    batches) equal the dense ones, and the program and its scratch memory do not grow
    with the number of examples (unrolled, ``mv``'s scratch grew 3.1 / 13 / 53 KB for 12 /
    48 / 192 examples)."""
    t, _, dense = mlp
    ref = np.asarray(dense.to_dense())
    v = vec(t, 3)
    flat = np.asarray(v.to_flat())
    rows = jnp.stack([vec(t, s).to_flat() for s in range(3)])
    batches = [(t.x[:5], t.y[:5]), (t.x[5:], t.y[5:])]
    for data in ((t.x, t.y), batches):
        F = FIM(t.apply_fn, t.params, data, PMatImplicit, batch_size=3)
        mv, mmap, vtmv, solved = jax.jit(lambda M, u, r: (
            M.mv(u), M.mmap(r), M.vTMv(u), M.solve(M.mv(u) + REGUL * u, REGUL, rtol=1e-12)))(
                F, v, rows)
        np.testing.assert_allclose(mv.to_flat(), ref @ flat, **TOL)
        np.testing.assert_allclose(mmap, np.asarray(rows) @ ref, **TOL)
        np.testing.assert_allclose(vtmv, flat @ ref @ flat, **TOL)
        np.testing.assert_allclose(solved.to_flat(), flat, rtol=1e-6, atol=1e-7)

    def program(n):
        def product(p, x, u):
            return FIM(t.apply_fn, p, (x,), PMatImplicit, batch_size=3).mv(u)

        args = (t.params, jnp.zeros((n, t.x.shape[1])), v)
        primitives = [e.primitive.name for e in jax.make_jaxpr(product)(*args).eqns]
        scratch = jax.jit(product).lower(*args).compile().memory_analysis().temp_size_in_bytes
        return primitives, scratch

    assert "scan" in program(12)[0]
    assert program(12) == program(48)


def test_chunking_and_batches_do_not_matter(mlp):
    t = mlp[0]
    assert t.x.shape[0] == 7
    batches = [(t.x[:3], t.y[:3]), (t.x[3:], t.y[3:])]
    variants = [
        FIM(t.apply_fn, t.params, (t.x, t.y), PMatImplicit, batch_size=2),
        FIM(t.apply_fn, t.params, (t.x, t.y), PMatImplicit),
        FIM(t.apply_fn, t.params, batches, PMatImplicit),
        FIM(t.apply_fn, t.params, (b for b in batches), PMatImplicit, batch_size=2),
    ]
    v = np.asarray(vec(t, 8).to_flat())
    expected = variants[1].mv(v)
    for F in variants:
        assert F.num_examples == 7
        for _ in range(2):  # replays the data (even from a one-shot generator)
            np.testing.assert_allclose(F.mv(v), expected, **TOL)
    np.testing.assert_allclose(variants[0].get_diag(), variants[1].get_diag(), **TOL)


def test_monte_carlo_and_empirical_fisher(mlp):
    t = mlp[0]
    v = np.asarray(vec(t, 9).to_flat())
    mc = [FIM_MonteCarlo(t.apply_fn, t.params, t.x, rep, key=jax.random.PRNGKey(7), trials=2,
                         batch_size=b) for rep, b in [(PMatImplicit, 3), (PMatDense, None)]]
    np.testing.assert_allclose(mc[0].mv(v), mc[1].mv(v), **TOL)

    def losses(p, batch):
        x, y = batch
        logp = jax.nn.log_softmax(t.apply_fn(p, x))
        return -jnp.take_along_axis(logp, y[:, None], axis=1)  # (N, 1)

    batches = [(t.x[:4], t.y[:4]), (t.x[4:], t.y[4:])]
    ef = SecondMoment(losses, t.params, iter(batches), PMatImplicit)  # one-shot iterator
    ef_dense = SecondMoment(losses, t.params, (t.x, t.y), PMatDense)
    np.testing.assert_allclose(ef.mv(v), ef_dense.mv(v), **TOL)
    np.testing.assert_allclose(ef.mv(v), ef_dense.mv(v), **TOL)  # replayed



def test_integer_and_boolean_leaves_are_constants():
    """Params with integer and boolean leaves (a step counter and a mask the model reads, a
    counter it ignores, beside a float gain outside any dense layer): the matrix-free
    products (``jvp``/``vjp``, which JAX would give float0 tangents and cotangents) equal
    the dense matrix's, whose rows and columns of those leaves are zero; ``mv`` answers
    them in the dense matrix's form (float zeros of the leaf's shape), for any vector form
    (the raw params, integer leaves included)."""
    t = make_counted_mlp()
    data = (t.x, t.y)
    dense = FIM(t.apply_fn, t.params, data, PMatDense)
    ref = np.asarray(reference_fisher(t.apply_fn, t.params, t.x))
    constant = constant_columns(t.params)
    assert not ref[constant].any() and not ref[:, constant].any()
    np.testing.assert_allclose(dense.to_dense(), ref, **TOL)
    F = FIM(t.apply_fn, t.params, data, PMatImplicit, batch_size=3)
    check_products(F, ref, t.params)  # mv in every form, vTMv, mmap, diag, trace, norms
    np.testing.assert_allclose(F.to_dense(), ref, **TOL)
    for v in (vec(t, 1), t.params):
        got, want = F.mv(v), dense.mv(v)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            assert (a.shape, a.dtype) == (b.shape, b.dtype)
            np.testing.assert_allclose(a, b, **TOL)
        np.testing.assert_allclose(F.vTMv(v), dense.vTMv(v), **TOL)
    v = vec(t, 2)
    rhs = dense.mv(v) + REGUL * v
    np.testing.assert_allclose(F.solve(rhs, REGUL, rtol=1e-12).to_flat(),
                               dense.solve(rhs, REGUL).to_flat(), rtol=1e-6, atol=1e-7)
    mc = [FIM_MonteCarlo(t.apply_fn, t.params, t.x, rep, key=jax.random.PRNGKey(7),
                         batch_size=b) for rep, b in [(PMatImplicit, 3), (PMatDense, None)]]
    np.testing.assert_allclose(mc[0].mv(v).to_flat(), mc[1].mv(v).to_flat(), **TOL)

def test_a_model_with_a_custom_vjp_is_differentiated_in_reverse_mode():
    """A model calling a ``jax.custom_vjp`` function (``tanh`` with its own backward rule),
    which JAX does not differentiate in forward mode, equals the same model with
    ``jnp.tanh``: a dense build of ``mode="auto"`` where forward mode would be cheaper
    (``d = 9 < K = 24``, a segmentation map) takes reverse mode; ``PMatImplicit``'s
    products and ``PFMapImplicit``'s ``J v`` take the transpose of the ``vjp``;
    ``mode="forward"`` is refused by name."""
    @jax.custom_vjp
    def tanh(z):
        return jnp.tanh(z)

    tanh.defvjp(lambda z: (jnp.tanh(z), z), lambda z, g: (g * (1 - jnp.tanh(z) ** 2),))
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    params = {"w": jax.random.normal(keys[0], (2, 3)), "b": jax.random.normal(keys[1], (3,))}
    x = jax.random.normal(keys[2], (5, 8, 2))  # 5 examples of 8 pixels, 3 classes each
    custom = lambda p, x: tanh(x @ p["w"] + p["b"])  # noqa: E731
    plain = lambda p, x: jnp.tanh(x @ p["w"] + p["b"])  # noqa: E731
    variant = "segmentation_logits"
    want = FIM(plain, params, (x,), PMatDense, variant=variant).to_dense()
    got = FIM(custom, params, (x,), PMatDense, variant=variant, batch_size=2)
    np.testing.assert_allclose(got.to_dense(), want, **TOL)
    with pytest.raises(ValueError, match=r"custom_vjp.*mode='reverse'"):
        FIM(custom, params, (x,), PMatDense, variant=variant, mode="forward")
    implicit = FIM(custom, params, (x,), PMatImplicit, variant=variant, batch_size=2)
    v = jax.random.normal(keys[0], (9,))
    np.testing.assert_allclose(implicit.mv(v), want @ v, **TOL)
    np.testing.assert_allclose(implicit.vTMv(v), v @ want @ v, **TOL)
    np.testing.assert_allclose(implicit.to_dense(), want, **TOL)
    maps = [Jacobian(f, params, x, PFMapImplicit, batch_size=2) for f in (custom, plain)]
    np.testing.assert_allclose(maps[0].jvp(v).data, maps[1].jvp(v).data, **TOL)


def test_unsupported_operations_name_alternatives(case):
    t, F, _ = case
    for op in (lambda: F.inv(REGUL), lambda: F.pinv(), lambda: F.pow(2), lambda: F**2,
               lambda: F.eigh()):
        with pytest.raises(NotImplementedError, match="PMatDense"):
            op()
    with pytest.raises(NotImplementedError, match=r"solve\(v, regul\)"):
        F.inv(REGUL)
    for op in (F.eigvalsh, lambda: F.norm(2), lambda: F.norm(-2)):
        with pytest.raises(NotImplementedError, match="PMatDense.*PMatLowRank"):
            op()
    for op in (lambda: F + F, lambda: F - F, lambda: F + 2 * F):
        with pytest.raises(NotImplementedError, match=r"M.mv\(v\) \+ A.mv\(v\).*PMatDense"):
            op()
    with pytest.raises(NotImplementedError, match="exactly.*PMatDense.from_pmat.*FIM"):
        PMatKFAC.from_pmat(F)
    for representation in (PMatDense, PMatDiag, PMatBlockDiag, PMatKFAC):
        with pytest.raises(TypeError, match=r"from_pmat takes a matrix.*\(layer_collection"):
            representation.from_pmat(np.eye(3))


def test_bad_construction(mlp):
    t = mlp[0]
    with pytest.raises(TypeError, match="no build options"):
        FIM(t.apply_fn, t.params, t.x, PMatImplicit, rank=3)
    with pytest.raises(ValueError, match="mode"):
        FIM(t.apply_fn, t.params, t.x, PMatImplicit, mode="sideways")
    with pytest.raises(ValueError, match="batch_size"):
        FIM(t.apply_fn, t.params, t.x, PMatImplicit, batch_size=0)
    # the front ends check the model's outputs; a per-example function given directly is
    # traced to check that it returns one vector per example
    with pytest.raises(ValueError, match="one array of outputs"):
        FIM(lambda p, x: (t.apply_fn(p, x),), t.params, t.x, PMatImplicit)
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        SecondMoment(lambda p, b: t.apply_fn(p, b[0])[:, 0], t.params, (t.x,), PMatImplicit)

    def matrix_per_example(params, x, index, aux):
        return jnp.outer(t.apply_fn(params, x[None])[0], x)

    layout = mlp[1].layer_collection
    with pytest.raises(ValueError, match=r"must return a vector \(K,\)"):
        PMatImplicit.from_jacobians(matrix_per_example, t.params, t.x, layer_collection=layout)
    vector_per_example = PMatImplicit.from_jacobians(
        lambda params, x, index, aux: t.apply_fn(params, x[None])[0], t.params, t.x,
        layer_collection=layout)
    assert vector_per_example.num_examples == t.x.shape[0]


def test_float32_model_answers_a_float64_vector_in_float64():
    params = {"w": jnp.linspace(-1, 1, 6, dtype=jnp.float32).reshape(3, 2)}
    x = jnp.linspace(0, 1, 12, dtype=jnp.float32).reshape(4, 3)

    def apply_fn(p, x):
        return jnp.tanh(x @ p["w"])

    v = jnp.arange(6.0)
    F = FIM(apply_fn, params, x, PMatImplicit, variant="regression")
    ref = FIM(apply_fn, params, x, PMatDense, variant="regression").to_dense()
    for got, want in ((F.vTMv(v), v @ ref @ v), (F.mv(v), ref @ v)):
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_reverse_mode_through_a_cg_solve():
    """``jax.grad`` through ``(F + λI)⁻¹ v``, with respect to ``v`` and to the parameters
    ``F`` is built at: the CG solve is differentiated as the solution of its linear system
    (``lax.custom_linear_solve``), and agrees with the dense Cholesky solve's derivative."""
    params = {"w": jnp.linspace(-0.5, 0.5, 6).reshape(3, 2), "b": jnp.zeros(2)}
    x = jnp.arange(12.0).reshape(4, 3) / 10
    v = jnp.linspace(1.0, 2.0, 8)

    def apply_fn(p, x):
        return jnp.tanh(x @ p["w"] + p["b"])

    def loss(p, v, rep, **options):
        F = FIM(apply_fn, p, x, rep, variant="regression")
        return jnp.sum(F.solve(v, 0.1, **options) ** 2)

    want = jax.grad(loss, argnums=(0, 1))(params, v, PMatDense)
    got = jax.grad(loss, argnums=(0, 1))(params, v, PMatImplicit, rtol=1e-12)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-8)
    for a, b in zip(jax.tree_util.tree_leaves(got[0]), jax.tree_util.tree_leaves(want[0])):
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-10)


def test_cg_of_non_finite_products_is_an_error_or_nan():
    """A NaN residual stops CG at once (NaN > threshold is false): eagerly an error naming
    it, under jit NaN — never the starting point x = 0 as if it had converged."""
    from jaxgeom import cg

    t = make_linen_mlp()
    x = t.x.at[2, 0].set(jnp.nan)
    F = FIM(t.apply_fn, t.params, (x, t.y), PMatImplicit)  # lazy: the data are read by solve
    with pytest.raises(FloatingPointError, match="residual is not finite"):
        F.solve(vec(t, 1), REGUL)
    b = jnp.ones(3)
    assert np.isnan(jax.jit(lambda b: cg(lambda v: v * jnp.nan, b))(b)).all()
    np.testing.assert_allclose(jax.jit(lambda b: cg(lambda v: 2 * v, b))(b), b / 2)


def test_cg_warm_start_in_any_vector_form(mlp):
    """x0 is a vector like v: flat, a params pytree or a PVector (e.g. the last answer)."""
    t, F, ref = mlp
    v = vec(t, 3)
    rhs = F.mv(v) + REGUL * v
    for x0 in (v.to_flat(), v.tree, v):
        x = F.solve(rhs, REGUL, x0=x0, rtol=1e-12)
        np.testing.assert_allclose(x.to_flat(), v.to_flat(), rtol=1e-6, atol=1e-7)


def test_nnx_state_trained_in_place_after_the_build():
    """The state of ``nnx.split`` holds the model's ``Variable`` objects, which an
    ``nnx.Optimizer`` rebinds in place: a matrix-free Fisher, Jacobian or Hessian built from
    it (and a last-layer one from ``Restriction.apply_fn``) took its products at the
    trained parameters afterwards, no longer those it was built at."""
    from flax import nnx

    from jaxgeom import Hessian, Jacobian, PFMapDense, PFMapImplicit
    from jaxgeom.restriction import restrict

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(3, 4, param_dtype=jnp.float64, rngs=rngs)
            self.l2 = nnx.Linear(4, 2, param_dtype=jnp.float64, rngs=rngs)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.l1(x)))

    model = Net(nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)

    def apply_fn(s, x):
        return nnx.merge(graphdef, s)(x)

    def loss(s, batch):
        return jnp.mean((apply_fn(s, batch[0]) - batch[1]) ** 2)

    x = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
    y = jax.random.normal(jax.random.PRNGKey(1), (5, 2))
    R = restrict(FIM(apply_fn, state, x, PMatDiag).layer_collection, "l2")
    last_fn, last = R.apply_fn(apply_fn, state), R.select(state)
    lazy = [FIM(apply_fn, state, x, PMatImplicit), Hessian(loss, state, (x, y), PMatImplicit),
            FIM(last_fn, last, x, PMatImplicit, layer_collection=R.layer_collection)]
    want = [FIM(apply_fn, state, x, PMatDense).to_dense(),
            Hessian(loss, state, (x, y), PMatDense).to_dense(),
            FIM(last_fn, last, x, PMatDense, layer_collection=R.layer_collection).to_dense()]
    J = Jacobian(apply_fn, state, x, PFMapImplicit)
    J_want = Jacobian(apply_fn, state, x, PFMapDense).to_dense()
    before = np.asarray(jax.tree_util.tree_leaves(state)[0])
    nnx.update(model, jax.tree_util.tree_map(lambda a: a + 0.5, state))  # trained in place
    assert not np.allclose(jax.tree_util.tree_leaves(state)[0], before)  # state moved too
    for M, dense in zip(lazy, want):
        np.testing.assert_allclose(M.to_dense(), dense, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(J.to_dense(), J_want, rtol=1e-10, atol=1e-12)
