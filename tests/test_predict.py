"""Prediction: analytic moments against the exact GP, and Predictive samples against them."""

import jax.numpy as jnp
import numpy as np
import pytest
from jax import random
from numpyro.infer import Predictive

import numpyro_svgp as ns

from . import reference as ref
from .helpers import gaussian_model, initial_params, toy_data

VAR, LS, NOISE = 0.8, 0.7, 0.05


def _fitted_at_optimum(X, y, Z, jitter):
    """Model and guide with q(v) set to the closed-form optimum (computed densely)."""
    model = gaussian_model(Z, VAR, LS, NOISE, jitter=jitter)
    guide = ns.AutoSVGP(model)
    params = initial_params(model, guide, X, y)
    K_zz = ref.rbf(Z, Z, VAR, LS) + jitter * np.eye(len(Z))
    mu, Sigma = ref.optimal_q_u(ref.rbf(X, Z, VAR, LS), K_zz, y, NOISE)
    m, S = ref.whiten(mu, Sigma, K_zz)
    params = dict(
        params, f_whitened_auto_loc=jnp.asarray(m), f_whitened_auto_scale_tril=jnp.asarray(S)
    )
    return model, guide, params


@pytest.mark.slow
def test_z_equals_x_predictions_equal_exact_gp_posterior():
    # An even grid keeps cond(K_xx) near 3e8; clustered random inputs reach 1e13+ and
    # then round-off, not the method, decides the last digits.
    X = np.linspace(-3, 3, 20)[:, None]
    y = np.sin(2 * X[:, 0]) + 0.1 * np.random.default_rng(11).normal(size=20)
    X_test = np.linspace(-3.5, 3.5, 23)[:, None]  # a different X at predict time
    model, guide, params = _fitted_at_optimum(X, y, X, jitter=1e-10)
    mean, var = ns.predict_f(model, guide, params, X_test)
    exact_mean, exact_var = ref.exact_posterior(
        ref.rbf(X, X, VAR, LS), ref.rbf(X_test, X, VAR, LS), np.full(23, VAR), y, NOISE
    )
    np.testing.assert_allclose(mean, exact_mean, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(var, exact_var, rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_predictive_sample_moments_match_analytic_moments():
    X, y = toy_data(60, seed=12)
    Z = np.linspace(-3, 3, 8)[:, None]
    X_test = np.linspace(-4, 4, 15)[:, None]
    model, guide, params = _fitted_at_optimum(X, y, Z, jitter=1e-6)
    mean, var = ns.predict_f(model, guide, params, X_test)
    n = 20000
    samples = Predictive(model, guide=guide, params=params, num_samples=n)(
        random.PRNGKey(0), X_test
    )
    assert samples["f"].shape == (n, 15) and samples["y"].shape == (n, 15)
    f = np.asarray(samples["f"])
    # mean within 4 standard errors, variance within 4 standard errors of a Gaussian variance
    assert np.all(np.abs(f.mean(0) - mean) < 4 * np.sqrt(var / n))
    assert np.all(np.abs(f.var(0) - var) < 4 * var * np.sqrt(2 / (n - 1)))
    # y adds the noise variance
    y_var = np.asarray(samples["y"]).var(0)
    assert np.all(np.abs(y_var - (var + NOISE)) < 4 * (var + NOISE) * np.sqrt(2 / (n - 1)))


def test_predict_f_errors():
    X, y = toy_data(20)
    model, guide, params = _fitted_at_optimum(X, y, X[:5], jitter=1e-6)
    with pytest.raises(KeyError, match="no site 'g_whitened'"):
        ns.predict_f(model, guide, params, X, name="g")


def test_full_covariance_equals_the_dense_svgp_posterior_and_the_exact_gp_at_z_equals_x():
    X, y = toy_data(40, seed=21)
    Z = np.linspace(-3, 3, 9)[:, None]
    X_test = np.linspace(-4, 4, 17)[:, None]
    jitter = 1e-6
    model, guide, params = _fitted_at_optimum(X, y, Z, jitter=jitter)
    mean, cov = ns.predict_f(model, guide, params, X_test, full_cov=True)
    assert cov.shape == (17, 17)
    # dense, unwhitened: K** - K*z Kzz^-1 Kz* + K*z Kzz^-1 Sigma Kzz^-1 Kz*, with the
    # Titsias-optimal q(u) = N(mu, Sigma)
    K_zz = ref.rbf(Z, Z, VAR, LS) + jitter * np.eye(len(Z))
    mu, Sigma = ref.optimal_q_u(ref.rbf(X, Z, VAR, LS), K_zz, y, NOISE)
    K_sz = ref.rbf(X_test, Z, VAR, LS)
    B = np.linalg.solve(K_zz, K_sz.T)
    expected = ref.rbf(X_test, X_test, VAR, LS) - K_sz @ B + B.T @ Sigma @ B
    np.testing.assert_allclose(mean, K_sz @ np.linalg.solve(K_zz, mu), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(cov, expected, rtol=1e-7, atol=1e-9)
    _, var = ns.predict_f(model, guide, params, X_test)
    np.testing.assert_allclose(np.diag(cov), var, rtol=1e-10, atol=1e-12)

    # Z = X: the exact GP's posterior covariance
    Xg = np.linspace(-3, 3, 15)[:, None]
    yg = np.sin(2 * Xg[:, 0])
    model, guide, params = _fitted_at_optimum(Xg, yg, Xg, jitter=1e-10)
    _, cov = ns.predict_f(model, guide, params, X_test, full_cov=True)
    K = ref.rbf(Xg, Xg, VAR, LS) + NOISE * np.eye(15)
    K_sx = ref.rbf(X_test, Xg, VAR, LS)
    exact = ref.rbf(X_test, X_test, VAR, LS) - K_sx @ np.linalg.solve(K, K_sx.T)
    np.testing.assert_allclose(cov, exact, rtol=1e-5, atol=1e-8)


def test_other_latents_are_integrated_with_the_guides_draws():
    """A latent lengthscale with q(l) LogNormal: predict_f's moments are those of the mixture
    over q(l), here by quadrature over l of the dense marginals; num_samples=None gives the
    plug-in at the median."""
    import numpyro
    import numpyro.distributions as dist
    from scipy import integrate, stats

    X, y = toy_data(30, seed=4)
    Z = np.linspace(-2.5, 2.5, 6)[:, None]
    X_test = np.linspace(-3, 3, 7)[:, None]

    def model(X, y=None):
        lengthscale = numpyro.sample("lengthscale", dist.LogNormal(0.0, 1.0))
        f = ns.svgp("f", ns.kernels.RBF(VAR, lengthscale), X, Z, jitter=1e-8)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f, 0.2), obs=y)

    guide = ns.AutoSVGP(model)
    params = initial_params(model, guide, X, y)
    rng = np.random.default_rng(0)
    m, S = rng.normal(size=6), np.tril(0.3 * rng.normal(size=(6, 6))) + 0.5 * np.eye(6)
    params = dict(
        params,
        f_whitened_auto_loc=jnp.asarray(m),
        f_whitened_auto_scale_tril=jnp.asarray(S),
        lengthscale_auto_loc=jnp.asarray(-0.2),
        lengthscale_auto_scale=jnp.asarray(0.2),
    )
    q = stats.lognorm(s=0.2, scale=np.exp(-0.2))

    def moments(ls):
        mean, var, _, _ = ref.whitened_svgp_marginals(X_test, Z, VAR, ls, m, S, 1e-8)
        return mean, var

    def integral(fn):
        return np.array(
            [
                integrate.quad(lambda ls, i=i: fn(ls)[i] * q.pdf(ls), 0.2, 3.0)[0]
                for i in range(len(X_test))
            ]
        )

    want_mean = integral(lambda ls: moments(ls)[0])
    want_var = integral(lambda ls: moments(ls)[1] + moments(ls)[0] ** 2) - want_mean**2
    mean, var = ns.predict_f(model, guide, params, X_test, num_samples=4000)
    np.testing.assert_allclose(mean, want_mean, atol=0.01)
    np.testing.assert_allclose(var, want_var, rtol=0.03, atol=2e-3)
    mean_c, cov = ns.predict_f(model, guide, params, X_test, num_samples=4000, full_cov=True)
    np.testing.assert_allclose(np.diagonal(cov), var, rtol=1e-9)
    np.testing.assert_allclose(mean_c, mean, rtol=1e-12)
    plug_in, plug_var = ns.predict_f(model, guide, params, X_test, num_samples=None)
    np.testing.assert_allclose(plug_in, moments(np.exp(-0.2))[0], rtol=1e-9)
    np.testing.assert_allclose(plug_var, moments(np.exp(-0.2))[1], rtol=1e-9)
    # the plug-in is off the mixture by more than the tolerances above (the test can tell)
    assert np.max(np.abs(want_var - plug_var)) > 0.02
    assert np.max(np.abs(want_mean - plug_in)) > 0.02
