"""Spherical-harmonic features: harmonics, Mercer coefficients and the SVGP they give.

References are independent of the library's recurrences and quadrature: scipy's
Gegenbauer/Chebyshev polynomials, product quadrature rules on the sphere built here,
closed-form Fourier series on the circle, and a dense exact GP in NumPy.
"""

import math

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from jax import random
from numpyro.infer import SVI
from scipy.special import chebyt, eval_chebyt, eval_gegenbauer, roots_jacobi
from scipy.special import gegenbauer as gegenbauer_poly

import numpyro_svgp as ns
from numpyro_svgp._harmonics import gegenbauer, num_harmonics, sphere_area

from . import reference as ref
from .reference import central_difference


def scipy_P(n, d, t):
    """Normalised Gegenbauer polynomial P_n of dimension d, from scipy."""
    if d == 2:
        return eval_chebyt(n, t)
    a = (d - 2) / 2
    return eval_gegenbauer(n, a, t) / eval_gegenbauer(n, a, 1.0)


def sphere_rule(d, n):
    """Product Gauss rule on S^{d-1}: exact for polynomials of degree < 2n (n >= 2)."""
    if d == 2:
        angle = 2 * np.pi * np.arange(2 * n) / (2 * n)
        return np.stack([np.cos(angle), np.sin(angle)], 1), np.full(2 * n, np.pi / n)
    t, w = roots_jacobi(n, (d - 3) / 2, (d - 3) / 2)
    sub, sub_w = sphere_rule(d - 1, n)
    points = np.concatenate(
        [np.concatenate([np.full((len(sub), 1), ti), np.sqrt(1 - ti**2) * sub], 1) for ti in t]
    )
    return points, np.concatenate([wi * sub_w for wi in w])


def test_counts_and_polynomials():
    assert [num_harmonics(3, n) for n in range(6)] == [2 * n + 1 for n in range(6)]
    assert [num_harmonics(4, n) for n in range(6)] == [(n + 1) ** 2 for n in range(6)]
    assert [num_harmonics(2, n) for n in range(4)] == [1, 2, 2, 2]
    assert sphere_area(3) == pytest.approx(4 * np.pi) and sphere_area(2) == pytest.approx(2 * np.pi)
    t = np.linspace(-1, 1, 11)
    for d in (2, 3, 4, 7):
        expected = np.stack([scipy_P(n, d, t) for n in range(9)], -1)
        np.testing.assert_allclose(gegenbauer(8, d, t), expected, atol=1e-12)
    assert ns.SphericalHarmonicFeatures(6, 2).num_features == 49


@pytest.mark.parametrize("d", [2, 3, 4, 5])
def test_harmonics_are_orthonormal_on_the_sphere(d):
    features = ns.SphericalHarmonicFeatures(4, d - 1)
    points, weights = sphere_rule(d, 8)
    assert weights.sum() == pytest.approx(sphere_area(d))
    Y = np.asarray(features.spherical_harmonics(jnp.asarray(points)))
    np.testing.assert_allclose(Y.T @ (weights[:, None] * Y), np.eye(Y.shape[1]), atol=1e-10)


