"""ns.pathwise: joint posterior function draws against the analytic joint posterior.

The reference is ``ns.predict_f(..., full_cov=True)`` (itself checked against the dense
SVGP posterior in test_predict.py), with q(v) set to the closed-form optimum, computed
densely here in NumPy. A sample covariance of S draws errs by
E||C_hat - C||_F^2 = (E||f - mu||^4 - ||C||_F^2) / S, which is (||C||_F^2 + tr(C)^2) / S
for Gaussian draws. The random features' frequencies are drawn afresh for every draw,
so C_hat is unbiased for any number of features; the features only make the draws
non-Gaussian (they are Gaussian given the frequencies), which raises E||f - mu||^4 above
its Gaussian value tr(C)^2 + 2 ||C||_F^2. The tests measure that ratio from the draws,
bound it, and allow for it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax import random
from numpyro.handlers import seed, trace
from numpyro.infer import Predictive
from numpyro.infer.util import log_density

import numpyro_svgp as ns
from numpyro_svgp import _pathwise

from . import reference as ref
from .helpers import initial_params, toy_data

VAR, LS, NOISE, JITTER = 0.8, 0.7, 0.04, 1e-6
Z = np.linspace(-3, 3, 8)[:, None]
X_TEST = np.linspace(-4, 4, 50)[:, None]


def _matern52(X1, X2, variance, lengthscale):
    r = np.abs(X1[:, None, 0] - X2[None, :, 0]) / lengthscale
    return variance * (1 + np.sqrt(5) * r + 5 / 3 * r**2) * np.exp(-np.sqrt(5) * r)


def _periodic(X1, X2, variance, lengthscale, period):
    s = np.sin(np.pi * (X1[:, None, 0] - X2[None, :, 0]) / period)
    return variance * np.exp(-2 * s**2 / lengthscale**2)


KERNELS = {
    "rbf": (lambda: ns.kernels.RBF(VAR, LS), lambda A, B: ref.rbf(A, B, VAR, LS)),
    "matern52": (lambda: ns.kernels.Matern52(VAR, LS), lambda A, B: _matern52(A, B, VAR, LS)),
    "periodic": (
        lambda: ns.kernels.Periodic(VAR, LS, 2.5),
        lambda A, B: _periodic(A, B, VAR, LS, 2.5),
    ),
}


@functools.cache
def _fitted(kind):
    """A 1-D model (N = 40, M = 8) with q(v) at the closed-form optimum (Titsias 2009)."""
    make_kernel, dense = KERNELS[kind]

    def model(X, y=None):
        f = ns.svgp("f", make_kernel(), X, jnp.asarray(Z), jitter=JITTER)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f, np.sqrt(NOISE)), obs=y)

    X, y = toy_data(40, seed=3)
    guide = ns.AutoSVGP(model)
    params = initial_params(model, guide, X, y)
    K_zz = dense(Z, Z) + JITTER * np.eye(len(Z))
    mu, Sigma = ref.optimal_q_u(dense(X, Z), K_zz, y, NOISE)
    m, S = ref.whiten(mu, Sigma, K_zz)
    params = dict(
        params, f_whitened_auto_loc=jnp.asarray(m), f_whitened_auto_scale_tril=jnp.asarray(S)
    )
    return model, guide, params


def _sampler(model, guide, params, num_samples, **pathwise):
    """``(seed, X) -> f``: ``num_samples`` pathwise draws, one compiled program per shape."""
    handled = ns.pathwise(model, **pathwise)
    predictive = jax.jit(Predictive(handled, guide=guide, params=params, num_samples=num_samples))
    return lambda seed_, X: np.asarray(predictive(random.PRNGKey(seed_), X)["f"])


def _draws(model, guide, params, X, num_samples, seed_=1, **pathwise):
    return _sampler(model, guide, params, num_samples, **pathwise)(seed_, X)


def _errors(f, mean, C):
    """The draws' ``(||C_hat - C||_F, fourth-moment ratio, ||mean_hat - mean||)``; the
    ratio is E||f - mu||^4 over its Gaussian value tr(C)^2 + 2 ||C||_F^2."""
    S = f.shape[0]
    f = f.reshape(S, -1)
    q = np.sum(np.square(f - f.mean(0)), axis=1)
    kurtosis = np.mean(q**2) / (np.trace(C) ** 2 + 2 * np.linalg.norm(C) ** 2)
    return np.linalg.norm(np.cov(f.T) - C), kurtosis, np.linalg.norm(f.mean(0) - np.ravel(mean))


def _expected_covariance_error(C, S, kurtosis=1.0):
    """sqrt(E||C_hat - C||_F^2) = sqrt((E||f - mu||^4 - ||C||_F^2) / S) (to O(1/S^2)), with
    E||f - mu||^4 = kurtosis (tr(C)^2 + 2 ||C||_F^2); for Gaussian draws (kurtosis 1)
    sqrt((||C||_F^2 + tr(C)^2) / S)."""
    fourth = kurtosis * (np.trace(C) ** 2 + 2 * np.linalg.norm(C) ** 2)
    return np.sqrt((fourth - np.linalg.norm(C) ** 2) / S)


def _expected_mean_error(C, S):
    """sqrt(E||mean_hat - mu||^2) = sqrt(tr(C) / S), whatever the draws' law."""
    return np.sqrt(np.trace(C) / S)


