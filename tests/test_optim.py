"""Natural-gradient optax transforms against dense float64 formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from models import make_linen_wide_hidden, make_plain_mlp, reference_fisher
from pmat_checks import compilations

import jaxgeom as jg
from jaxgeom import optim

LAM = 0.1


def flat(tree):
    return ravel_pytree(tree)[0]


@pytest.fixture(scope="module")
def task():
    t = make_plain_mlp(n=7)
    loss = optim._MeanLoss(t.apply_fn, "classif_logits")
    grads = jax.grad(loss)(t.params, (t.x, t.y))
    return t, grads


def one_step(tx, t, grads, **extra):
    state = tx.init(t.params)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p, batch=(t.x, t.y), **extra))
    return step(grads, state, t.params)


def blockdiag_reference(t, F):
    layout = jg.LayerCollection.from_model(t.apply_fn, t.params, t.x[:1])
    mask = np.zeros(F.shape, bool)
    for layer in layout.layers:
        idx = layout.layer_indices(layer)
        mask[np.ix_(idx, idx)] = True
    return jnp.where(mask, F, 0.0)


@pytest.mark.parametrize("name", ["diag", "blockdiag", "kfac", "dense", "implicit"])
def test_one_step_equals_dense_formula(task, name):
    t, grads = task
    F = reference_fisher(t.apply_fn, t.params, t.x)
    rep, M, tol = {
        "diag": (jg.PMatDiag, jnp.diag(jnp.diag(F)), 1e-10),
        "blockdiag": (jg.PMatBlockDiag, blockdiag_reference(t, F), 1e-10),
        "kfac": (jg.PMatKFAC, None, 1e-10),
        "dense": (jg.PMatDense, F, 1e-10),
        "implicit": (jg.PMatImplicit, F, 1e-6),
    }[name]
    if M is None:  # K-FAC: its own dense matrix
        M = jg.FIM(t.apply_fn, t.params, (t.x, t.y), rep).to_dense()
    lr = 0.3
    tx = optim.natural_gradient(lr, rep, damping=LAM, apply_fn=t.apply_fn,
                                solve_options={"rtol": 1e-10} if name == "implicit" else None)
    updates, _ = one_step(tx, t, grads)
    expected = -lr * jnp.linalg.solve(M + LAM * jnp.eye(M.shape[0]), flat(grads))
    np.testing.assert_allclose(flat(updates), expected, atol=tol, rtol=tol)


def test_state_damping_is_the_cached_inverses(task):
    """With a damping schedule and ``inverse_period = 3`` the steps use the cached
    ``(F + λ_t I)⁻¹`` of the last recomputation (steps 0–2: ``λ₀``, step 3: ``λ₃``), and
    the state's ``damping`` is that ``λ``, not the schedule's value at each step."""
    t, grads = task
    F = reference_fisher(t.apply_fn, t.params, t.x)
    schedule = lambda count: 0.1 * 0.5**count  # noqa: E731
    tx = optim.scale_by_natural_gradient(jg.PMatDense, damping=schedule, inverse_period=3,
                                         apply_fn=t.apply_fn, example_batch=(t.x, t.y))
    step = jax.jit(lambda s: tx.update(grads, s, t.params, batch=(t.x, t.y)))
    state = tx.init(t.params)
    for used in [0.1, 0.1, 0.1, 0.0125]:
        direction, state = step(state)
        np.testing.assert_allclose(state.damping, used, rtol=1e-12)
        expected = jnp.linalg.solve(F + used * jnp.eye(F.shape[0]), flat(grads))
        np.testing.assert_allclose(flat(direction), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("damping", ["pi", "pi_one"])
@pytest.mark.parametrize("inverse_period", [1, 2])
def test_kfac_factored_damping(task, damping, inverse_period):
    """``solve_options={"damping": ...}`` reaches K-FAC's solve, and the cached inverse
    (``inverse_period > 1``) of the factor-damped blocks: the step is the π-damped
    (``"pi"``) or π = 1 (``"pi_one"``, the formula of NNGeometry's ``use_pi=False``) solve."""
    t, grads = task
    tx = optim.scale_by_natural_gradient(jg.PMatKFAC, damping=LAM, apply_fn=t.apply_fn,
                                         inverse_period=inverse_period,
                                         example_batch=(t.x, t.y),
                                         solve_options={"damping": damping})
    direction, _ = one_step(tx, t, grads)
    K = jg.FIM(t.apply_fn, t.params, (t.x, t.y), jg.PMatKFAC)
    np.testing.assert_allclose(flat(direction), flat(K.solve(grads, LAM, damping=damping)),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("options", [
    dict(), dict(inverse_period=2), dict(solve_options={"damping": "pi"}, inverse_period=2)])
def test_kfac_step_runs_its_factorisations_side_by_side(task, monkeypatch, options):
    """On a CPU, where the factors' factorisations split well over the cores (forced here
    for this small model), the jitted step holds LAPACK to one thread around them (two
    host callbacks: :func:`jaxgeom._lapack.one_thread_in_trace`) and runs ``eigh``'s in
    one host call more (:func:`jaxgeom.pmat._spectral.host_eighs`), with the numbers of
    the step without either, and LAPACK's threads are back after it."""
    from jaxgeom import _lapack

    t, grads = task
    tx = optim.scale_by_natural_gradient(jg.PMatKFAC, damping=LAM, apply_fn=t.apply_fn,
                                         example_batch=(t.x, t.y), **options)
    state = tx.init(t.params)

    def update(g, s, p):
        return tx.update(g, s, p, batch=(t.x, t.y))

    def callbacks():  # a new function: traced anew, not taken from JAX's cache
        return str(jax.make_jaxpr(lambda *a: update(*a))(grads, state, t.params)).count(
            "pure_callback")

    without = jax.jit(lambda *a: update(*a))(grads, state, t.params)
    assert callbacks() == 0  # the model's factors: too small to hold
    monkeypatch.setattr(_lapack, "_cores", lambda: 2)
    monkeypatch.setattr(_lapack, "SIDE_BY_SIDE_MIN_COST", 0)
    held = jax.jit(lambda *a: update(*a))(grads, state, t.params)
    if jax.default_backend() == "cpu":
        assert callbacks() == (2 if options.get("solve_options") else 3)
        assert _lapack._ONE_THREAD._count == 0
    for a, b in zip(jax.tree_util.tree_leaves(held), jax.tree_util.tree_leaves(without)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def test_monte_carlo_and_empirical_fisher(task):
    t, grads = task
    key = jax.random.PRNGKey(3)
    mc = jg.FIM_MonteCarlo(t.apply_fn, t.params, (t.x, t.y), jg.PMatDense, key=key,
                           trials=2).to_dense()
    per_example = jax.vmap(
        lambda x, y: flat(jax.grad(optim._MeanLoss(t.apply_fn, "classif_logits"))(
            t.params, (x[None], y[None]))))(t.x, t.y)
    empirical = per_example.T @ per_example / t.x.shape[0]
    for fisher, M, extra in (("monte_carlo", mc, {"key": key}), ("empirical", empirical, {})):
        tx = optim.scale_by_natural_gradient(jg.PMatDense, damping=LAM, fisher=fisher,
                                             trials=2, apply_fn=t.apply_fn)
        direction, _ = one_step(tx, t, grads, **extra)
        expected = jnp.linalg.solve(M + LAM * jnp.eye(M.shape[0]), flat(grads))
        np.testing.assert_allclose(flat(direction), expected, rtol=1e-9, atol=1e-11)


def test_apply_fn_as_extra_arg_and_damping_schedule(task):
    t, grads = task
    schedule = optax.linear_schedule(1.0, 0.1, 4)
    tx = optim.scale_by_natural_gradient(jg.PMatDiag, damping=schedule)
    direction, state = one_step(tx, t, grads, apply_fn=t.apply_fn)
    diag = jnp.diag(reference_fisher(t.apply_fn, t.params, t.x))
    np.testing.assert_allclose(flat(direction), flat(grads) / (diag + 1.0), rtol=1e-10)
    assert state.count == 1 and state.damping == 1.0
    with pytest.raises(ValueError, match="apply_fn"):
        tx.update(grads, tx.init(t.params), t.params, batch=(t.x, t.y))


def kfac_chain(t, **options):
    return optax.chain(
        optim.scale_by_natural_gradient(jg.PMatKFAC, apply_fn=t.apply_fn,
                                        example_batch=(t.x, t.y), **options),
        optax.add_decayed_weights(1e-3),
        optax.scale_by_learning_rate(optax.exponential_decay(0.2, 2, 0.5)),
    )


def batches(t, steps):
    keys = jax.random.split(jax.random.PRNGKey(11), steps)
    return [(t.x + 0.3 * jax.random.normal(k, t.x.shape), t.y) for k in keys]


def test_state_roundtrips_jit_and_chain_with_refresh_periods(task):
    t, grads = task
    tx = kfac_chain(t, damping=LAM, curvature_period=3, inverse_period=3)
    state = tx.init(t.params)
    structure = jax.tree_util.tree_structure(state)

    @jax.jit
    def train_step(params, state, batch):
        g = jax.grad(optim._MeanLoss(t.apply_fn, "classif_logits"))(params, batch)
        updates, state = tx.update(g, state, params, batch=batch)
        return optax.apply_updates(params, updates), state

    params, history, trajectory = t.params, [], []
    for batch in batches(t, 5):
        params, state = train_step(params, state, batch)
        assert jax.tree_util.tree_structure(state) == structure
        history.append(state[0])
        trajectory.append(params)
    # refreshed at steps 0 and 3 only: unchanged in between, changed at the refresh
    for leaf0, leaf1, leaf2 in zip(*(jax.tree_util.tree_leaves(h.curvature)
                                     for h in history[:3])):
        np.testing.assert_array_equal(leaf0, leaf1)
        np.testing.assert_array_equal(leaf0, leaf2)
    assert not all(np.array_equal(a, b) for a, b in zip(
        jax.tree_util.tree_leaves(history[2].curvature),
        jax.tree_util.tree_leaves(history[3].curvature)))
    inv = [jax.tree_util.tree_leaves(h.inverse) for h in history]
    assert all(np.array_equal(a, b) for a, b in zip(inv[0], inv[2]))
    # the same steps without jit give the same parameters, and, once each branch of the
    # periods has run, compile nothing (a lax.cond of the step's closures compiled them
    # anew at every eager step)
    state, p = tx.init(t.params), t.params
    for step, (batch, expected) in enumerate(zip(batches(t, 5), trajectory)):
        g = jax.grad(optim._MeanLoss(t.apply_fn, "classif_logits"))(p, batch)
        with compilations() as compiled:
            u, state = tx.update(g, state, p, batch=batch)
        p = optax.apply_updates(p, u)
        np.testing.assert_allclose(flat(p), flat(expected), rtol=1e-9, atol=1e-12)
        assert step < 3 or compiled == [], (step, compiled)
    # the cached inverse is the K-FAC inverse of the stored curvature with the damping
    assert isinstance(history[0].inverse, jg.PMatKFAC)
    # a Flax checkpoint of the state (curvature and inverse included) restores it exactly
    from flax import serialization

    restored = serialization.from_bytes(tx.init(t.params)[0], serialization.to_bytes(history[3]))
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(history[3])
    for got, saved in zip(jax.tree_util.tree_leaves(restored),
                          jax.tree_util.tree_leaves(history[3])):
        np.testing.assert_array_equal(got, saved)


@pytest.mark.parametrize("rep", [jg.PMatDiag, jg.PMatKFAC])
def test_moving_average_of_the_curvature(task, rep):
    t, grads = task
    tx = optim.scale_by_natural_gradient(rep, damping=LAM, ema=0.75, apply_fn=t.apply_fn,
                                         example_batch=(t.x, t.y))
    state, p = tx.init(t.params), t.params
    update = jax.jit(lambda s, p, b: tx.update(grads, s, p, batch=b))
    estimates = []
    for batch in batches(t, 2):
        estimates.append(jg.FIM(t.apply_fn, p, batch, rep))
        u, state = update(state, p, batch)
        p = optax.apply_updates(p, optax.tree.scale(-0.1, u))
    if rep is jg.PMatKFAC:  # the factors are averaged
        for got, a, b in zip(state.curvature.factors, *(e.factors for e in estimates)):
            np.testing.assert_allclose(got.A, 0.75 * a.A + 0.25 * b.A, rtol=1e-12)
            np.testing.assert_allclose(got.G, 0.75 * a.G + 0.25 * b.G, rtol=1e-12)
    else:
        expected = 0.75 * estimates[0].to_dense() + 0.25 * estimates[1].to_dense()
        np.testing.assert_allclose(state.curvature.to_dense(), expected, rtol=1e-12)


def test_moving_average_needs_a_closed_sum(task):
    t, _ = task
    with pytest.raises(ValueError, match="re-reads"):
        optim.scale_by_natural_gradient(jg.PMatImplicit, ema=0.9)
    with pytest.raises(ValueError, match="example_batch"):
        optim.scale_by_natural_gradient(jg.PMatDiag, ema=0.9).init(t.params)


def test_levenberg_marquardt_rule():
    rule = optim.LevenbergMarquardt(min_damping=1e-3, max_damping=10.0)
    lm = jax.jit(optim.levenberg_marquardt, static_argnums=2)
    assert np.isclose(lm(1.0, 0.9, rule), 2 / 3)       # good model: less damping
    assert np.isclose(lm(1.0, 0.5, rule), 1.0)         # in between: unchanged
    assert np.isclose(lm(1.0, 0.1, rule), 1.5)         # poor model: more damping
    assert np.isclose(lm(1.0, jnp.nan, rule), 1.5)     # failed step: more damping
    assert np.isclose(lm(9.0, -1.0, rule), 10.0)       # clipped
    assert np.isclose(lm(1.1e-3, 1.0, rule), 1e-3)


def test_levenberg_marquardt_in_the_transform(task):
    t, grads = task
    rule = optim.LevenbergMarquardt(initial=0.5)
    lr = 2.0
    tx = optim.natural_gradient(lr, jg.PMatDense, damping=rule, apply_fn=t.apply_fn)
    updates, state = one_step(tx, t, grads)
    loss = optim._MeanLoss(t.apply_fn, "classif_logits")
    F = reference_fisher(t.apply_fn, t.params, t.x)
    u = -lr * jnp.linalg.solve(F + 0.5 * jnp.eye(F.shape[0]), flat(grads))
    np.testing.assert_allclose(flat(updates), u, rtol=1e-10)
    actual = loss(optax.apply_updates(t.params, updates), (t.x, t.y)) - loss(t.params, (t.x, t.y))
    rho = actual / (flat(grads) @ u + 0.5 * u @ F @ u)
    np.testing.assert_allclose(state[0].rho, rho, rtol=1e-10)
    np.testing.assert_allclose(state[0].damping, optim.levenberg_marquardt(0.5, rho, rule))


def test_clipping_by_norm_and_by_kl(task):
    t, grads = task
    lr = 0.5
    F = reference_fisher(t.apply_fn, t.params, t.x)
    full = jnp.linalg.solve(F + LAM * jnp.eye(F.shape[0]), flat(grads))
    tx = optim.scale_by_natural_gradient(jg.PMatDense, damping=LAM, apply_fn=t.apply_fn,
                                         max_norm=0.1)
    d, _ = one_step(tx, t, grads)
    np.testing.assert_allclose(flat(d), full * 0.1 / jnp.linalg.norm(full), rtol=1e-10)
    c = 1e-4
    tx = optim.scale_by_natural_gradient(jg.PMatDense, damping=LAM, apply_fn=t.apply_fn,
                                         kl_clip=c, learning_rate=lr)
    d, _ = one_step(tx, t, grads)
    d = flat(d)
    np.testing.assert_allclose(lr**2 * d @ F @ d, c, rtol=1e-9)
    np.testing.assert_allclose(d / jnp.linalg.norm(d), full / jnp.linalg.norm(full),
                               rtol=1e-9)


def ill_conditioned_problem(n=256):
    """Linearly separable labels, inputs on scales 5, 1 and 0.1: plain gradient descent
    is slowed by the conditioning, the natural gradient is invariant to it."""
    t = make_plain_mlp(n=n)
    x = jax.random.normal(jax.random.PRNGKey(5), (n, 3))
    y = jnp.argmax(x @ jax.random.normal(jax.random.PRNGKey(6), (3, 4)), axis=1)
    return t, x * jnp.array([5.0, 1.0, 0.1]), y


def train(tx, t, x, y, steps):
    loss = optim._MeanLoss(t.apply_fn, "classif_logits")

    @jax.jit
    def step(params, state):
        value, g = jax.value_and_grad(loss)(params, (x, y))
        updates, state = tx.update(g, state, params, batch=(x, y), value=value)
        return optax.apply_updates(params, updates), state

    params, state = t.params, tx.init(t.params)
    for _ in range(steps):
        params, state = step(params, state)
    return float(loss(params, (x, y)))


def test_kfac_beats_sgd_on_a_short_seeded_run():
    t, x, y = ill_conditioned_problem()
    steps = 30
    kfac = train(optim.natural_gradient(0.5, jg.PMatKFAC, damping=1e-2, apply_fn=t.apply_fn),
                 t, x, y, steps)
    sgd = train(optax.sgd(1.0), t, x, y, steps)  # the best of 0.1, 0.3, 1, 3 (measured)
    assert kfac < sgd - 0.25, (kfac, sgd)  # measured: 0.29 vs 0.78


def test_ekfac_one_step_and_refit_between_basis_refreshes(task):
    t, grads = task
    rep = jg.PMatEKFAC
    M = jg.FIM(t.apply_fn, t.params, (t.x, t.y), rep).to_dense()
    tx = optim.scale_by_natural_gradient(rep, damping=LAM, apply_fn=t.apply_fn)
    direction, _ = one_step(tx, t, grads)
    expected = jnp.linalg.solve(M + LAM * jnp.eye(M.shape[0]), flat(grads))
    np.testing.assert_allclose(flat(direction), expected, rtol=1e-9, atol=1e-12)

    tx = optim.scale_by_natural_gradient(rep, damping=LAM, curvature_period=1,
                                         inverse_period=2, apply_fn=t.apply_fn,
                                         example_batch=(t.x, t.y))
    update = jax.jit(lambda s, b: tx.update(grads, s, t.params, batch=b))
    state, seen = tx.init(t.params), []
    for batch in batches(t, 3):
        _, state = update(state, batch)
        seen.append(state.curvature)
    basis = [[(n.qa, n.qg) for n in c.factors] for c in seen]
    diag = [[n.d for n in c.factors] for c in seen]
    for a, b in zip(*(jax.tree_util.tree_leaves(b) for b in basis[:2])):
        np.testing.assert_array_equal(a, b)                            # basis kept
    assert not np.allclose(diag[0][0], diag[1][0])                     # diagonal refitted
    refit = seen[0].refit(t.apply_fn, t.params, batches(t, 3)[1])
    for got, want in zip(diag[1], (n.d for n in refit.factors)):
        np.testing.assert_allclose(got, want, rtol=1e-10)
    assert not np.allclose(basis[1][0][1], basis[2][0][1])             # new basis at step 2


def test_ekfac_basis_period_need_not_be_a_multiple_of_the_refit_period(task):
    """``k = 2, m = 3``: a new basis at steps 0 and 3 (every ``m``, not every
    ``lcm(k, m) = 6``), a refit in the kept basis at step 2, nothing at step 1."""
    t, grads = task
    tx = optim.scale_by_natural_gradient(jg.PMatEKFAC, damping=LAM, curvature_period=2,
                                         inverse_period=3, apply_fn=t.apply_fn,
                                         example_batch=(t.x, t.y))
    update = jax.jit(lambda s, b: tx.update(grads, s, t.params, batch=b))
    state, seen = tx.init(t.params), []
    data = batches(t, 4)
    for batch in data:
        _, state = update(state, batch)
        seen.append(state.curvature)

    def basis(c):
        return jax.tree_util.tree_leaves([(n.qa, n.qg) for n in c.factors])

    def same(a, b):
        return all(np.array_equal(x, y) for x, y in zip(a, b))

    assert same(jax.tree_util.tree_leaves(seen[0]), jax.tree_util.tree_leaves(seen[1]))
    assert same(basis(seen[1]), basis(seen[2]))                       # refit at step 2
    refit = seen[0].refit(t.apply_fn, t.params, data[2])
    for got, want in zip(seen[2].factors, refit.factors):
        np.testing.assert_allclose(got.d, want.d, rtol=1e-10)
    assert not same(basis(seen[2]), basis(seen[3]))                   # new basis at step 3
    rebuilt = jg.FIM(t.apply_fn, t.params, data[3], jg.PMatEKFAC)
    np.testing.assert_allclose(seen[3].to_dense(), rebuilt.to_dense(), rtol=1e-9, atol=1e-12)


def test_ekfac_state_holds_builds_on_factor_ranges_and_refits():
    """A wide layer seen on few examples: a build keeps its low-rank factors' ranges (a
    static part of the matrix), a refit on new data the whole bases. EK-FAC's state holds
    either through one ``lax.cond`` (builds taken
    :meth:`~jaxgeom.PMatEKFAC.without_rank_bounds`),
    and its directions are the damped solves with the build, then with the refit."""
    t = make_linen_wide_hidden()
    grads = jax.grad(optim._MeanLoss(t.apply_fn, "classif_logits"))(t.params, (t.x, t.y))
    assert [n.ranges for n in jg.FIM(t.apply_fn, t.params, (t.x, t.y),
                                     jg.PMatEKFAC).factors] == [(6, 32), (32, None)]
    tx = optim.scale_by_natural_gradient(jg.PMatEKFAC, damping=LAM, inverse_period=2,
                                         apply_fn=t.apply_fn, example_batch=(t.x, t.y))
    update = jax.jit(lambda s, b: tx.update(grads, s, t.params, batch=b))
    state = tx.init(t.params)
    build, refit = batches(t, 2)
    first = jg.FIM(t.apply_fn, t.params, build, jg.PMatEKFAC)
    for batch, F in ((build, first), (refit, first.refit(t.apply_fn, t.params, refit))):
        direction, state = update(state, batch)
        M = F.to_dense()
        expected = jnp.linalg.solve(M + LAM * jnp.eye(M.shape[0]), flat(grads))
        np.testing.assert_allclose(flat(direction), expected, rtol=1e-8, atol=1e-12)
        assert [n.ranges for n in state.curvature.factors] == [(None, None)] * 2


def test_a_state_holds_builds_on_batches_of_any_size():
    """A KFAC build's rank bounds depend on its number of examples (the first layer's
    ``A``, 9², from 6 or 5 rows): the state holds builds without them, so that a batch of
    another size still refreshes it through one ``lax.cond``; in between, the directions
    are the damped solves with the held matrix."""
    t = make_linen_wide_hidden()
    sizes = [n.rank_bounds[0] for n in (
        jg.FIM(t.apply_fn, t.params, (t.x[:k], t.y[:k]), jg.PMatKFAC).factors[0]
        for k in (6, 5))]
    assert sizes == [6, 5]
    grads = jax.grad(optim._MeanLoss(t.apply_fn, "classif_logits"))(t.params, (t.x, t.y))
    tx = optim.scale_by_natural_gradient(jg.PMatKFAC, damping=LAM, curvature_period=2,
                                         apply_fn=t.apply_fn, example_batch=(t.x, t.y))
    state = tx.init(t.params)
    held = jg.FIM(t.apply_fn, t.params, (t.x[:5], t.y[:5]), jg.PMatKFAC).to_dense()
    for k in (5, 6, 5):  # refresh on 5 examples, keep it, refresh again
        direction, state = tx.update(grads, state, t.params, batch=(t.x[:k], t.y[:k]))
        expected = jnp.linalg.solve(held + LAM * jnp.eye(held.shape[0]), flat(grads))
        np.testing.assert_allclose(flat(direction), expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("periods", [{}, {"curvature_period": 2}])
def test_under_optax_masked_the_subset_of_trained_parameters(task, periods):
    """Under ``optax.masked`` the transform sees ``w1, b1`` only: with an ``apply_fn`` of
    that subset its direction is ``(F₁₁ + λI)⁻¹ g₁`` (``F₁₁`` the Fisher's block of the
    subset); with the whole model's ``apply_fn`` it fails naming the cause."""
    t, grads = task
    trained = {k: k.endswith("1") for k in t.params}
    frozen = {k: v for k, v in t.params.items() if not trained[k]}

    def apply_subset(p, x):
        return t.apply_fn({**frozen, **{k: v for k, v in p.items()
                                        if not isinstance(v, optax.MaskedNode)}}, x)

    kwargs = dict(periods, example_batch=(t.x, t.y)) if periods else {}
    tx = optax.masked(optim.scale_by_natural_gradient(
        jg.PMatDense, damping=LAM, apply_fn=apply_subset, **kwargs), trained)
    direction, _ = tx.update(grads, tx.init(t.params), t.params, batch=(t.x, t.y))
    sub = {k: t.params[k] for k in ("b1", "w1")}
    F = reference_fisher(lambda p, x: apply_subset(p, x), sub, t.x)
    g = flat({k: grads[k] for k in sub})
    expected = jnp.linalg.solve(F + LAM * jnp.eye(F.shape[0]), g)
    np.testing.assert_allclose(flat({k: direction[k] for k in sub}), expected, rtol=1e-9)
    np.testing.assert_array_equal(direction["w2"], grads["w2"])  # passed through

    tx = optax.masked(optim.scale_by_natural_gradient(
        jg.PMatDense, damping=LAM, apply_fn=t.apply_fn, **kwargs), trained)
    with pytest.raises(TypeError, match="optax.masked.*apply_fn of that subset"):
        tx.update(grads, tx.init(t.params), t.params, batch=(t.x, t.y))


def test_nnx_optimizer_with_a_held_curvature():
    """``nnx.Optimizer`` initialises the transform with ``nnx.Param``-wrapped leaves and
    updates it with pure arrays: the held K-FAC curvature fits both, and its steps are those
    of the transform run on the pure parameters."""
    from flax import nnx
    from models import NNXMLP, to_float64

    model = NNXMLP(nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    nnx.update(model, to_float64(optim._without_variables(state)))

    def apply_fn(p, x):
        return nnx.merge(graphdef, p)(x)

    x = jax.random.normal(jax.random.PRNGKey(5), (7, 3))
    y = jnp.arange(7) % 4
    tx = optim.natural_gradient(0.5, jg.PMatKFAC, damping=LAM, curvature_period=2,
                                apply_fn=apply_fn, example_batch=(x, y))
    params = optim._without_variables(nnx.state(model, nnx.Param))
    start, opt_state = flat(params), tx.init(params)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    loss = optim._MeanLoss(apply_fn, "classif_logits")
    for _ in range(3):
        grads = jax.grad(loss)(params, (x, y))
        updates, opt_state = tx.update(grads, opt_state, params, batch=(x, y))
        params = optax.apply_updates(params, updates)
        optimizer.update(model, nnx.grad(lambda m: loss(nnx.state(m, nnx.Param), (x, y)))(
            model), batch=(x, y))
    trained = optim._without_variables(nnx.state(model, nnx.Param))
    np.testing.assert_allclose(flat(trained), flat(params), rtol=1e-12)
    assert not np.allclose(flat(params), start)


def test_inject_hyperparams_changes_the_damping_and_learning_rate(task):
    """Under ``optax.inject_hyperparams`` the damping and learning rate in the state's
    ``hyperparams`` are the ones used: ``-η (F + λI)⁻¹ g`` for the injected ``η, λ``."""
    t, grads = task
    F = reference_fisher(t.apply_fn, t.params, t.x)
    tx = optax.inject_hyperparams(optim.natural_gradient, static_args=optim.STATIC_ARGS)(
        learning_rate=0.3, representation=jg.PMatDense, damping=1e-2, apply_fn=t.apply_fn)
    state = tx.init(t.params)
    step = jax.jit(lambda s: tx.update(grads, s, t.params, batch=(t.x, t.y)))
    for lr, lam in ((0.3, 1e-2), (0.5, 1.0)):
        state.hyperparams["learning_rate"] = jnp.asarray(lr)
        state.hyperparams["damping"] = jnp.asarray(lam)
        updates, _ = step(state)
        expected = -lr * jnp.linalg.solve(F + lam * jnp.eye(F.shape[0]), flat(grads))
        np.testing.assert_allclose(flat(updates), expected, rtol=1e-10)
    # a count that shapes the state cannot be a traced hyperparameter
    tx = optax.inject_hyperparams(optim.scale_by_natural_gradient,
                                  static_args=("representation", "apply_fn"))(
        jg.PMatDense, apply_fn=t.apply_fn)
    with pytest.raises(TypeError, match="static_args=jaxgeom.optim.STATIC_ARGS"):
        jax.jit(lambda s: tx.update(grads, s, t.params, batch=(t.x, t.y)))(tx.init(t.params))
    # without static_args, optax calls the representation class as a schedule of the count
    tx = optax.inject_hyperparams(optim.natural_gradient)(
        learning_rate=0.3, representation=jg.PMatDense, damping=1e-2, apply_fn=t.apply_fn)
    with pytest.raises(TypeError, match="step count.*static_args=jaxgeom.optim.STATIC_ARGS"):
        tx.init(t.params)


def test_moving_average_of_a_mixed_curvature_part_by_part(task):
    """``PMatMixed``'s parts are averaged each in its own way: K-FAC's factors, the
    diagonal's values."""
    t, grads = task
    options = {"mapping": {"w1": jg.PMatKFAC}, "default": jg.PMatDiag}
    tx = optim.scale_by_natural_gradient(jg.PMatMixed, damping=LAM, ema=0.75,
                                         apply_fn=t.apply_fn, example_batch=(t.x, t.y),
                                         fim_options=options)
    state, estimates = tx.init(t.params), []
    for batch in batches(t, 2):
        estimates.append(jg.FIM(t.apply_fn, t.params, batch, jg.PMatMixed, **options))
        _, state = tx.update(grads, state, t.params, batch=batch)
    kfac, diag = state.curvature.parts
    first, second = ([e.parts[0].factors[0] for e in estimates],
                     [e.parts[1] for e in estimates])
    np.testing.assert_allclose(kfac.factors[0].A, 0.75 * first[0].A + 0.25 * first[1].A,
                               rtol=1e-12)
    np.testing.assert_allclose(kfac.factors[0].G, 0.75 * first[0].G + 0.25 * first[1].G,
                               rtol=1e-12)
    np.testing.assert_allclose(diag.get_diag(), 0.75 * second[0].get_diag()
                               + 0.25 * second[1].get_diag(), rtol=1e-12)


@pytest.mark.parametrize("rep, options, match", [
    (jg.PMatLowRank, {}, "PMatLowRanks is a PMatLowRank of other shapes"),
    (jg.PMatEKFAC, {}, "inverse_period > 1"),
])
def test_moving_average_that_would_change_the_state_fails_at_init(task, rep, options, match):
    t, _ = task
    tx = optim.scale_by_natural_gradient(rep, ema=0.9, apply_fn=t.apply_fn,
                                         example_batch=(t.x, t.y), **options)
    with pytest.raises(TypeError, match=match):
        tx.init(t.params)


def test_a_low_rank_state_needs_batches_of_its_size(task):
    """``PMatLowRank`` has one row per example: a state built for 7 examples cannot hold
    an estimate on 5 (a clear error, not a ``lax.cond`` type error); 7 work."""
    t, grads = task
    tx = optim.scale_by_natural_gradient(jg.PMatLowRank, damping=LAM, curvature_period=2,
                                         apply_fn=t.apply_fn, example_batch=(t.x, t.y))
    state = tx.init(t.params)
    direction, _ = tx.update(grads, state, t.params, batch=(t.x, t.y))
    F = reference_fisher(t.apply_fn, t.params, t.x)
    np.testing.assert_allclose(
        flat(direction), jnp.linalg.solve(F + LAM * jnp.eye(F.shape[0]), flat(grads)),
        rtol=1e-9)
    with pytest.raises(ValueError, match="size of example_batch"):
        tx.update(grads, state, t.params, batch=(t.x[:5], t.y[:5]))


def regression_task(sigma2):
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"w": 0.5 * jax.random.normal(k[0], (3, 2)), "b": jnp.zeros(2)}

    def apply_fn(p, x):
        return jnp.tanh(x @ p["w"] + p["b"])

    x, y = jax.random.normal(k[1], (8, 3)), jax.random.normal(k[2], (8, 2))

    def nll(p, batch):  # the Gaussian negative log-likelihood, up to a constant
        return 0.5 * jnp.sum((batch[1] - apply_fn(p, batch[0])) ** 2, axis=-1) / sigma2

    return params, apply_fn, x, y, nll


def test_regression_covariance_in_the_losses():
    """With ``fim_options={"covariance": σ²}`` the Levenberg–Marquardt ratio uses the
    Gaussian NLL ``½‖y − f‖²/σ²`` (not the unit-covariance loss), and the empirical Fisher
    is the second moment of that NLL's per-example gradients."""
    sigma2, lr, lam = 4.0, 1.0, 1e-2
    params, apply_fn, x, y, nll = regression_task(sigma2)
    loss = lambda p, b: jnp.mean(nll(p, b))  # noqa: E731
    grads = jax.grad(loss)(params, (x, y))
    common = dict(apply_fn=apply_fn, variant="regression", fim_options={"covariance": sigma2})
    tx = optim.scale_by_natural_gradient(jg.PMatDense, learning_rate=lr, **common,
                                         damping=optim.LevenbergMarquardt(initial=lam))
    direction, state = tx.update(grads, tx.init(params), params, batch=(x, y))
    F = jg.FIM(apply_fn, params, (x, y), jg.PMatDense, variant="regression",
               covariance=sigma2).to_dense()
    u = -lr * flat(direction)
    step = jax.tree_util.tree_map(lambda d: -lr * d, direction)
    rho = ((loss(optax.apply_updates(params, step), (x, y)) - loss(params, (x, y)))
           / (flat(grads) @ u + 0.5 * u @ F @ u))
    np.testing.assert_allclose(state.rho, rho, rtol=1e-10)

    tx = optim.scale_by_natural_gradient(jg.PMatDense, damping=lam, fisher="empirical",
                                         **common)
    direction, _ = tx.update(grads, tx.init(params), params, batch=(x, y))
    per_example = jax.vmap(lambda xi, yi: flat(jax.grad(
        lambda p: nll(p, (xi[None], yi[None]))[0])(params)))(x, y)
    G = per_example.T @ per_example / x.shape[0]
    np.testing.assert_allclose(
        flat(direction), jnp.linalg.solve(G + lam * jnp.eye(G.shape[0]), flat(grads)),
        rtol=1e-10)


@pytest.mark.parametrize("options, match", [
    ({"max_norm": -1.0}, "max_norm must be a finite number > 0"),
    ({"kl_clip": 0.0}, "kl_clip must be a finite number > 0"),
    ({"damping": -5.0}, "damping must be a finite number >= 0"),
    ({"damping": float("nan")}, "damping must be a finite number"),
    ({"ema": 1.0}, r"ema must be a finite number in \[0, 1\)"),
    ({"damping": optim.LevenbergMarquardt(initial=-1.0)}, "LevenbergMarquardt.initial"),
    ({"damping": optim.LevenbergMarquardt(initial=1e5)},
     r"LevenbergMarquardt.initial must be a finite number in \[min_damping, max_damping\]"),
    ({"damping": optim.LevenbergMarquardt(period=0)}, "LevenbergMarquardt.period"),
    ({"damping": optim.LevenbergMarquardt(min_damping=1.0, max_damping=0.1)},
     "max_damping must be a finite number >= min_damping"),
    ({"trials": 0}, "trials must be a positive integer"),
    ({"curvature_period": 1.5}, "curvature_period must be a positive integer"),
])
def test_invalid_options_are_rejected_by_the_constructor(options, match):
    with pytest.raises(ValueError, match=match):
        optim.scale_by_natural_gradient(jg.PMatDense, **options)


LOGITS = jnp.arange(12.0).reshape(4, 3) / 4


@pytest.mark.parametrize("variant, targets, match", [
    ("classif_logits", jnp.array([0, 1, 2, -1]), r"labels must be in \[0, 3\).*from -1 to 2"),
    ("classif_logits", jnp.array([0, 1, 2, 3]), r"labels must be in \[0, 3\)"),
    ("classif_logsoftmax", jnp.array([0.0, 1, 2, 0]), "integer class labels.*got float"),
    ("classif_logits", jax.nn.one_hot(jnp.array([0, 1, 2, 0]), 3), r"jnp.argmax\(y, axis=-1\)"),
    ("classif_logits", jnp.array([[0], [1], [2], [0]]), r"\(4,\).*got labels of shape \(4, 1\)"),
    ("regression", jnp.zeros((3, 4)), r"outputs' shape \(4, 3\).*got targets of shape \(3, 4\)"),
    ("classif_binary_logits", jnp.array([[0, 1, 2]] * 4), r"binary targets must be in \[0, 1\]"),
])
def test_per_example_loss_refuses_bad_targets(variant, targets, match):
    with pytest.raises(ValueError, match=match):
        optim.per_example_loss(variant, LOGITS, targets)


def test_per_example_loss_takes_targets_with_or_without_a_trailing_unit_axis():
    out = LOGITS[:, :1]
    y = jnp.array([0.0, 1.0, 1.0, 0.0])
    ref = optax.sigmoid_binary_cross_entropy(out[:, 0], y)
    for outputs, targets in ((out, y), (out[:, 0], y[:, None]), (out, y[:, None])):
        np.testing.assert_allclose(
            optim.per_example_loss("classif_binary_logits", outputs, targets), ref)


def test_empirical_fisher_checks_the_labels_of_the_batch(task):
    t, grads = task
    tx = optim.scale_by_natural_gradient(jg.PMatDiag, apply_fn=t.apply_fn, fisher="empirical")
    with pytest.raises(ValueError, match=r"labels must be in \[0, "):
        tx.update(grads, tx.init(t.params), t.params, batch=(t.x, t.y.at[0].set(-1)))


def test_empirical_fisher_of_an_iterable_of_batches_as_the_exact_one(task):
    """``batch`` may be a list or a generator of batches for the empirical Fisher as for
    the exact one (its label check read a list's second batch as the labels: a tracer
    conversion error; a generator's: "needs labels"); Levenberg-Marquardt's loss needs one
    batch, and says so before reading it."""
    t, grads = task
    tx = optim.scale_by_natural_gradient(jg.PMatDense, apply_fn=t.apply_fn, fisher="empirical")
    expected, _ = tx.update(grads, tx.init(t.params), t.params, batch=(t.x, t.y))
    for batches in ([(t.x[:3], t.y[:3]), (t.x[3:], t.y[3:])],
                    ((t.x[i:i + 2], t.y[i:i + 2]) for i in range(0, len(t.y), 2))):
        got, _ = tx.update(grads, tx.init(t.params), t.params, batch=batches)
        np.testing.assert_allclose(ravel_pytree(got)[0], ravel_pytree(expected)[0], rtol=1e-8,
                                   atol=1e-10)
    with pytest.raises(ValueError, match=r"labels must be in \[0, "):
        tx.update(grads, tx.init(t.params), t.params,
                  batch=[(t.x[:3], t.y[:3]), (t.x[3:], t.y[3:].at[0].set(-1))])
    tx = optim.scale_by_natural_gradient(jg.PMatDiag, apply_fn=t.apply_fn, learning_rate=0.1,
                                         damping=optim.LevenbergMarquardt())
    with pytest.raises(ValueError, match=r"on one batch: pass batch=\(x, y\), not a list"):
        tx.update(grads, tx.init(t.params), t.params, batch=[(t.x, t.y)])


def test_monte_carlo_fisher_needs_one_key(task):
    t, grads = task
    tx = optim.scale_by_natural_gradient(jg.PMatDiag, apply_fn=t.apply_fn, fisher="monte_carlo")
    with pytest.raises(TypeError, match=r"update\(..., key=key\).*jax.random.key\(seed\).*got 0"):
        tx.update(grads, tx.init(t.params), t.params, batch=(t.x, t.y), key=0)


def model_coefficients(g, delta, previous, C, lam):
    """``(α, μ)`` minimising ``gᵀδ + ½δᵀ(C + λI)δ`` over ``δ = αΔ + μp`` (``μ = 0`` where
    ``p = 0``), by NumPy."""
    damped = C + lam * np.eye(len(C))
    if not previous.any():
        return -(g @ delta) / (delta @ damped @ delta), 0.0
    basis = np.stack([delta, previous], 1)
    return -np.linalg.solve(basis.T @ damped @ basis, basis.T @ g)


@pytest.mark.parametrize("adaptive", optim.ADAPTIVE)
@pytest.mark.parametrize("rep", [jg.PMatKFAC, jg.PMatDiag])
def test_adaptive_step_minimises_the_exact_quadratic_model(task, rep, adaptive):
    """Three jitted steps: each is ``αΔ + μp`` with the coefficients that minimise the
    damped quadratic model whose curvature is the exact Fisher on the batch (not ``rep``),
    ``p`` the previous step (``"momentum"``; zeros in the state before the first), and
    the state keeps that step."""
    t, _ = task
    loss = optim._MeanLoss(t.apply_fn, "classif_logits")
    tx = optim.natural_gradient(None, rep, damping=LAM, apply_fn=t.apply_fn,
                                adaptive=adaptive)
    params, state = t.params, tx.init(t.params)
    previous = np.zeros(flat(params).shape)
    if adaptive == "momentum":
        np.testing.assert_array_equal(flat(state[0].previous_step), previous)
    else:
        assert state[0].previous_step is None
    step = jax.jit(lambda g, s, p: tx.update(g, s, p, batch=(t.x, t.y)))
    mus = []
    for _ in range(3):
        g = flat(jax.grad(loss)(params, (t.x, t.y)))
        F = jg.FIM(t.apply_fn, params, (t.x, t.y), rep).to_dense()
        delta = np.linalg.solve(F + LAM * np.eye(len(F)), g)
        C = reference_fisher(t.apply_fn, params, t.x)
        momentum = previous if adaptive == "momentum" else np.zeros_like(previous)
        alpha, mu = model_coefficients(g, delta, momentum, C, LAM)
        updates, state = step(jax.grad(loss)(params, (t.x, t.y)), state, params)
        want = alpha * delta + mu * momentum
        np.testing.assert_allclose(flat(updates), want, rtol=1e-9, atol=1e-12)
        if adaptive == "momentum":
            np.testing.assert_allclose(flat(state[0].previous_step), want, rtol=1e-9,
                                       atol=1e-12)
        assert -1 < alpha < 0  # an approximate curvature: shorter than its own Newton step
        params, previous = optax.apply_updates(params, updates), want
        mus.append(mu)
    assert mus[0] == 0 and (adaptive == "learning_rate") == (mus[2] == 0)


def test_adaptive_step_with_the_exact_fisher_is_the_damped_newton_step(task):
    """Preconditioned by the exact Fisher itself, ``Δ`` already minimises the model:
    ``α = -1`` and ``μ = 0``."""
    t, grads = task
    F = reference_fisher(t.apply_fn, t.params, t.x)
    tx = optim.natural_gradient(None, jg.PMatDense, damping=LAM, apply_fn=t.apply_fn,
                                adaptive="momentum")
    state = tx.init(t.params)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p, batch=(t.x, t.y)))
    updates, state = step(grads, state, t.params)
    newton = -np.linalg.solve(F + LAM * np.eye(len(F)), flat(grads))
    np.testing.assert_allclose(flat(updates), newton, rtol=1e-9)
    params = optax.apply_updates(t.params, updates)  # the second step, with a momentum term
    grads = jax.grad(optim._MeanLoss(t.apply_fn, "classif_logits"))(params, (t.x, t.y))
    F = reference_fisher(t.apply_fn, params, t.x)
    updates, _ = step(grads, state, params)
    np.testing.assert_allclose(flat(updates), -np.linalg.solve(F + LAM * np.eye(len(F)),
                                                               flat(grads)), rtol=1e-7)


@pytest.mark.parametrize("adaptive", optim.ADAPTIVE)
def test_adaptive_step_of_a_zero_gradient_is_zero(task, adaptive):
    """``g = 0`` makes ``Δ = (F + λI)⁻¹g = 0``, and the model ``½δᵀ(C + λI)δ`` is least at
    ``δ = 0``: a zero step (``α = -gᵀΔ / Δᵀ(C + λI)Δ`` read ``0/0``: NaN), at the first
    step and after one (with momentum, ``p ≠ 0``), jitted."""
    t, grads = task
    tx = optim.natural_gradient(None, jg.PMatKFAC, damping=LAM, apply_fn=t.apply_fn,
                                adaptive=adaptive)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p, batch=(t.x, t.y)))
    zeros = jax.tree_util.tree_map(jnp.zeros_like, grads)
    state = tx.init(t.params)
    first, _ = step(zeros, state, t.params)
    np.testing.assert_array_equal(flat(first), 0.0)
    updates, state = step(grads, state, t.params)
    assert np.all(np.isfinite(flat(updates))) and np.any(flat(updates) != 0)
    after, state = step(zeros, state, optax.apply_updates(t.params, updates))
    np.testing.assert_array_equal(flat(after), 0.0)
    if adaptive == "momentum":
        np.testing.assert_array_equal(flat(state[0].previous_step), 0.0)


