"""Kernels against their textbook formulas written in NumPy, plus algebra, pytrees and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpyro_svgp as ns
from numpyro_svgp import kernels as K

from .reference import central_difference

rng = np.random.default_rng(0)
X1 = rng.normal(size=(7, 3))
X2 = rng.normal(size=(5, 3))
ARD = np.array([0.5, 1.3, 2.0])


def _r(X1, X2, ls):
    return np.sqrt(np.sum(((X1[:, None] - X2[None]) / ls) ** 2, axis=-1))


def _numpy_kernel(name, var, ls):
    def k(A, B):
        r = _r(A, B, ls)
        if name == "RBF":
            return var * np.exp(-0.5 * r**2)
        if name == "Matern12":
            return var * np.exp(-r)
        if name == "Matern32":
            return var * (1 + np.sqrt(3) * r) * np.exp(-np.sqrt(3) * r)
        if name == "Matern52":
            return var * (1 + np.sqrt(5) * r + 5 * r**2 / 3) * np.exp(-np.sqrt(5) * r)
        raise ValueError(name)

    return k


STATIONARY = ["RBF", "Matern12", "Matern32", "Matern52"]


def _assert_grad(got, want):
    # central differences of a smooth float64 function with h = 1e-6 err by about h^2
    # times its third derivative plus eps |f| / h: below 1e-7 relative here
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", STATIONARY)
@pytest.mark.parametrize("ls", [0.8, ARD], ids=["iso", "ard"])
def test_stationary_kernels_match_formulas(name, ls):
    kernel = getattr(K, name)(variance=1.7, lengthscale=ls)
    expected = _numpy_kernel(name, 1.7, ls)
    np.testing.assert_allclose(kernel(X1, X2), expected(X1, X2), rtol=1e-12)
    np.testing.assert_allclose(kernel.diag(X1), np.full(7, 1.7), rtol=1e-12)
    # positive semi-definite
    assert np.linalg.eigvalsh(np.asarray(kernel(X1))).min() > -1e-10


@pytest.mark.parametrize("name", STATIONARY)
def test_cross_covariance_far_from_the_origin_in_float32(name):
    # The cross-covariance is a matrix product ||a||^2 + ||b||^2 - 2 a.b; centring
    # keeps float32 round-off at the scale of the data's spread, not its offset.
    A, B = (X1 + 1e4).astype(np.float32), (X2 + 1e4).astype(np.float32)
    kernel = getattr(K, name)(variance=np.float32(1.7), lengthscale=ARD.astype(np.float32))
    got = kernel(jnp.asarray(A), jnp.asarray(B))
    assert got.dtype == jnp.float32
    expected = _numpy_kernel(name, 1.7, ARD)(A.astype(np.float64), B.astype(np.float64))
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("name", STATIONARY)
def test_cross_covariance_at_shared_points_has_finite_gradients(name):
    # Inducing points initialised at data rows give r = 0 pairs in K_xz.
    def total(ls, X):
        return jnp.sum(getattr(K, name)(1.0, ls)(X, X[:3]))

    g_ls, g_x = jax.grad(total, argnums=(0, 1))(0.7, X1)
    # the r = 0 pairs are k(x, x) = 1 whatever x and the lengthscale, so the total is
    # smooth and central differences of the NumPy formula are its gradient
    _assert_grad(
        g_ls, central_difference(lambda ls: np.sum(_numpy_kernel(name, 1.0, ls)(X1, X1[:3])), 0.7)
    )
    _assert_grad(
        g_x, central_difference(lambda X: np.sum(_numpy_kernel(name, 1.0, 0.7)(X, X[:3])), X1)
    )
    k = getattr(K, name)(1.0, 0.7)(X1, X1[:3])
    np.testing.assert_allclose(np.diagonal(np.asarray(k)[:3]), 1.0, rtol=1e-7)


def test_periodic_and_linear_match_formulas():
    per = K.Periodic(variance=0.9, lengthscale=ARD, period=np.array([1.0, 2.0, 0.5]))
    d = X1[:, None] - X2[None]
    expected = 0.9 * np.exp(
        -2 * np.sum((np.sin(np.pi * d / np.array([1.0, 2.0, 0.5])) / ARD) ** 2, axis=-1)
    )
    np.testing.assert_allclose(per(X1, X2), expected, rtol=1e-12)
    lin = K.Linear(variance=ARD)
    np.testing.assert_allclose(lin(X1, X2), (X1 * ARD) @ X2.T, rtol=1e-12)
    np.testing.assert_allclose(lin.diag(X1), np.sum(ARD * X1**2, axis=1), rtol=1e-12)


def test_kernel_algebra():
    a, b = K.RBF(1.2, 0.7), K.Matern32(0.5, ARD)
    ka, kb = np.asarray(a(X1, X2)), np.asarray(b(X1, X2))
    np.testing.assert_allclose((a + b)(X1, X2), ka + kb, rtol=1e-12)
    np.testing.assert_allclose((a * b)(X1, X2), ka * kb, rtol=1e-12)
    np.testing.assert_allclose((3.0 * a)(X1, X2), 3 * ka, rtol=1e-12)
    np.testing.assert_allclose((a * 3.0)(X1, X2), 3 * ka, rtol=1e-12)
    np.testing.assert_allclose((2.0 * (a + b) * a).diag(X1), 2 * (1.2 + 0.5) * 1.2, rtol=1e-12)


@pytest.mark.parametrize(
    "kernel",
    [
        K.RBF(1.2, ARD),
        K.Matern12(0.5, 0.9),
        K.Matern52(0.8, ARD),
        2.0 * (K.RBF(1.2, 0.7) + K.Linear(ARD)) * K.Periodic(0.9, ARD, 1.3),
    ],
    ids=["rbf", "matern12", "matern52", "composite"],
)
def test_diag_is_the_matrix_diagonal_with_the_same_gradient(kernel):
    # diag has its own closed forms (a constant for stationary kernels, the parts'
    # diagonals for sums and products); the full matrix is the reference
    w = np.linspace(0.5, 1.5, X1.shape[0])
    np.testing.assert_allclose(kernel.diag(X1), np.diagonal(kernel(X1)), rtol=1e-12)
    got = jax.grad(lambda k: jnp.sum(w * k.diag(X1)))(kernel)
    want = jax.grad(lambda k: jnp.sum(w * jnp.diagonal(k(X1))))(kernel)
    for g, h in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, h, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="lengthscale has shape"):
        K.RBF(lengthscale=np.ones(2)).diag(X1)


def test_pytree_round_trip_and_jit():
    kernel = K.RBF(1.2, ARD) + 2.0 * K.Periodic(0.5, 0.4, 1.1)
    leaves, treedef = jax.tree.flatten(kernel)
    rebuilt = jax.tree.unflatten(treedef, leaves)
    np.testing.assert_array_equal(rebuilt(X1, X2), kernel(X1, X2))
    jitted = jax.jit(lambda k, A, B: k(A, B))(kernel, X1, X2)
    np.testing.assert_allclose(jitted, kernel(X1, X2), rtol=1e-12)
    # hyperparameters are differentiable leaves, with the gradients of the NumPy formula
    g = jax.grad(lambda k: jnp.sum(k(X1, X2)))(kernel)

    def total(rbf_var=1.2, rbf_ls=ARD, scale=2.0, var=0.5, ls=0.4, period=1.1):
        return np.sum(
            _numpy_kernel("RBF", rbf_var, rbf_ls)(X1, X2) + scale * _periodic(var, ls, period)
        )

    _assert_grad(g.k1.variance, central_difference(lambda v: total(rbf_var=v), 1.2))
    _assert_grad(g.k1.lengthscale, central_difference(lambda v: total(rbf_ls=v), ARD))
    _assert_grad(g.k2.scale, central_difference(lambda v: total(scale=v), 2.0))
    _assert_grad(g.k2.kernel.variance, central_difference(lambda v: total(var=v), 0.5))
    _assert_grad(g.k2.kernel.lengthscale, central_difference(lambda v: total(ls=v), 0.4))
    _assert_grad(g.k2.kernel.period, central_difference(lambda v: total(period=v), 1.1))


def _periodic(var, ls, period, A=X1, B=X2):
    d = A[:, None] - B[None]
    return var * np.exp(-2 * np.sum((np.sin(np.pi * d / period) / ls) ** 2, axis=-1))


def test_periodic_linear_and_composite_gradients_match_the_formulas():
    """2 (RBF + Linear) x Periodic: the gradient of a weighted sum of its matrix in every
    hyperparameter and in the inputs, against central differences of the NumPy formulas
    (which also checks Periodic's and Linear's own gradients, through the product)."""
    w = np.random.default_rng(1).normal(size=(len(X1), len(X2)))
    p0 = {
        "scale": 2.0,
        "rbf_var": 1.2,
        "rbf_ls": 0.7,
        "lin_var": ARD,
        "per_var": 0.9,
        "per_ls": ARD,
        "period": np.array([1.3, 0.8, 2.1]),
    }

    def jax_total(p, A):
        kernel = p["scale"] * (K.RBF(p["rbf_var"], p["rbf_ls"]) + K.Linear(p["lin_var"]))
        kernel = kernel * K.Periodic(p["per_var"], p["per_ls"], p["period"])
        return jnp.sum(w * kernel(A, X2))

    def np_total(p, A):
        smooth = _numpy_kernel("RBF", p["rbf_var"], p["rbf_ls"])(A, X2) + (A * p["lin_var"]) @ X2.T
        per = _periodic(p["per_var"], p["per_ls"], p["period"], A, X2)
        return np.sum(w * p["scale"] * smooth * per)

    p_jax = {k: jnp.asarray(v) for k, v in p0.items()}
    g_p, g_x = jax.grad(jax_total, argnums=(0, 1))(p_jax, X1)
    for name, value in p0.items():
        want = central_difference(lambda v, name=name: np_total({**p0, name: v}, X1), value)
        _assert_grad(g_p[name], want)
    _assert_grad(g_x, central_difference(lambda A: np_total(p0, A), X1))


@pytest.mark.parametrize("name", ["Matern12", "Matern32", "Matern52"])
def test_gradient_finite_on_the_diagonal(name):
    # d r / d x is singular at r = 0; the kernel must still give finite gradients there
    def total(ls, X):
        return jnp.sum(getattr(K, name)(1.0, ls)(X, X))

    g_ls, g_x = jax.grad(total, argnums=(0, 1))(0.7, X1)
    # finite, and the gradient of the total, which is smooth (its diagonal is constant)
    _assert_grad(
        g_ls, central_difference(lambda ls: np.sum(_numpy_kernel(name, 1.0, ls)(X1, X1)), 0.7)
    )
    _assert_grad(g_x, central_difference(lambda X: np.sum(_numpy_kernel(name, 1.0, 0.7)(X, X)), X1))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: K.RBF(variance=0.0), "variance must be positive"),
        (lambda: K.RBF(variance=-1.0), "variance must be positive"),
        (lambda: K.Matern52(lengthscale=-0.1), "lengthscale must be positive"),
        (lambda: K.RBF(lengthscale=np.array([1.0, np.nan])), "lengthscale must be positive"),
        (lambda: K.Periodic(period=0.0), "period must be positive"),
        (lambda: -1.0 * K.RBF(), "scale must be positive"),
    ],
)
def test_bad_hyperparameters_raise_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_traced_nonpositive_hyperparameter_raises_at_run_time():
    f = jax.jit(lambda v: K.RBF(variance=v)(X1, X2))
    assert np.all(np.isfinite(f(1.0)))
    # equinox's error surfaces wrapped by XLA's callback machinery; its text is the contract
    with pytest.raises(Exception, match="variance must be positive"):
        # waited for: on an asynchronous backend (GPU) the check's error comes with the value
        jax.block_until_ready(f(-1.0))


def test_input_shape_errors():
    with pytest.raises(ValueError, match="lengthscale has shape"):
        K.RBF(lengthscale=np.ones(2))(X1, X2)
    # more axes than one GP's are a family's (svgp inside plates), refused when called directly
    with pytest.raises(
        ValueError, match=r"RBF.lengthscale has shape \(2, 2\).*a scalar or a \(D,\) vector"
    ):
        K.RBF(lengthscale=np.ones((2, 2)))(X1, X2)
    with pytest.raises(
        ValueError, match=r"RBF.variance has shape \(2,\).*one GP's variance: a scalar"
    ):
        (2.0 * K.RBF(variance=np.ones(2))).diag(X1)
    with pytest.raises(ValueError, match="same number of features"):
        K.RBF()(X1, X2[:, :2])
    with pytest.raises(ValueError, match=r"X1 must be a 2-D array.*\[:, None\]"):
        K.RBF()(np.ones(4))
    with pytest.raises(TypeError, match="multiplied by a kernel or a positive scalar"):
        "a" * K.RBF()


@pytest.mark.parametrize("name", ["Matern32", "Matern52"])
def test_k_zz_under_jit_equals_the_dense_matrix_and_needs_no_extra_jitter(name):
    # XLA:CPU (jax 0.10.2) miscompiled K(Z, Z) of 1-D Matern kernels under jit when
    # it was formed by scaled pairwise differences and then factorised: the matrix came
    # out O(1) wrong and the jitter search silently escalated to 1.0
    kernel = getattr(K, name)(0.9, 0.8)
    for m in (4, 18, 24):
        Z = np.random.default_rng(0).uniform(-3, 3, size=(m, 1))
        r = np.abs(Z - Z.T) / 0.8
        s = np.sqrt(3.0 if name == "Matern32" else 5.0) * r
        dense = 0.9 * (
            (1 + s) * np.exp(-s) if name == "Matern32" else (1 + s + s**2 / 3) * np.exp(-s)
        )

        def factor(Z):
            K_zz = kernel(Z, Z)
            return K_zz, ns.cholesky_with_jitter(K_zz, 1e-6)[1]

        K_zz, jitter = jax.jit(factor)(Z)
        np.testing.assert_allclose(K_zz, dense, rtol=1e-12, atol=1e-14)
        assert float(jitter) == 1e-6


def _numpy_profile_derivative(name, r2):
    """d kappa / d r^2 of the stationary profiles, off the diagonal (r > 0)."""
    r = np.sqrt(r2)
    if name == "RBF":
        return -0.5 * np.exp(-0.5 * r2)
    if name == "Matern12":
        return -np.exp(-r) / (2 * r)
    if name == "Matern32":
        return -1.5 * np.exp(-np.sqrt(3) * r)
    return -(5 / 6) * (1 + np.sqrt(5) * r) * np.exp(-np.sqrt(5) * r)


@pytest.mark.parametrize("name", STATIONARY)
@pytest.mark.parametrize("ls", [0.8, ARD], ids=["iso", "ard"])
@pytest.mark.parametrize("offset", [0.0, 100.0], ids=["centred", "far"])
def test_k_zz_gradient_matches_the_closed_form(name, ls, offset):
    # K(Z, Z) has its own derivative (matrix products instead of an (M, M, D) tensor);
    # against d/dZ and d/dl of sum_ij W_ij k(z_i, z_j) written out in NumPy
    Z = np.random.default_rng(5).normal(size=(12, 3)) + offset
    W = np.random.default_rng(6).normal(size=(12, 12))
    var = 1.7

    def total(ls, Z):
        return jnp.sum(W * getattr(K, name)(var, ls)(Z, Z))

    g_ls, g_Z = jax.jit(jax.grad(total, argnums=(0, 1)))(jnp.asarray(ls), jnp.asarray(Z))
    diff = Z[:, None, :] - Z[None, :, :]
    ls_d = np.broadcast_to(ls, (3,))
    r2 = np.sum((diff / ls_d) ** 2, axis=-1)
    off = ~np.eye(12, dtype=bool)
    dk = np.where(off, var * _numpy_profile_derivative(name, np.where(off, r2, 1.0)), 0.0)
    want_Z = np.einsum("ij,ijd->id", (W + W.T) * dk, 2 * diff / ls_d**2)
    want_ls_d = np.einsum("ij,ijd->d", W * dk, -2 * diff**2 / ls_d**3)
    want_ls = want_ls_d if np.ndim(ls) else want_ls_d.sum()
    np.testing.assert_allclose(g_Z, want_Z, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(g_ls, want_ls, rtol=1e-9, atol=1e-11)
    # second derivatives go through it too (a custom JVP, not a custom VJP)
    assert np.all(np.isfinite(jax.hessian(total)(jnp.asarray(ls), jnp.asarray(Z))))