# 1024 features: the fourth-moment ratio measured with 20000 draws is 1.01-1.03 (RBF and
# Matern52), and 1.02 +- 0.05 over blocks of 1000-2000 draws; 1.3 bounds it by 6 sd
KURTOSIS_BOUND = 1.3


def _check_joint(f, mean, C):
    """The draws' mean and covariance against (mean, C), allowing for random features."""
    S = f.shape[0]
    error, kurtosis, mean_error = _errors(f, mean, C)
    assert kurtosis < KURTOSIS_BOUND
    assert error < 3 * _expected_covariance_error(C, S, KURTOSIS_BOUND)
    assert mean_error < 3 * _expected_mean_error(C, S)


@pytest.mark.slow
def test_rbf_draws_have_the_svgp_joint_posterior():
    model, guide, params = _fitted("rbf")
    mean, C = (np.asarray(a) for a in ns.predict_f(model, guide, params, X_TEST, full_cov=True))
    f = _draws(model, guide, params, X_TEST, 2000, num_features=1024)
    assert f.shape == (2000, 50)
    # measured: covariance error 0.120 (Gaussian size 0.138), ratio 1.06, mean error 0.070
    # (size 0.052)
    _check_joint(f, mean, C)

    # with 2 frequencies the draws are far from Gaussian, yet (the frequencies being
    # drawn afresh per draw) the covariance is still unbiased: the error is within the
    # Monte-Carlo size that the draws' measured fourth moment gives
    f = _draws(model, guide, params, X_TEST, 2000, num_features=4)
    error, kurtosis, _ = _errors(f, mean, C)
    assert kurtosis > 1.5  # measured 2.8
    assert error < 3 * _expected_covariance_error(C, 2000, kurtosis)  # measured 0.30 / 0.24


@pytest.mark.slow
def test_matern52_draws_have_the_svgp_joint_posterior():
    model, guide, params = _fitted("matern52")
    mean, C = (np.asarray(a) for a in ns.predict_f(model, guide, params, X_TEST, full_cov=True))
    # measured: covariance error 0.40 (Gaussian size 0.28), ratio 1.15
    _check_joint(_draws(model, guide, params, X_TEST, 1000, num_features=1024), mean, C)


def test_a_draw_is_one_function_of_its_key():
    model, guide, params = _fitted("rbf")
    X1 = np.linspace(-3.5, 3.5, 13)[:, None]
    X2 = np.array([[-5.0], [0.123], [2.0], [6.0]])
    draw = _sampler(model, guide, params, 4, num_features=256)
    f1 = draw(1, X1)
    np.testing.assert_array_equal(f1, draw(1, X1))
    # X1 among other inputs, after them: the same function at X1
    both = draw(1, np.concatenate([X2, X1]))
    np.testing.assert_allclose(both[:, len(X2) :], f1, rtol=1e-12, atol=1e-12)
    # another key, another function
    assert np.all(np.abs(draw(2, X1) - f1) > 1e-6)


def test_sample_paths_have_the_posterior_increments():
    # on a fine grid Var(f(x_{i+1}) - f(x_i)) is tiny for the posterior; the default
    # draws (independent noise per input) have about twice the conditional variance
    model, guide, params = _fitted("rbf")
    grid = np.linspace(-3.5, 3.5, 141)[:, None]
    _, C = (np.asarray(a) for a in ns.predict_f(model, guide, params, grid, full_cov=True))
    d = np.diag(C)
    expected = d[1:] + d[:-1] - 2 * np.diag(C, 1)
    S = 1000
    f = _draws(model, guide, params, grid, S, num_features=1024)
    # the ratio is the mean over draws of each draw's squared centred increments (scaled):
    # its standard error is their standard deviation over sqrt(S), estimated from the draws
    dev = np.diff(f, axis=1) - np.diff(f, axis=1).mean(0)
    per_draw = np.mean(dev**2, axis=1) * S / (S - 1) / np.mean(expected)
    ratio, se = per_draw.mean(), per_draw.std(ddof=1) / np.sqrt(S)
    assert abs(ratio - 1) < 5 * se, (ratio, se)
    independent = np.asarray(
        Predictive(model, guide=guide, params=params, num_samples=S)(random.PRNGKey(1), grid)["f"]
    )
    rough = np.mean(np.var(np.diff(independent, axis=1), axis=0, ddof=1)) / np.mean(expected)
    assert rough > 20 * ratio