def test_adaptive_step_with_levenberg_marquardt_measures_the_exact_model(task):
    """The reduction ratio of an adaptive step compares the loss's change with the exact,
    undamped model's ``gᵀδ + ½δᵀCδ``."""
    t, grads = task
    rule = optim.LevenbergMarquardt(initial=0.5)
    tx = optim.natural_gradient(None, jg.PMatKFAC, damping=rule, apply_fn=t.apply_fn,
                                adaptive="learning_rate")
    updates, state = one_step(tx, t, grads)
    loss = optim._MeanLoss(t.apply_fn, "classif_logits")
    C = reference_fisher(t.apply_fn, t.params, t.x)
    u, g = flat(updates), flat(grads)
    actual = loss(optax.apply_updates(t.params, updates), (t.x, t.y)) - loss(t.params, (t.x, t.y))
    np.testing.assert_allclose(state[0].rho, actual / (g @ u + 0.5 * u @ C @ u), rtol=1e-9)
    np.testing.assert_allclose(state[0].damping, optim.levenberg_marquardt(0.5, state[0].rho,
                                                                           rule))


def test_adaptive_kfac_trains_the_ill_conditioned_problem():
    """K-FAC with its learning rate and momentum chosen by the quadratic model, no learning
    rate to tune, against the best of four plain gradient descents (as above)."""
    t, x, y = ill_conditioned_problem()
    steps = 30
    kfac = train(optim.natural_gradient(None, jg.PMatKFAC, damping=1e-2, apply_fn=t.apply_fn,
                                        adaptive="momentum"), t, x, y, steps)
    sgd = train(optax.sgd(1.0), t, x, y, steps)
    assert kfac < sgd - 0.5, (kfac, sgd)  # measured: 0.050 vs 0.78 (K-FAC at η = 0.5: 0.29)