@pytest.mark.parametrize("d", [2, 3, 5])
def test_addition_theorem(d):
    features = ns.SphericalHarmonicFeatures(5, d - 1)
    rng = np.random.default_rng(d)
    x = rng.normal(size=(6, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    Y = np.asarray(features.spherical_harmonics(jnp.asarray(x)))
    degrees = features.degrees
    for n in range(6):
        block = Y[:, degrees == n]
        expected = num_harmonics(d, n) / sphere_area(d) * scipy_P(n, d, x @ x.T)
        np.testing.assert_allclose(block @ block.T, expected, atol=1e-10)


def test_arc_cosine_coefficients_match_closed_forms_on_the_circle():
    # On S^1 the Mercer series is a Fourier series in theta; with
    # k(theta) = c_0 + sum c_n cos(n theta): lambda_0 = 2 pi c_0, lambda_n = pi c_n.
    n = np.arange(1, 12)
    order0 = np.concatenate([[np.pi], np.where(n % 2 == 1, 4 / (np.pi * n**2), 0.0)])
    c1 = np.where(n % 2 == 0, 8 / (np.pi**2 * np.maximum(n**2 - 1.0, 1.0) ** 2), 0.0)
    c1[0] = 0.5  # n = 1
    order1 = np.concatenate([[2 * np.pi * 4 / np.pi**2], np.pi * c1])
    for order, expected in ((0, order0), (1, order1)):
        got = np.asarray(ns.kernels.ArcCosine(order, variance=1.3).mercer_coefficients(2, 11))
        np.testing.assert_allclose(got, 1.3 * expected, atol=2e-6)


@pytest.mark.parametrize(
    "kernel",
    [ns.kernels.ArcCosine(1), ns.kernels.ArcCosine(0), ns.kernels.SphericalMatern(2.5, 0.7, 0.9)],
    ids=["arccos1", "arccos0", "matern52"],
)
def test_coefficients_on_s2_match_legendre_projection_in_theta(kernel):
    # lambda_n = 2 pi int_0^pi kappa(cos th) P_n(cos th) sin th dth, by Gauss-Legendre in
    # theta (the arc-cosine kernels are smooth in theta), against the library's
    # Gauss-Gegenbauer rule in t = cos theta.
    theta, w = np.polynomial.legendre.leggauss(400)
    theta, w = (theta + 1) * np.pi / 2, w * np.pi / 2
    kappa = np.asarray(kernel.shape(jnp.asarray(np.cos(theta)))) * float(kernel.variance)
    expected = [
        2 * np.pi * np.sum(w * kappa * scipy_P(n, 3, np.cos(theta)) * np.sin(theta))
        for n in range(9)
    ]
    got = np.asarray(kernel.mercer_coefficients(3, 8))
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # and the Mercer series sums back to the kernel
    many = np.asarray(kernel.mercer_coefficients(3, 60, num_nodes=2048))
    t = np.linspace(-0.95, 0.95, 9)
    series = sum(many[n] * (2 * n + 1) / (4 * np.pi) * scipy_P(n, 3, t) for n in range(61))
    exact = float(kernel.variance) * np.asarray(kernel.shape(jnp.asarray(t)))
    np.testing.assert_allclose(series, exact, atol=2e-3)


class Truncated(ns.kernels.Zonal):
    """A zonal kernel whose Mercer series stops at `degree` (test reference, via scipy)."""

    coefficients: np.ndarray
    degree: int
    dimension: int

    def __init__(self, coefficients, dimension, variance=1.0, bias=1.0):
        self.coefficients = np.asarray(coefficients, float)
        self.degree, self.dimension = len(coefficients) - 1, dimension
        self.variance, self.bias = jnp.asarray(variance), jnp.asarray(bias)

    def _series(self, t):
        d, area = self.dimension, sphere_area(self.dimension)
        return sum(
            c * num_harmonics(d, n) / area * scipy_P(n, d, t)
            for n, c in enumerate(self.coefficients)
        )

    def _monomials(self):
        # the same polynomial in monomial form (scipy's orthopoly1d), for jnp.polyval
        d, area = self.dimension, sphere_area(self.dimension)
        total = np.poly1d([0.0])
        for n, c in enumerate(self.coefficients):
            p = chebyt(n) if d == 2 else gegenbauer_poly(n, (d - 2) / 2)
            total = total + c * num_harmonics(d, n) / area * np.poly1d(p.coeffs / p(1.0))
        return total.coeffs / self._series(1.0)

    def shape(self, t):
        return jnp.polyval(jnp.asarray(self._monomials()), t)


def _sphere_inputs(D, n, seed):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1.5, 1.5, size=(n, D))
    y = np.sin(2 * X[:, 0]) + (0.5 * np.cos(X[:, 1]) if D > 1 else 0.0) + 0.1 * rng.normal(size=n)
    return X, y


@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.slow
def test_truncated_kernel_svgp_at_optimal_q_is_the_exact_gp(D):
    degree, noise_var = 4, 0.05
    d = D + 1
    coefficients = [1.5 / (1 + n) ** 3 for n in range(degree + 1)]
    kernel = Truncated(coefficients, d, variance=0.8, bias=1.3)
    X, y = _sphere_inputs(D, 40, seed=D)
    # exact GP log marginal likelihood of the truncated kernel, densely in NumPy
    Xs = np.asarray(kernel.to_sphere(jnp.asarray(X)))
    K = 0.8 * kernel._series(np.clip(Xs @ Xs.T, -1, 1)) / kernel._series(1.0)
    exact = ref.exact_lml(K, y, noise_var)
    features = ns.SphericalHarmonicFeatures(degree, D)

    def model(X, y=None):
        f = ns.svgp("f", kernel, X, features, jitter=0.0)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f, math.sqrt(noise_var)), obs=y)

    guide = ns.AutoSVGP(model)
    svi = SVI(model, guide, ns.natural_gradient(optax.sgd(0.0), 1.0, guide=guide), ns.SVGP_ELBO())
    state = svi.init(random.PRNGKey(0), X, y)
    state, _ = svi.update(state, X, y)  # one natural step of size 1: the optimal q(v)
    elbo = -float(ns.SVGP_ELBO().loss(random.PRNGKey(1), svi.get_params(state), model, guide, X, y))
    assert elbo == pytest.approx(exact, rel=1e-8)
    bound = float(ns.titsias_bound(kernel, X, y, features, noise_var, jitter=0.0))
    assert bound == pytest.approx(exact, rel=1e-8)