@pytest.mark.slow
def test_kernel_without_random_features_is_drawn_exactly_with_a_warning():
    model, guide, params = _fitted("periodic")
    mean, C = (np.asarray(a) for a in ns.predict_f(model, guide, params, X_TEST, full_cov=True))
    with pytest.warns(UserWarning, match="Periodic") as record:
        f = _draws(model, guide, params, X_TEST, 1500)
    assert record[0].filename == __file__  # the model's svgp call
    error, _, mean_error = _errors(f, mean, C)
    assert error < 3 * _expected_covariance_error(C, 1500)  # exact, Gaussian: 0.077 / 0.099
    assert mean_error < 3 * _expected_mean_error(C, 1500)
    # too many inputs for an N x N Cholesky factor: refused, saying why
    X_many = np.linspace(-3, 3, 60)[:, None]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_pathwise, "MAX_EXACT_POINTS", 50)
        with pytest.raises(ValueError, match="MAX_EXACT_POINTS = 50"):
            _draws(model, guide, params, X_many, 2)


def _family_params(model, guide, X, rng):
    params = initial_params(model, guide, X)
    M = len(Z)
    loc = 0.5 * rng.normal(size=(2, 1, M))
    scale = np.tril(0.3 * rng.normal(size=(2, 1, M, M)), -1) + 0.4 * np.eye(M)
    return dict(
        params, f_whitened_auto_loc=jnp.asarray(loc), f_whitened_auto_scale_tril=jnp.asarray(scale)
    )


@pytest.mark.slow
def test_family_and_mixed_outputs():
    # two GPs of different lengthscales in a plate, then mixed into three outputs
    W = np.array([[1.0, 0.0], [0.6, 0.8], [-0.5, 1.2]])
    lengthscale = jnp.array([[0.5], [1.2]])

    def model(X, mixing=None):
        with numpyro.plate("latent", 2, dim=-2):
            ns.svgp(
                "f",
                ns.kernels.RBF(VAR, lengthscale),
                X,
                jnp.asarray(Z),
                jitter=JITTER,
                mixing=mixing,
            )

    X = np.linspace(-4, 4, 15)[:, None]
    guide = ns.AutoSVGP(model)
    params = _family_params(model, guide, X, np.random.default_rng(5))
    mean, C = (np.asarray(a) for a in ns.predict_f(model, guide, params, X, full_cov=True))
    assert C.shape == (2, 15, 15)

    S = 2000
    f = _draws(model, guide, params, X, S, num_features=1024)
    assert f.shape == (S, 2, 15)
    # the two GPs are independent: a block-diagonal joint covariance
    block = np.zeros((30, 30))
    block[:15, :15], block[15:, 15:] = C
    _check_joint(f, mean, block)

    mixed = np.asarray(
        Predictive(
            ns.pathwise(model, num_features=1024), guide=guide, params=params, num_samples=S
        )(random.PRNGKey(1), X, mixing=jnp.asarray(W))["f"]
    )
    assert mixed.shape == (S, 3, 15)
    # f_p = sum_l W_pl g_l: Cov(f_p(x), f_q(x')) = sum_l W_pl W_ql C_l(x, x')
    C_mixed = np.einsum("pl,ql,lab->paqb", W, W, C).reshape(45, 45)
    _check_joint(mixed, W @ mean, C_mixed)


def test_refusals():
    for bad in (0, 1, 3, 1025, 2.0, True, "64", None):
        with pytest.raises(ValueError, match="num_features"):
            ns.pathwise(lambda: None, num_features=bad)

    def ragged(X):
        with numpyro.plate("group", 2):
            ns.svgp("f", ns.kernels.RBF(1.0, 0.5), X, jnp.asarray(Z), group_index=np.arange(4) % 2)

    with pytest.raises(NotImplementedError, match="group_index"):
        trace(seed(ns.pathwise(ragged), 0)).get_trace(np.zeros((4, 1)))

    def model(X):
        ns.svgp("f", ns.kernels.RBF(1.0, 0.5), X, jnp.asarray(Z))

    # the potential of MCMC runs a model without a seed: nothing to draw the function from
    with pytest.raises(RuntimeError, match="seed"):
        log_density(ns.pathwise(model), (np.zeros((3, 1)),), {}, {"f_whitened": jnp.zeros(len(Z))})