@pytest.mark.parametrize("options, match", [
    ({"adaptive": "lr"}, "adaptive must be None or one of"),
    ({"adaptive": "momentum", "learning_rate": 0.5}, "give learning_rate=1.0"),
    ({"adaptive": "momentum", "learning_rate": optax.constant_schedule(1.0)},
     "give learning_rate=1.0"),
    ({"adaptive": "learning_rate", "kl_clip": 1e-3}, "no kl_clip"),
])
def test_adaptive_options_are_checked(options, match):
    with pytest.raises(ValueError, match=match):
        optim.scale_by_natural_gradient(jg.PMatKFAC, **options)
    with pytest.raises(ValueError, match="needs a learning_rate.*None is for adaptive"):
        optim.natural_gradient(None, jg.PMatKFAC)


def test_adaptive_step_under_inject_hyperparams(task):
    """``optax.inject_hyperparams`` passes the learning rate traced: the transform takes it
    (``None`` or 1) and the chosen step is the one without the wrapper."""
    t, grads = task
    options = dict(representation=jg.PMatKFAC, damping=LAM, apply_fn=t.apply_fn,
                   adaptive="momentum")
    plain = optim.natural_gradient(None, **options)
    want, _ = one_step(plain, t, grads)
    for lr in (None, 1.0):
        tx = optax.inject_hyperparams(optim.natural_gradient,
                                      static_args=optim.STATIC_ARGS)(learning_rate=lr, **options)
        got, _ = one_step(tx, t, grads)
        np.testing.assert_allclose(flat(got), flat(want), rtol=1e-12)