@pytest.mark.parametrize(
    "D, kernel",
    [(1, ns.kernels.ArcCosine(1, 1.0, 0.5)), (3, ns.kernels.SphericalMatern(1.5, 1.0, 0.8, 1.0))],
    ids=["1d-arccos", "3d-matern"],
)
@pytest.mark.slow
def test_elbo_rises_monotonically_with_the_degree(D, kernel):
    X, y = _sphere_inputs(D, 200, seed=10 + D)
    bounds = [
        float(ns.titsias_bound(kernel, X, y, ns.SphericalHarmonicFeatures(L, D), 0.01))
        for L in range(7)
    ]
    # adding a degree never lowers the bound, and raises it unless the kernel's
    # coefficient of that degree vanishes (odd degrees >= 3 of the arc-cosine kernel)
    steps = np.diff(bounds)
    coefficients = np.asarray(kernel.mercer_coefficients(D + 1, 6))[1:]
    assert np.all(steps >= -1e-9 * np.abs(bounds[1:])), bounds
    assert np.all(steps[coefficients > 1e-10] > 1e-6), (bounds, coefficients)
    assert (coefficients > 1e-10).sum() >= 3
    assert bounds[-1] <= float(ns.exact_log_marginal_likelihood(kernel, X, y, 0.01))


@pytest.mark.slow
def test_features_train_predict_and_refuse_wrong_kernels():
    X, y = _sphere_inputs(2, 120, seed=3)
    features = ns.SphericalHarmonicFeatures(5, 2)

    def model(X, y=None, num_data=None):
        kernel = ns.kernels.ArcCosine(
            1,
            numpyro.param("variance", 1.0, constraint=dist.constraints.positive),
            numpyro.param("bias", 1.0, constraint=dist.constraints.positive),
        )
        f = ns.svgp("f", kernel, X, features)
        noise_var = numpyro.param("noise_var", 0.1, constraint=dist.constraints.positive)
        with numpyro.plate("data", num_data or X.shape[0], subsample_size=X.shape[0]):
            numpyro.sample("y", dist.Normal(f, jnp.sqrt(noise_var)), obs=y)

    svi = SVI(model, ns.AutoSVGP(model), optax.adam(2e-2), ns.SVGP_ELBO())
    result = ns.train_epochs(
        svi, random.PRNGKey(0), 30, X, y, batch_size=40, num_data=len(X), progress_bar=False
    )
    assert (
        np.all(np.isfinite(result.losses)) and result.losses[-20:].mean() < result.losses[:3].mean()
    )
    mean, var = ns.predict_f(model, svi.guide, result.params, X[:7])
    assert mean.shape == (7,) and np.all(np.asarray(var) >= 0)
    assert result.params["f_whitened_auto_loc"].shape == (features.num_features,)
    with pytest.raises(TypeError, match="zonal kernel"):
        ns.whitened_conditional(ns.kernels.RBF(), X, features)
    with pytest.raises(ValueError, match="input_dim=2"):
        ns.whitened_conditional(ns.kernels.ArcCosine(1), X[:, :1], features)


