"""The SVGP ELBO against closed forms and independent references (float64).

- Z = X, optimal q(v): the ELBO is the exact GP log marginal likelihood.
- General Z, optimal q(v): the ELBO is the Titsias (2009) collapsed bound; any
  other q gives less.
- SVGP_ELBO equals the Hensman (2013) ELBO written densely (unwhitened) in
  tests/reference.py; TraceMeanField_ELBO's Monte-Carlo estimate averages to it.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax import random
from numpy.polynomial.hermite_e import hermegauss
from numpyro.distributions.kl import kl_divergence
from numpyro.infer import TraceMeanField_ELBO

import numpyro_svgp as ns

from . import reference as ref
from .helpers import gaussian_model, initial_params, toy_data

VAR, LS, NOISE = 0.8, 0.7, 0.05


def _setup(Z, jitter, X, y):
    model = gaussian_model(Z, VAR, LS, NOISE, jitter=jitter)
    guide = ns.AutoSVGP(model)
    params = initial_params(model, guide, X, y)
    return model, guide, params


def _with_q(params, m, S):
    return dict(
        params, f_whitened_auto_loc=jnp.asarray(m), f_whitened_auto_scale_tril=jnp.asarray(S)
    )


def _elbo(params, model, guide, X, y, key=0, elbo=None):
    elbo = ns.SVGP_ELBO() if elbo is None else elbo
    return -float(elbo.loss(random.PRNGKey(key), params, model, guide, X, y))


def _optimal_whitened_q(X, y, Z, jitter):
    K_zz = ref.rbf(Z, Z, VAR, LS) + jitter * np.eye(len(Z))
    K_xz = ref.rbf(X, Z, VAR, LS)
    mu, Sigma = ref.optimal_q_u(K_xz, K_zz, y, NOISE)
    return ref.whiten(mu, Sigma, K_zz), (K_xz, K_zz, mu, Sigma)


# the cheap form (N = 12) runs in the quick suite; the larger one is slow
@pytest.mark.parametrize("n", [12, pytest.param(40, marks=pytest.mark.slow)])
def test_z_equals_x_gives_exact_log_marginal_likelihood(n):
    X, y = toy_data(n, seed=1)
    jitter = 1e-10
    model, guide, params = _setup(X, jitter, X, y)
    (m, S), _ = _optimal_whitened_q(X, y, X, jitter)
    elbo = _elbo(_with_q(params, m, S), model, guide, X, y)
    exact = ref.exact_lml(ref.rbf(X, X, VAR, LS), y, NOISE)
    assert elbo == pytest.approx(exact, rel=1e-6)


# the cheap form (N = 20, M = 5) runs in the quick suite; the larger one is slow
@pytest.mark.parametrize("n, m", [(20, 5), pytest.param(80, 9, marks=pytest.mark.slow)])
def test_optimal_q_gives_titsias_bound_and_other_q_less(n, m):
    X, y = toy_data(n, seed=2)
    Z = np.linspace(-2.5, 2.5, m)[:, None]
    jitter = 1e-6
    model, guide, params = _setup(Z, jitter, X, y)
    (m, S), (K_xz, K_zz, _, _) = _optimal_whitened_q(X, y, Z, jitter)
    titsias = ref.titsias_bound(ref.rbf(X, X, VAR, LS), K_xz, K_zz, y, NOISE)
    best = _elbo(_with_q(params, m, S), model, guide, X, y)
    assert best == pytest.approx(titsias, rel=1e-9)
    # the Titsias bound is below the exact evidence
    assert titsias < ref.exact_lml(ref.rbf(X, X, VAR, LS), y, NOISE)
    rng = np.random.default_rng(0)
    for scale in (1e-3, 1e-1):
        dm = scale * rng.normal(size=m.shape)
        dS = np.tril(scale * rng.normal(size=S.shape))
        assert _elbo(_with_q(params, m + dm, S), model, guide, X, y) < best
        assert _elbo(_with_q(params, m, S + dS), model, guide, X, y) < best


def _random_q(M, seed):
    rng = np.random.default_rng(seed)
    m = rng.normal(size=M)
    S = np.tril(0.3 * rng.normal(size=(M, M)), -1) + np.diag(rng.uniform(0.2, 1.0, size=M))
    return m, S


# N = 50: the matrix-product and the per-point form of the Gaussian data term, with
# M = 7 and M = 30, taken whole or in blocks of rows (numpyro_svgp._blocks): 10 blocks
# of 5, or 12 of 4 and a remainder of 2; chosen through SVGP_ELBO's public options
FORMS = [
    (7, "matrix", None),
    (7, "matrix", 4),
    (7, "per_point", None),
    (7, "per_point", 5),
    (30, "per_point", None),
    (30, "per_point", 5),
    (30, "per_point", 4),
    (30, "matrix", None),
    (30, "matrix", 5),
]


# the quick run (no --run-slow) takes each form whole; the blocked variants are slow
FORMS_QUICK_WHOLE = [
    form if form[2] is None else pytest.param(*form, marks=pytest.mark.slow) for form in FORMS
]


def _form_elbo(form, rows):
    return ns.SVGP_ELBO(gaussian_form=form, block_rows=rows)


@pytest.mark.parametrize("num_inducing,form,rows", FORMS_QUICK_WHOLE)
def test_svgp_elbo_equals_dense_unwhitened_hensman_elbo(num_inducing, form, rows):
    elbo = _form_elbo(form, rows)
    X, y = toy_data(50, seed=3)
    Z = np.random.default_rng(1).uniform(-3, 3, size=(num_inducing, 1))
    jitter = 1e-6
    model, guide, params = _setup(Z, jitter, X, y)
    m, S = _random_q(num_inducing, seed=4)
    K_zz = ref.rbf(Z, Z, VAR, LS) + jitter * np.eye(num_inducing)
    # unwhitened q(u) that corresponds to q(v): u = L v
    L = np.linalg.cholesky(K_zz)
    mu, Sigma = L @ m, L @ S @ S.T @ L.T
    expected = ref.hensman_elbo_unwhitened(
        np.full(len(y), VAR), ref.rbf(X, Z, VAR, LS), K_zz, y, NOISE, mu, Sigma
    )
    got = _elbo(_with_q(params, m, S), model, guide, X, y, elbo=elbo)
    assert got == pytest.approx(expected, rel=1e-8)
    # zero variance: the key does not matter
    assert _elbo(_with_q(params, m, S), model, guide, X, y, key=7, elbo=elbo) == got


@pytest.mark.parametrize("num_inducing,form,rows", FORMS_QUICK_WHOLE)
def test_heteroscedastic_weighted_likelihood_matches_dense_reference(num_inducing, form, rows):
    """Per-point noise and a likelihood scale (as a mini-batch has) in every form."""
    elbo = _form_elbo(form, rows)
    X, y = toy_data(50, seed=5)
    rng = np.random.default_rng(6)
    Z = rng.uniform(-3, 3, size=(num_inducing, 1))
    noise_var = rng.uniform(0.01, 0.2, size=50)
    weight, jitter = 2.5, 1e-6

    def model(X, y=None):
        kernel = ns.kernels.RBF(VAR, LS)
        f = ns.svgp("f", kernel, X, jnp.asarray(Z), jitter=jitter)
        with numpyro.plate("data", X.shape[0]), numpyro.handlers.scale(scale=weight):
            numpyro.sample("y", dist.Normal(f, jnp.sqrt(noise_var)), obs=y)

    guide = ns.AutoSVGP(model)
    params = initial_params(model, guide, X, y)
    m, S = _random_q(num_inducing, seed=7)
    K_zz = ref.rbf(Z, Z, VAR, LS) + jitter * np.eye(num_inducing)
    L = np.linalg.cholesky(K_zz)
    ell, kl = ref.hensman_terms_unwhitened(
        np.full(len(y), VAR),
        ref.rbf(X, Z, VAR, LS),
        K_zz,
        y,
        noise_var,
        L @ m,
        L @ S @ S.T @ L.T,
    )
    got = _elbo(_with_q(params, m, S), model, guide, X, y, elbo=elbo)
    assert got == pytest.approx(weight * np.sum(ell) - kl, rel=1e-9)


@pytest.mark.slow
def test_trace_mean_field_estimate_averages_to_svgp_elbo():
    X, y = toy_data(50, seed=5)
    Z = np.linspace(-3, 3, 6)[:, None]
    model, guide, params = _setup(Z, 1e-6, X, y)
    params = _with_q(params, *_random_q(6, seed=6))
    exact = _elbo(params, model, guide, X, y)

    mc_loss = jax.jit(jax.vmap(lambda k: TraceMeanField_ELBO().loss(k, params, model, guide, X, y)))
    draws = -np.asarray(mc_loss(random.split(random.PRNGKey(1), 4000)))
    se = draws.std(ddof=1) / np.sqrt(len(draws))
    assert se > 0  # it is a genuine Monte-Carlo estimate
    assert abs(draws.mean() - exact) < 4 * se


def test_library_collapsed_references_match_dense_ones():
    X, y = toy_data(60, seed=7)
    Z = np.linspace(-2, 2, 8)[:, None]
    kernel = ns.kernels.RBF(VAR, LS)
    K_zz = ref.rbf(Z, Z, VAR, LS) + 1e-6 * np.eye(8)
    dense = ref.titsias_bound(ref.rbf(X, X, VAR, LS), ref.rbf(X, Z, VAR, LS), K_zz, y, NOISE)
    assert float(ns.titsias_bound(kernel, X, y, Z, NOISE, jitter=1e-6)) == pytest.approx(
        dense, rel=1e-10
    )
    assert float(ns.exact_log_marginal_likelihood(kernel, X, y, NOISE)) == pytest.approx(
        ref.exact_lml(ref.rbf(X, X, VAR, LS), y, NOISE), rel=1e-10
    )


def test_kl_matches_numpyro_and_closed_form():
    m, S = _random_q(5, seed=8)
    got = float(ns.kl(jnp.asarray(m), jnp.asarray(S)))
    numpyro_kl = float(
        kl_divergence(
            dist.MultivariateNormal(m, scale_tril=S),
            dist.MultivariateNormal(np.zeros(5), scale_tril=np.eye(5)),
        )
    )
    cov = S @ S.T
    closed = 0.5 * (np.trace(cov) + m @ m - 5 - np.linalg.slogdet(cov)[1])
    assert got == pytest.approx(numpyro_kl, rel=1e-12)
    assert got == pytest.approx(closed, rel=1e-12)


def test_expected_log_likelihood_matches_gauss_hermite_quadrature():
    nodes, weights = hermegauss(40)
    weights = weights / weights.sum()
    rng = np.random.default_rng(9)
    y, mean = rng.normal(size=4), rng.normal(size=4)
    var, noise_var = rng.uniform(0.1, 2, size=4), rng.uniform(0.05, 1, size=4)
    f = mean[:, None] + np.sqrt(var)[:, None] * nodes[None, :]
    logpdf = -0.5 * (
        np.log(2 * np.pi * noise_var)[:, None] + (y[:, None] - f) ** 2 / noise_var[:, None]
    )
    quadrature = logpdf @ weights
    got = np.asarray(ns.expected_log_likelihood(y, mean, var, noise_var))
    np.testing.assert_allclose(got, quadrature, rtol=1e-12)


def _reference_elbo(theta, X, y, weight, jitter):
    """Dense unwhitened Hensman ELBO (NumPy) at whitened q(v) = N(m, S Sᵀ)."""
    Z = theta["Z"]
    K_zz = ref.rbf(Z, Z, theta["variance"], theta["lengthscale"]) + jitter * np.eye(len(Z))
    L = np.linalg.cholesky(K_zz)
    S = np.tril(theta["S"])
    ell, kl = ref.hensman_terms_unwhitened(
        np.full(len(y), theta["variance"]),
        ref.rbf(X, Z, theta["variance"], theta["lengthscale"]),
        K_zz,
        y,
        theta["noise_var"],
        L @ theta["m"],
        L @ S @ S.T @ L.T,
    )
    return weight * np.sum(ell) - kl


@pytest.mark.parametrize("num_inducing,form,rows", FORMS[:3] + FORMS[4:5] + FORMS[6:])
@pytest.mark.parametrize("per_point_noise", [pytest.param(False, marks=pytest.mark.slow), True])
def test_gradients_equal_finite_differences_of_dense_reference(
    num_inducing, form, rows, per_point_noise
):
    """Every derivative the optimiser sees (variance, ARD lengthscales, Z, noise,
    m, S) against central differences of the NumPy reference ELBO."""
    form_elbo = _form_elbo(form, rows)
    rng = np.random.default_rng(8)
    # jitter 1e-4 keeps K_zz well enough conditioned for central differences of the
    # reference to be accurate to ~1e-8 of the largest derivative
    N, jitter, weight = 50, 1e-4, 2.5
    X = rng.uniform(-2, 2, size=(N, 2))
    y = np.sin(2 * X[:, 0]) * np.cos(X[:, 1]) + 0.1 * rng.normal(size=N)
    m, S = _random_q(num_inducing, seed=9)
    theta = {
        "variance": np.asarray(0.9),
        "lengthscale": np.array([0.8, 1.3]),
        "Z": rng.uniform(-2, 2, size=(num_inducing, 2)),
        "noise_var": rng.uniform(0.05, 0.2, size=N) if per_point_noise else np.asarray(0.1),
        "m": m,
        "S": S,
    }

    def model(X, y=None):
        kernel = ns.kernels.RBF(
            numpyro.param("variance", 1.0), numpyro.param("lengthscale", jnp.ones(2))
        )
        f = ns.svgp("f", kernel, X, numpyro.param("Z", theta["Z"]), jitter=jitter)
        noise_var = numpyro.param("noise_var", theta["noise_var"])
        with numpyro.plate("data", X.shape[0]), numpyro.handlers.scale(scale=weight):
            numpyro.sample("y", dist.Normal(f, jnp.sqrt(noise_var)), obs=y)

    guide = ns.AutoSVGP(model)
    params = initial_params(model, guide, X, y)

    def elbo(th):
        p = dict(
            params,
            variance=th["variance"],
            lengthscale=th["lengthscale"],
            Z=th["Z"],
            noise_var=th["noise_var"],
        )
        p = _with_q(p, th["m"], th["S"])
        return -form_elbo.loss(random.PRNGKey(0), p, model, guide, jnp.asarray(X), jnp.asarray(y))

    value, grads = jax.value_and_grad(elbo)(jax.tree.map(jnp.asarray, theta))
    assert float(value) == pytest.approx(_reference_elbo(theta, X, y, weight, jitter), rel=1e-9)
    h = 1e-5
    for name, x in theta.items():
        expected = np.zeros(np.shape(x))
        for index in np.ndindex(*np.shape(x)):
            if name == "S" and index[1] > index[0]:
                continue  # the upper triangle of S is not used: its derivative is 0
            up, down = dict(theta), dict(theta)
            up[name] = np.array(x, dtype=float, copy=True)
            down[name] = np.array(x, dtype=float, copy=True)
            up[name][index] += h
            down[name][index] -= h
            expected[index] = (
                _reference_elbo(up, X, y, weight, jitter)
                - _reference_elbo(down, X, y, weight, jitter)
            ) / (2 * h)
        got = np.asarray(grads[name])
        scale = np.max(np.abs(expected))
        assert scale > 0
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7 * scale, err_msg=name)


class _LowDiagonal(ns.kernels.Kernel):
    """An RBF whose diag() is set below a_n^T a_n at every point (a broken kernel, on
    purpose): the residual variance k_nn - a_n^T a_n is negative everywhere."""

    base: ns.kernels.Kernel
    low: jax.Array

    def evaluate(self, x1, x2):
        return self.base.evaluate(x1, x2)

    def _matrix(self, X1, X2, symmetric):
        return self.base._matrix(X1, X2, symmetric)

    def diag(self, X):
        return self.low


def test_matrix_form_clamps_a_negative_residual_variance_like_the_per_point_form():
    # sum_n (k_nn - a_n^T a_n) >= 0, but the matrix-product form computes it as a
    # difference of two sums, and round-off made it negative in float64 with a kernel
    # variance of 1e6; a shrinking noise variance then bought an unbounded spurious
    # gain. Here every point's prior variance is set below a_n^T a_n: the per-point
    # form clamps each term at 0, and the matrix form must give the same bound.
    X, y = toy_data(40, seed=4)
    base = ns.kernels.RBF(VAR, LS)
    A = ns.whitened_conditional(base, X, X[::5], jitter=1e-6).projection()
    low = 0.5 * jnp.sum(jnp.square(A), axis=1)
    conditional = ns.whitened_conditional(_LowDiagonal(base, low), X, X[::5], jitter=1e-6)
    m, S = _random_q(8, seed=3)
    matrix_form = ns.gaussian_expected_log_likelihood(
        conditional, m, S, jnp.asarray(y), NOISE, form="matrix"
    )
    mean = conditional.projection() @ m
    var = jnp.sum(jnp.square(conditional.projection() @ S), axis=1)  # residual clamped at 0
    per_point = jnp.sum(ns.expected_log_likelihood(jnp.asarray(y), mean, var, NOISE))
    assert float(matrix_form) == pytest.approx(float(per_point), rel=1e-10)
    assert float(
        ns.gaussian_expected_log_likelihood(
            conditional, m, S, jnp.asarray(y), NOISE, form="per_point"
        )
    ) == pytest.approx(float(per_point), rel=1e-10)


@pytest.mark.parametrize(("variance", "lengthscale"), [(1e4, 5.0), (1e5, 5.0), (1.0, 0.5)])
def test_matrix_form_round_off_is_warned_of_where_K_uu_is_ill_conditioned(variance, lengthscale):
    """Unnormalised data (kernel variances of 1e4-1e5, long lengthscales): the matrix form's
    round-off grows with the condition number of K_uu and passes 0.1 nats there, so the
    default form warns and names the per-point form, which stays accurate. Reference: the
    whitened marginals written in NumPy with triangular solves only (round-off of the order
    of the condition number of L)."""
    from scipy.linalg import solve_triangular

    rng = np.random.default_rng(7)
    n, m = 200, 40
    X = np.linspace(-3, 3, n)[:, None]
    Z = np.linspace(-3, 3, m)[:, None]
    scale = np.sqrt(variance)
    y = scale * (np.sin(2 * X[:, 0]) + 0.2 * rng.normal(size=n))
    noise_var = (0.2 * scale) ** 2
    loc = rng.normal(size=m)
    scale_tril = np.tril(0.05 * rng.normal(size=(m, m)), -1) + 0.3 * np.eye(m)
    conditional = ns.whitened_conditional(ns.kernels.RBF(variance, lengthscale), X, Z)
    K_zz = ref.rbf(Z, Z, variance, lengthscale) + float(conditional.jitter) * np.eye(m)
    A = solve_triangular(
        np.linalg.cholesky(K_zz), ref.rbf(Z, X, variance, lengthscale), lower=True
    ).T
    mean = A @ loc
    var = variance - np.sum(A**2, axis=1) + np.sum((A @ scale_tril) ** 2, axis=1)
    expected = np.sum(-0.5 * (np.log(2 * np.pi * noise_var) + ((y - mean) ** 2 + var) / noise_var))

    def term(form):
        return float(
            ns.gaussian_expected_log_likelihood(
                conditional,
                jnp.asarray(loc),
                jnp.asarray(scale_tril),
                jnp.asarray(y),
                noise_var,
                form=form,
                block_rows=None,
            )
        )

    # the per-point form carries only the term's own sensitivity to round-off in K_uu
    # (about 1e-7 relative at these condition numbers)
    assert abs(term("per_point") - expected) <= 1e-2
    if variance > 1.0:
        # the matrix form is off by more than the threshold, and the default says so
        assert abs(term("matrix") - expected) > ns.MATRIX_FORM_ROUNDOFF
        with pytest.warns(RuntimeWarning, match="gaussian_form='per_point'"):
            term("auto")
    else:
        # a well-conditioned K_uu: no warning, and the matrix form is as accurate
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            value = term("auto")
        assert abs(value - expected) <= 1e-9 * abs(expected)