def test_adaptive_step_needs_one_batch(task):
    t, grads = task
    tx = optim.natural_gradient(None, jg.PMatKFAC, apply_fn=t.apply_fn, adaptive="momentum")
    with pytest.raises(ValueError, match="minimises the quadratic model.*on one batch"):
        tx.update(grads, tx.init(t.params), t.params, batch=[(t.x, t.y)])


@jax.custom_vjp
def _tanh_by_hand(x):
    return jnp.tanh(x)


_tanh_by_hand.defvjp(lambda x: (jnp.tanh(x), jnp.tanh(x)),
                     lambda t, g: (g * (1 - t**2),))


@pytest.mark.parametrize("custom_vjp, fisher", [(False, "exact"), (True, "exact"),
                                                (False, "empirical")])
def test_adaptive_step_of_a_regression_with_a_covariance(custom_vjp, fisher):
    """The exact model's Fisher is the regression's ``JᵀΣ⁻¹J`` — also when the
    preconditioner is the empirical Fisher —, its forward-mode products from one batched
    call of the model; a model with a ``jax.custom_vjp`` (no forward mode) gets them as
    the transpose of its ``vjp``: the same step as the NumPy solve."""
    sigma2, lam = 4.0, 1e-2
    params, base_fn, x, y, nll = regression_task(sigma2)
    activation = _tanh_by_hand if custom_vjp else jnp.tanh

    def apply_fn(p, x):
        return activation(x @ p["w"] + p["b"])

    loss = lambda p, b: jnp.mean(nll(p, b))  # noqa: E731
    rep = jg.PMatDense if fisher == "empirical" else jg.PMatDiag
    tx = optim.natural_gradient(None, rep, damping=lam, apply_fn=apply_fn,
                                variant="regression", fim_options={"covariance": sigma2},
                                adaptive="momentum", fisher=fisher)
    exact = jg.FIM(base_fn, params, (x, y), jg.PMatDense, variant="regression",
                   covariance=sigma2).to_dense()
    if fisher == "empirical":  # the second moment of the Gaussian NLL's gradients
        per_example = jax.vmap(lambda xi, yi: flat(jax.grad(
            lambda p: nll(p, (xi[None], yi[None]))[0])(params)))(x, y)
        preconditioner = per_example.T @ per_example / x.shape[0]
    else:
        preconditioner = jg.FIM(base_fn, params, (x, y), jg.PMatDiag, variant="regression",
                                covariance=sigma2).to_dense()
    fisher = {jg.PMatDense: exact}
    grads = jax.grad(loss)(params, (x, y))
    updates, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, batch=(x, y)))(
        grads, tx.init(params), params)
    g = flat(grads)
    delta = np.linalg.solve(preconditioner + lam * np.eye(len(g)), g)
    alpha, _ = model_coefficients(g, delta, np.zeros_like(delta), fisher[jg.PMatDense], lam)
    np.testing.assert_allclose(flat(updates), alpha * delta, rtol=1e-9)