@pytest.mark.parametrize(
    "kernel",
    [
        ns.kernels.ArcCosine(0, 1.2, 0.7),
        ns.kernels.ArcCosine(1, 1.2, 0.7),
        ns.kernels.SphericalMatern(0.5, 1.2, 0.6, 0.7),
    ],
    ids=["arccos0", "arccos1", "matern12"],
)
def test_zonal_kernels_match_formulas_and_their_gradients(kernel):
    import jax

    rng = np.random.default_rng(0)
    X1, X2 = rng.normal(size=(6, 3)), rng.normal(size=(4, 3))

    def unit(X):
        A = np.concatenate([X, np.full((len(X), 1), 0.7)], 1)
        return A / np.linalg.norm(A, axis=1, keepdims=True)

    t = np.clip(unit(X1) @ unit(X2).T, -1, 1)
    theta = np.arccos(t)
    if isinstance(kernel, ns.kernels.ArcCosine):
        expected = (
            (1 - theta / np.pi)
            if kernel.order == 0
            else (np.sin(theta) + (np.pi - theta) * np.cos(theta)) / np.pi
        )
    else:
        expected = np.exp(-np.sqrt(2 - 2 * t) / 0.6)
    np.testing.assert_allclose(kernel(X1, X2), 1.2 * expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(kernel.diag(X1), 1.2, rtol=1e-12)

    # the gradients of sum k(X1, X1) + sum diag, which is smooth (k(x, x) is the variance
    # whatever x and the bias), against central differences of the NumPy formula, its
    # diagonal set exactly (arccos has an infinite derivative at t = 1)
    def total(variance=1.2, bias=0.7, lengthscale=0.6, X=X1):
        A = np.concatenate([X, np.full((len(X), 1), bias)], 1)
        A = A / np.linalg.norm(A, axis=1, keepdims=True)
        t = np.clip(A @ A.T, -1, 1)
        np.fill_diagonal(t, 1.0)
        theta = np.arccos(t)
        if isinstance(kernel, ns.kernels.ArcCosine):
            k = (
                (1 - theta / np.pi)
                if kernel.order == 0
                else (np.sin(theta) + (np.pi - theta) * np.cos(theta)) / np.pi
            )
        else:
            k = np.exp(-np.sqrt(2 - 2 * t) / lengthscale)
        return variance * (np.sum(k) + len(X))

    grads, g_x = jax.grad(lambda k, X: jnp.sum(k(X, X)) + jnp.sum(k.diag(X)), argnums=(0, 1))(
        kernel, X1
    )
    tol = {"rtol": 1e-6, "atol": 1e-8}
    np.testing.assert_allclose(
        grads.variance, central_difference(lambda v: total(variance=v), 1.2), **tol
    )
    np.testing.assert_allclose(grads.bias, central_difference(lambda v: total(bias=v), 0.7), **tol)
    if not isinstance(kernel, ns.kernels.ArcCosine):
        np.testing.assert_allclose(
            grads.lengthscale, central_difference(lambda v: total(lengthscale=v), 0.6), **tol
        )
    np.testing.assert_allclose(g_x, central_difference(lambda X: total(X=X), X1), **tol)
