"""Natural gradients for q(v), against closed forms: one full step on a Gaussian likelihood
reaches the optimal q; a step of size gamma < 1 moves the natural parameters a fraction
gamma of the way there; on a Bernoulli site a step is the Fisher-preconditioned gradient
(tests/reference.py's natural_step) of the ELBO written densely in NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from jax import random
from numpy.polynomial.hermite_e import hermegauss
from numpyro.infer import SVI
from scipy.special import expit

import numpyro_svgp as ns

from . import reference as ref
from .helpers import gaussian_model, initial_params, toy_data
from .test_minibatch import B, N, in_model

VAR, LS, NOISE = 0.8, 0.7, 0.05
X, Y = toy_data(80, seed=41)
Z0 = np.linspace(-3, 3, 9)[:, None]


def _optimum(jitter):
    K_zz = ref.rbf(Z0, Z0, VAR, LS) + jitter * np.eye(len(Z0))
    mu, Sigma = ref.optimal_q_u(ref.rbf(X, Z0, VAR, LS), K_zz, Y, NOISE)
    return ref.whiten(mu, Sigma, K_zz)


# one compiled step at N = 80, M = 9 runs in seconds: both starts are in the quick suite
@pytest.mark.parametrize("start", ["prior", "random"])
def test_one_natural_step_of_size_one_reaches_the_optimal_q(start):
    model = gaussian_model(Z0, VAR, LS, NOISE, jitter=1e-6)
    guide = ns.AutoSVGP(model)
    # the other params must not move: set_to_zero
    svi = SVI(
        model,
        guide,
        ns.natural_gradient(optax.set_to_zero(), step_size=1.0, guide=guide),
        ns.SVGP_ELBO(),
    )
    state = svi.init(random.PRNGKey(0), X, Y)
    if start == "random":
        rng = np.random.default_rng(1)
        raw = np.tril(0.3 * rng.normal(size=(9, 9))) + np.diag(rng.uniform(0.3, 1.0, size=9))
        raw[2, 2] *= -1  # a negative diagonal entry, as AutoSVGP allows
        step, (unconstrained, opt_state) = state.optim_state  # numpyro's optax state
        unconstrained = {
            **unconstrained,
            "f_whitened_auto_loc": jnp.asarray(rng.normal(size=9)),
            "f_whitened_auto_scale_tril": jnp.asarray(raw),
        }
        state = state._replace(optim_state=(step, (unconstrained, opt_state)))
    state, _ = jax.jit(svi.update)(state, X, Y)  # one program: compiles in a fraction
    params = svi.get_params(state)
    m_opt, S_opt = _optimum(1e-6)
    np.testing.assert_allclose(params["f_whitened_auto_loc"], m_opt, rtol=1e-6, atol=1e-8)
    S = np.asarray(params["f_whitened_auto_scale_tril"])
    np.testing.assert_allclose(S @ S.T, S_opt @ S_opt.T, rtol=1e-6, atol=1e-10)
    for name in ("variance", "lengthscale", "noise_var", "Z"):
        assert np.all(
            np.asarray(params[name])
            == np.asarray(svi.get_params(svi.init(random.PRNGKey(0), X, Y))[name])
        )
    # and at the optimum the ELBO is the Titsias bound
    bound = float(ns.titsias_bound(ns.kernels.RBF(VAR, LS), X, Y, Z0, NOISE, jitter=1e-6))
    assert -float(
        ns.SVGP_ELBO().loss(random.PRNGKey(0), params, model, guide, X, Y)
    ) == pytest.approx(bound, rel=1e-8)


@pytest.mark.slow
def test_natural_gradient_with_adam_on_minibatches_fits():
    import jax

    Xm, Ym = (jnp.asarray(a) for a in toy_data(N, seed=31))
    guide = ns.AutoSVGP(in_model)
    # decayed step sizes let the mini-batch noise settle
    optimizer = ns.natural_gradient(
        optax.adam(optax.cosine_decay_schedule(1e-2, 2000, 0.05)),
        step_size=optax.cosine_decay_schedule(0.1, 2000, 0.05),
        guide=guide,
    )
    svi = SVI(in_model, guide, optimizer, ns.SVGP_ELBO())
    result = ns.train(svi, random.PRNGKey(0), 2000, Xm, Ym, batch_size=B, progress_bar=False)
    assert result.num_skipped == 0
    p = result.params
    full = -float(ns.SVGP_ELBO().loss(random.PRNGKey(0), p, in_model, guide, Xm, Ym))
    bound = float(
        ns.titsias_bound(
            ns.kernels.RBF(p["variance"], p["lengthscale"]), Xm, Ym, p["Z"], p["noise_var"]
        )
    )
    assert full <= bound + 1e-6 and bound - full < 1.0
    assert jax.tree.all(jax.tree.map(lambda v: bool(jnp.all(jnp.isfinite(v))), p))


@pytest.mark.slow
def test_one_natural_step_reaches_the_optimal_q_above_the_solve_block():
    # M = 150 is above the order up to which LAPACK factorises and solves whole, so the
    # natural step's Cholesky factors, inverses and Cholesky derivative go by blocks
    rng = np.random.default_rng(17)
    X2 = rng.uniform(-3, 3, size=(300, 2))
    Y2 = np.sin(X2[:, 0]) * np.cos(X2[:, 1]) + 0.2 * rng.normal(size=300)
    Z2 = rng.uniform(-3, 3, size=(150, 2))
    # a short lengthscale keeps K_zz well conditioned, so the reference is exact enough
    variance, lengthscale, noise = 0.8, 0.4, 0.05
    model = gaussian_model(Z2, variance, lengthscale, noise, jitter=1e-6)
    guide = ns.AutoSVGP(model)
    optimizer = ns.natural_gradient(optax.set_to_zero(), step_size=1.0, guide=guide)
    svi = SVI(model, guide, optimizer, ns.SVGP_ELBO())
    state, _ = jax.jit(svi.update)(svi.init(random.PRNGKey(0), X2, Y2), X2, Y2)
    params = svi.get_params(state)
    K_zz = ref.rbf(Z2, Z2, variance, lengthscale) + 1e-6 * np.eye(150)
    mu, Sigma = ref.optimal_q_u(ref.rbf(X2, Z2, variance, lengthscale), K_zz, Y2, noise)
    m_opt, S_opt = ref.whiten(mu, Sigma, K_zz)
    np.testing.assert_allclose(params["f_whitened_auto_loc"], m_opt, rtol=1e-6, atol=1e-7)
    S = np.asarray(params["f_whitened_auto_scale_tril"])
    np.testing.assert_allclose(S @ S.T, S_opt @ S_opt.T, rtol=1e-6, atol=1e-8)
    bound = ns.titsias_bound(ns.kernels.RBF(variance, lengthscale), X2, Y2, Z2, noise, jitter=1e-6)
    elbo = -ns.SVGP_ELBO().loss(random.PRNGKey(0), params, model, guide, X2, Y2)
    assert float(elbo) == pytest.approx(float(bound), rel=1e-8)


def test_one_natural_step_in_float32_reaches_the_optimal_q():
    # float32 smoke test (one step, not a fit: quick, so not marked slow): the natural
    # step computes in float32, gives a lower factor with a positive diagonal, and lands on
    # the float64 optimum to within float32 round-off
    f32 = np.float32
    jitter = 1e-4
    model = gaussian_model(Z0.astype(f32), f32(VAR), f32(LS), f32(NOISE), jitter=jitter)
    guide = ns.AutoSVGP(model)
    optimizer = ns.natural_gradient(optax.set_to_zero(), step_size=1.0, guide=guide)
    svi = SVI(model, guide, optimizer, ns.SVGP_ELBO())
    X32, Y32 = X.astype(f32), Y.astype(f32)
    state = svi.init(random.PRNGKey(0), X32, Y32)
    # the updates themselves (SVI casts the new params back to their dtype)
    start = svi.get_params(state)
    grads = jax.tree.map(lambda a: 1e-3 * jnp.ones_like(a), start)
    updates, _ = optimizer.update(grads, optimizer.init(start), start)
    for name in ("f_whitened_auto_loc", "f_whitened_auto_scale_tril"):
        assert updates[name].dtype == np.float32, name
    state, _ = jax.jit(svi.update)(state, X32, Y32)
    params = svi.get_params(state)
    m, S = (np.asarray(params[k]) for k in ("f_whitened_auto_loc", "f_whitened_auto_scale_tril"))
    assert np.all(np.triu(S, 1) == 0)
    assert np.all(np.diag(S) > 0)
    m_opt, S_opt = _optimum(jitter)
    C, C_opt = S.astype(np.float64) @ S.T.astype(np.float64), S_opt @ S_opt.T
    tol = 100 * np.finfo(np.float32).eps
    np.testing.assert_allclose(m, m_opt, rtol=tol, atol=tol * np.abs(m_opt).max())
    np.testing.assert_allclose(C, C_opt, rtol=tol, atol=tol * np.abs(C_opt).max())


def _one_step_from(model, guide, step_size, m0, raw0, *args, elbo=None):
    """The params after one natural step of size ``step_size`` from q(v) = (m0, raw0); the
    other params do not move (set_to_zero)."""
    optimizer = ns.natural_gradient(optax.set_to_zero(), step_size=step_size, guide=guide)
    svi = SVI(model, guide, optimizer, elbo or ns.SVGP_ELBO())
    state = svi.init(random.PRNGKey(0), *args)
    step, (unconstrained, opt_state) = state.optim_state  # numpyro's optax state
    unconstrained = {
        **unconstrained,
        "f_whitened_auto_loc": jnp.asarray(m0),
        "f_whitened_auto_scale_tril": jnp.asarray(raw0),
    }
    state = state._replace(optim_state=(step, (unconstrained, opt_state)))
    state, _ = jax.jit(svi.update)(state, *args)
    params = svi.get_params(state)
    S = np.asarray(params["f_whitened_auto_scale_tril"])
    return np.asarray(params["f_whitened_auto_loc"]), S @ S.T


def _random_start(M, seed):
    rng = np.random.default_rng(seed)
    raw = np.tril(0.3 * rng.normal(size=(M, M)), -1) + np.diag(rng.uniform(0.3, 1.0, size=M))
    return rng.normal(size=M), raw


def test_a_smaller_natural_step_moves_the_natural_parameters_part_of_the_way():
    """On a Gaussian likelihood the natural gradient in theta = (Sigma^-1 m, -Sigma^-1 / 2)
    is theta_opt - theta, so a step of size gamma gives (1 - gamma) theta + gamma theta_opt,
    with theta_opt the optimal q's (Titsias)."""
    gamma = 0.3
    model = gaussian_model(Z0, VAR, LS, NOISE, jitter=1e-6)
    m0, raw0 = _random_start(len(Z0), 2)
    m, C = _one_step_from(model, ns.AutoSVGP(model), gamma, m0, raw0, X, Y)
    m_opt, S_opt = _optimum(1e-6)
    P0, P_opt = np.linalg.inv(raw0 @ raw0.T), np.linalg.inv(S_opt @ S_opt.T)
    P = (1 - gamma) * P0 + gamma * P_opt
    C_ref = np.linalg.inv(P)
    m_ref = C_ref @ ((1 - gamma) * P0 @ m0 + gamma * P_opt @ m_opt)
    np.testing.assert_allclose(m, m_ref, rtol=1e-6, atol=1e-8 * np.abs(m_ref).max())
    np.testing.assert_allclose(C, C_ref, rtol=1e-6, atol=1e-8 * np.abs(C_ref).max())
    # the reference's general step agrees with this closed form (a check of the reference)
    K_zz = ref.rbf(Z0, Z0, VAR, LS) + 1e-6 * np.eye(len(Z0))
    A = np.linalg.solve(np.linalg.cholesky(K_zz), ref.rbf(Z0, X, VAR, LS)).T
    Sigma0 = raw0 @ raw0.T
    dloss_dm = -(A.T @ (Y - A @ m0) / NOISE - m0)
    dloss_dSigma = 0.5 * A.T @ A / NOISE + 0.5 * (np.eye(len(Z0)) - np.linalg.inv(Sigma0))
    m_gen, C_gen = ref.natural_step(m0, Sigma0, dloss_dm, dloss_dSigma, gamma)
    np.testing.assert_allclose(m_gen, m_ref, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(C_gen, C_ref, rtol=1e-8, atol=1e-10)


def test_a_natural_step_on_a_bernoulli_site_is_the_fisher_preconditioned_gradient():
    """The ELBO of a logistic (Bernoulli) likelihood written densely in NumPy: q(f_n) =
    N(a_n^T m, k_nn - a_n^T a_n + a_n^T Sigma a_n) with A = (L^-1 K_zx)^T, and by
    Gauss-Hermite (80 points), d E[log p] / d mean = E[y - s(f)] and d / d var =
    E[-s(f) (1 - s(f))] / 2; the KL's gradients are m and (I - Sigma^-1) / 2. One step of
    size 0.5 from a random q is tests/reference.py's natural_step on these gradients."""
    rng = np.random.default_rng(23)
    n, M = 25, 6
    Xb = np.sort(rng.uniform(-3, 3, size=(n, 1)), axis=0)
    yb = (rng.uniform(size=n) < expit(2 * np.sin(2 * Xb[:, 0]))).astype(float)
    Zb = np.linspace(-2.5, 2.5, M)[:, None]

    def model(X, y=None):
        f = ns.svgp("f", ns.kernels.RBF(VAR, LS), X, jnp.asarray(Zb), jitter=1e-6)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Bernoulli(logits=f), obs=y)

    m0, raw0 = _random_start(M, 4)
    guide = ns.AutoSVGP(model)
    elbo = ns.SVGP_ELBO(quadrature_points=40)
    m, C = _one_step_from(model, guide, 0.5, m0, raw0, Xb, yb, elbo=elbo)
    assert ns.integration_report(model, guide, initial_params(model, guide, Xb, yb), Xb, yb)["y"][
        "integration"
    ].startswith("quadrature")

    K_zz = ref.rbf(Zb, Zb, VAR, LS) + 1e-6 * np.eye(M)
    A = np.linalg.solve(np.linalg.cholesky(K_zz), ref.rbf(Zb, Xb, VAR, LS)).T
    Sigma0 = raw0 @ raw0.T
    mean = A @ m0
    var = VAR - np.sum(A**2, axis=1) + np.sum((A @ Sigma0) * A, axis=1)
    nodes, weights = hermegauss(80)
    weights = weights / np.sqrt(2 * np.pi)
    s = expit(mean[:, None] + np.sqrt(var)[:, None] * nodes)
    d_mean = (yb[:, None] - s) @ weights
    d_var = 0.5 * (-s * (1 - s)) @ weights
    dloss_dm = -(A.T @ d_mean - m0)
    dloss_dSigma = -(A.T @ (d_var[:, None] * A) - 0.5 * (np.eye(M) - np.linalg.inv(Sigma0)))
    m_ref, C_ref = ref.natural_step(m0, Sigma0, dloss_dm, dloss_dSigma, 0.5)
    np.testing.assert_allclose(m, m_ref, rtol=1e-7, atol=1e-9 * np.abs(m_ref).max())
    np.testing.assert_allclose(C, C_ref, rtol=1e-7, atol=1e-9 * np.abs(C_ref).max())