@pytest.mark.parametrize("variant, outputs", [
    ("classif_logits", 4), ("classif_logsoftmax", 4), ("classif_binary_logits", 1),
    ("regression", 2), ("segmentation_logits", 3)])
def test_the_adaptive_steps_exact_forms_are_the_fishers(variant, outputs):
    """The quadratic model's forms, from one batched call of the model and the variant's
    output transform (``FisherOutputs.of_batch``), are ``R F Rᵀ`` of every variant's exact
    Fisher (a per-position segmentation model included)."""
    k = jax.random.split(jax.random.PRNGKey(1), 3)
    params = {"w": jax.random.normal(k[0], (3, outputs)), "b": 0.1 * jnp.ones(outputs)}
    if variant == "segmentation_logits":
        x = jax.random.normal(k[1], (5, 4, 3))  # 4 positions of 3 features each

        def apply_fn(p, x):
            return jnp.tanh(x) @ p["w"] + p["b"]
    else:
        x = jax.random.normal(k[1], (5, 3))

        def apply_fn(p, x):
            out = jnp.tanh(x @ p["w"] + p["b"])
            if variant == "classif_logsoftmax":
                return jax.nn.log_softmax(out)
            return out[:, 0] if outputs == 1 else out

    covariance = jnp.array([2.0, 0.5]) if variant == "regression" else None
    F = jg.FIM(apply_fn, params, (x,), jg.PMatDense, variant=variant,
               covariance=covariance).to_dense()
    vectors = [jax.tree_util.tree_map(lambda a, s=s: jax.random.normal(
        jax.random.PRNGKey(s), a.shape), params) for s in (7, 8)]
    forms = optim._exact_fisher_forms(apply_fn, variant, covariance, params, x, vectors)
    R = np.stack([flat(v) for v in vectors])
    np.testing.assert_allclose(forms, R @ F @ R.T, rtol=1e-10)
