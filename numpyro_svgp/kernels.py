r"""Covariance functions as equinox modules.

Every kernel defines one method, :meth:`Kernel.evaluate`, the covariance of a
single pair of points :math:`k(x, x')`; :meth:`Kernel.__call__` and
:meth:`Kernel.diag` broadcast it over rows with :func:`jax.vmap`. Kernels are
immutable pytrees, so they pass through ``jit``, ``grad`` and ``vmap`` and can be
rebuilt cheaply on every model call from ``numpyro.param`` or
``numpyro.sample`` values, which is how a model gets constraints and priors on
its hyperparameters for free::

    kernel = ns.kernels.RBF(
        variance=numpyro.param("variance", 1.0, constraint=constraints.positive),
        lengthscale=numpyro.param("lengthscale", 0.6, constraint=constraints.positive),
    )

Kernels compose: ``k1 + k2`` (:class:`Sum`), ``k1 * k2`` (:class:`Product`) and
``c * k`` for a positive scalar ``c`` (:class:`Scaled`).

Lengthscales are a scalar (isotropic) or a ``(D,)`` vector (ARD, one per input
feature). Hyperparameters passed as concrete numbers are checked at once;
traced ones (from ``numpyro.param`` under ``jit``) are checked when the compiled
program runs, via :func:`equinox.error_if`.

The conventions follow Rasmussen & Williams (2006), *Gaussian Processes for
Machine Learning*, chapter 4.
"""

import abc
import dataclasses
from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from numpyro_svgp._checks import as_float_array, check_matrix, check_positive

__all__ = [
    "Kernel",
    "Stationary",
    "RBF",
    "Matern12",
    "Matern32",
    "Matern52",
    "Periodic",
    "Linear",
    "Sum",
    "Product",
    "Scaled",
    "Zonal",
    "ArcCosine",
    "SphericalMatern",
    "Warped",
]


class Kernel(eqx.Module):
    """Abstract base of all covariance functions.

    Subclasses implement :meth:`evaluate` for one pair of points and nothing
    else; all broadcasting lives here.

    ``hyperparameters`` names the fields that may differ between the GPs of a family
    (``svgp`` inside ``numpyro.plate``), each with the number of trailing axes it has
    for one GP: 0 for a scalar, 1 for one that may be a ``(D,)`` vector. Their leading
    axes, if any, are the plates' (see :func:`~numpyro_svgp.svgp`). A kernel called
    directly takes one GP's hyperparameters.
    """

    hyperparameters: ClassVar[dict[str, int]] = {}

    @abc.abstractmethod
    def evaluate(self, x1: Float[Array, " D"], x2: Float[Array, " D"]) -> Float[Array, ""]:
        """The covariance :math:`k(x_1, x_2)` of two single points."""

    def __call__(
        self, X1: Float[Array, "N1 D"], X2: Float[Array, "N2 D"] | None = None
    ) -> Float[Array, "N1 N2"]:
        """The cross-covariance matrix :math:`K_{ij} = k(X_{1,i}, X_{2,j})`.

        :param X1: inputs, shape ``(N1, D)``.
        :param X2: inputs, shape ``(N2, D)``; defaults to ``X1``.
        """
        _check_one_gp(self)
        X1 = _as_inputs("X1", X1)
        X2 = X1 if X2 is None else _as_inputs("X2", X2)
        if X1.shape[1] != X2.shape[1]:
            raise ValueError(
                f"X1 and X2 must have the same number of features, got "
                f"{X1.shape[1]} and {X2.shape[1]}."
            )
        return self._matrix(X1, X2, X2 is X1)

    def _matrix(self, X1: jax.Array, X2: jax.Array, symmetric: bool) -> jax.Array:
        """Checked inputs -> covariance matrix; ``symmetric`` when ``X2`` is ``X1``.

        The default broadcasts :meth:`evaluate`; kernels with a faster matrix form
        (:class:`Stationary`, the compositions) override this and nothing else.
        """
        return jax.vmap(jax.vmap(self.evaluate, (None, 0)), (0, None))(X1, X2)

    def diag(self, X: Float[Array, "N D"]) -> Float[Array, " N"]:
        """The variances :math:`k(x_n, x_n)` without forming the full matrix.

        Subclasses with a closed form override :meth:`_diag` (stationary kernels: a
        constant; the compositions: from their parts' diagonals).
        """
        _check_one_gp(self)
        return self._diag(X)

    def _diag(self, X: jax.Array) -> jax.Array:
        """:meth:`diag` without the hyperparameter check; the default broadcasts
        :meth:`evaluate`."""
        X = _as_inputs("X", X)
        return jax.vmap(lambda x: self.evaluate(x, x))(X)

    def __add__(self, other: "Kernel") -> "Sum":
        if not isinstance(other, Kernel):
            return NotImplemented
        return Sum(self, other)

    def __mul__(self, other) -> "Kernel":
        if isinstance(other, Kernel):
            return Product(self, other)
        return Scaled(other, self)

    def __rmul__(self, other) -> "Scaled":
        return Scaled(other, self)


def _as_inputs(name: str, X) -> jax.Array:
    X = as_float_array(name, X)
    check_matrix(name, X)
    return X


def _check_one_gp(kernel: Kernel) -> None:
    """Refuse, by name, hyperparameters with more axes than one GP's (a family's kernel
    evaluated directly would broadcast them against the inputs)."""
    for field in dataclasses.fields(kernel):
        value = getattr(kernel, field.name)
        if isinstance(value, Kernel):
            _check_one_gp(value)
        elif field.name in type(kernel).hyperparameters:
            event = type(kernel).hyperparameters[field.name]
            if jnp.ndim(value) > event:
                kind = "a scalar or a (D,) vector" if event else "a scalar"
                raise ValueError(
                    f"{type(kernel).__name__}.{field.name} has shape {jnp.shape(value)}, but a "
                    f"kernel evaluated directly takes one GP's {field.name}: {kind}. Leading "
                    "axes (one value per GP) are for ns.svgp called inside numpyro.plate, "
                    "which evaluates the kernel for each GP of the family."
                )


def _per_feature(name: str, value: jax.Array, num_features: int) -> None:
    """Trace-time check that an ARD hyperparameter matches the inputs' D."""
    if value.ndim == 1 and value.shape[0] != num_features:
        raise ValueError(
            f"{name} has shape {value.shape} but the inputs have "
            f"{num_features} features; pass a scalar or a ({num_features},) vector."
        )


def _scaled_sq_dist(x1, x2, lengthscale) -> jax.Array:
    _per_feature("lengthscale", lengthscale, x1.shape[-1])
    return jnp.sum(jnp.square((x1 - x2) / lengthscale))


def _scaled_sq_dist_matrix(X1, X2, lengthscale) -> jax.Array:
    r"""All :math:`r^2_{ij} = \|(x_i - x'_j)/\ell\|^2` as one matrix product.

    :math:`\|a\|^2 + \|b\|^2 - 2 a^\top b` is a GEMM instead of an ``(N1, N2, D)``
    tensor of differences, which is both the memory and the time of large
    cross-covariances. Its round-off grows with :math:`\|a\|^2`, so both sets are
    first centred on the mean of ``X2``, before scaling (``r`` is shift-invariant, hence the
    ``stop_gradient``), and the result is clamped at 0.
    """
    _per_feature("lengthscale", lengthscale, X1.shape[-1])
    centre = jax.lax.stop_gradient(jnp.mean(X2, axis=0))
    a, b = (X1 - centre) / lengthscale, (X2 - centre) / lengthscale
    # All three terms in one product, [a, |a|², 1] [-2b, 1, |b|²]ᵀ: then the
    # derivative is two matrix products as well. Added outside the product, the
    # norms' derivatives are sums over the long axis of an (N1, N2) array, which
    # XLA:CPU runs far slower than the same sum as a matrix product.
    ones_a, ones_b = jnp.ones((a.shape[0], 1), a.dtype), jnp.ones((b.shape[0], 1), b.dtype)
    left = jnp.concatenate([a, jnp.sum(jnp.square(a), axis=1, keepdims=True), ones_a], axis=1)
    right = jnp.concatenate(
        [-2.0 * b, ones_b, jnp.sum(jnp.square(b), axis=1, keepdims=True)], axis=1
    )
    return jnp.maximum(left @ right.T, 0.0)


@jax.custom_jvp
def _scaled_sq_dist_symmetric(X: jax.Array, lengthscale: jax.Array) -> jax.Array:
    r"""All :math:`r^2_{ij} = \|(x_i - x_j)/\ell\|^2` within one set (e.g. :math:`K_{zz}`).

    The value is formed from the differences, as :meth:`Kernel.evaluate` forms one
    pair's: exactly symmetric with an exact zero diagonal, as a matrix that is
    factorised must be. Its derivative is written as matrix products: with
    :math:`a = (X - c)/\ell` (centred, as :math:`r^2` is shift-invariant) and
    :math:`\dot a = (\dot X - a \dot\ell)/\ell`,

    .. math:: \dot r^2_{ij} = 2\,(a_i - a_j)^\top (\dot a_i - \dot a_j)
        = 2\,(h_{ij} + h_{ji}), \qquad h_{ij} = a_i^\top \dot a_i - \dot a_i^\top a_j,

    one ``(M, D+1) x (D+1, M)`` product, whose transpose (the gradient) is one as well.
    JAX's own derivative of the differences runs elementwise over an ``(M, M, D)``
    tensor in both directions, far slower on CPU than the product once M is large.
    """
    _per_feature("lengthscale", lengthscale, X.shape[-1])
    if X.shape[1] > 32:
        return jnp.sum(jnp.square((X[:, None, :] - X[None, :, :]) / lengthscale), axis=-1)
    # one (M, M) term per feature, added in order: XLA:CPU fuses these into one pass,
    # where the sum over a short last axis of an (M, M, D) tensor runs several times
    # slower; the same differences, so still exactly symmetric with a zero diagonal
    scale = jnp.broadcast_to(lengthscale, X.shape[1:])
    r2 = jnp.zeros((X.shape[0], X.shape[0]), X.dtype)
    for d in range(X.shape[1]):
        r2 = r2 + jnp.square((X[:, d, None] - X[None, :, d]) / scale[d])
    return r2


@_scaled_sq_dist_symmetric.defjvp
def _scaled_sq_dist_symmetric_jvp(primals, tangents):
    X, lengthscale = primals
    X_dot, lengthscale_dot = tangents
    a = (X - jax.lax.stop_gradient(jnp.mean(X, axis=0))) / lengthscale
    a_dot = (X_dot - a * lengthscale_dot) / lengthscale
    s = jnp.sum(a * a_dot, axis=1, keepdims=True)
    # linear in the tangents on the left, the primal on the right
    half = jnp.concatenate([s, a_dot], axis=1) @ jnp.concatenate([jnp.ones_like(s), -a], 1).T
    r2_dot = 2.0 * (half + half.T)
    eye = jnp.eye(X.shape[0], dtype=bool)
    return _scaled_sq_dist_symmetric(X, lengthscale), jnp.where(eye, 0.0, r2_dot)


def _distance(r2: jax.Array) -> jax.Array:
    # sqrt has an infinite derivative at 0 (every diagonal entry); the double
    # `where` keeps the gradient finite there instead of NaN.
    positive = r2 > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, r2, 1.0)), 0.0)


class Stationary(Kernel):
    r"""Abstract base of the isotropic/ARD stationary kernels

    .. math:: k(x, x') = \sigma^2 \kappa(r^2), \qquad r^2 = \sum_d (x_d - x'_d)^2 / \ell_d^2;

    subclasses define the profile :math:`\kappa` only.

    :param variance: signal variance :math:`\sigma^2 > 0`.
    :param lengthscale: :math:`\ell > 0`, scalar or ``(D,)`` (ARD).
    """

    hyperparameters: ClassVar[dict[str, int]] = {"variance": 0, "lengthscale": 1}
    variance: Float[Array, ""]
    lengthscale: Float[Array, "*D"]

    def __init__(self, variance=1.0, lengthscale=1.0):
        self.variance = check_positive("variance", variance)
        self.lengthscale = check_positive("lengthscale", lengthscale)

    @abc.abstractmethod
    def profile(self, r2: Float[Array, ""]) -> Float[Array, ""]:
        r""":math:`\kappa(r^2)`, with :math:`\kappa(0) = 1`."""

    def evaluate(self, x1, x2):
        return self.variance * self.profile(_scaled_sq_dist(x1, x2, self.lengthscale))

    def _matrix(self, X1, X2, symmetric):
        if symmetric:
            # K(Z, Z) must be exactly symmetric with an exact diagonal (it is
            # factorised), so it keeps the pairwise-difference form of `evaluate`, with a
            # derivative as matrix products. Differences first, then scaled: under jit on
            # XLA:CPU (jax 0.10.2) the inputs scaled before differencing were miscompiled
            # for Matern kernels in 1-D (M = 4 to 30): K(Z, Z) came out O(1) wrong, and
            # the jitter search then escalated to 1.0 without a word.
            r2 = _scaled_sq_dist_symmetric(X1, self.lengthscale)
            return self.variance * self.profile(r2)
        return self.variance * self.profile(_scaled_sq_dist_matrix(X1, X2, self.lengthscale))

    def _diag(self, X):
        # k(x, x) = sigma^2 kappa(0) for every x: a constant, not a per-row distance
        # computation (and its lengthscale derivative) over all N inputs.
        X = _as_inputs("X", X)
        _per_feature("lengthscale", self.lengthscale, X.shape[-1])
        return jnp.broadcast_to(self.variance * self.profile(jnp.zeros((), X.dtype)), X.shape[:1])


class RBF(Stationary):
    r"""Squared-exponential (radial basis function) kernel

    .. math:: k(x, x') = \sigma^2 \exp\!\Big(-\tfrac12 \sum_d (x_d - x'_d)^2 / \ell_d^2\Big).

    :param variance: signal variance :math:`\sigma^2 > 0`.
    :param lengthscale: :math:`\ell > 0`, scalar or ``(D,)`` (ARD).
    """

    def profile(self, r2):
        return jnp.exp(-0.5 * r2)


class Matern12(Stationary):
    r"""Matérn kernel with smoothness 1/2 (exponential / Ornstein-Uhlenbeck)

    .. math:: k(x, x') = \sigma^2 e^{-r}, \qquad r = \big\|(x - x') / \ell\big\|.

    :param variance: signal variance :math:`\sigma^2 > 0`.
    :param lengthscale: :math:`\ell > 0`, scalar or ``(D,)`` (ARD).
    """

    def profile(self, r2):
        return jnp.exp(-_distance(r2))


class Matern32(Stationary):
    r"""Matérn kernel with smoothness 3/2

    .. math:: k(x, x') = \sigma^2 (1 + \sqrt3 r)\, e^{-\sqrt3 r}, \qquad
        r = \big\|(x - x') / \ell\big\|.

    :param variance: signal variance :math:`\sigma^2 > 0`.
    :param lengthscale: :math:`\ell > 0`, scalar or ``(D,)`` (ARD).
    """

    def profile(self, r2):
        s = jnp.sqrt(3.0) * _distance(r2)
        return (1.0 + s) * jnp.exp(-s)


class Matern52(Stationary):
    r"""Matérn kernel with smoothness 5/2

    .. math:: k(x, x') = \sigma^2 \big(1 + \sqrt5 r + \tfrac53 r^2\big)\, e^{-\sqrt5 r},
        \qquad r = \big\|(x - x') / \ell\big\|.

    :param variance: signal variance :math:`\sigma^2 > 0`.
    :param lengthscale: :math:`\ell > 0`, scalar or ``(D,)`` (ARD).
    """

    def profile(self, r2):
        s = jnp.sqrt(5.0) * _distance(r2)
        return (1.0 + s + 5.0 / 3.0 * r2) * jnp.exp(-s)


class Periodic(Kernel):
    r"""Periodic kernel (MacKay 1998)

    .. math:: k(x, x') = \sigma^2
        \exp\!\Big(-2 \sum_d \sin^2\!\big(\pi (x_d - x'_d) / p_d\big) / \ell_d^2\Big).

    :param variance: signal variance :math:`\sigma^2 > 0`.
    :param lengthscale: :math:`\ell > 0`, scalar or ``(D,)``.
    :param period: :math:`p > 0`, scalar or ``(D,)``.
    """

    hyperparameters: ClassVar[dict[str, int]] = {"variance": 0, "lengthscale": 1, "period": 1}
    variance: Float[Array, ""]
    lengthscale: Float[Array, "*D"]
    period: Float[Array, "*D"]

    def __init__(self, variance=1.0, lengthscale=1.0, period=1.0):
        self.variance = check_positive("variance", variance)
        self.lengthscale = check_positive("lengthscale", lengthscale)
        self.period = check_positive("period", period)

    def evaluate(self, x1, x2):
        _per_feature("lengthscale", self.lengthscale, x1.shape[-1])
        _per_feature("period", self.period, x1.shape[-1])
        s = jnp.sin(jnp.pi * (x1 - x2) / self.period) / self.lengthscale
        return self.variance * jnp.exp(-2.0 * jnp.sum(jnp.square(s)))


class Linear(Kernel):
    r"""Linear (dot-product) kernel

    .. math:: k(x, x') = \sum_d \sigma^2_d\, x_d x'_d.

    :param variance: :math:`\sigma^2 > 0`, scalar or ``(D,)`` (one per feature).
    """

    hyperparameters: ClassVar[dict[str, int]] = {"variance": 1}
    variance: Float[Array, "*D"]

    def __init__(self, variance=1.0):
        self.variance = check_positive("variance", variance)

    def evaluate(self, x1, x2):
        _per_feature("variance", self.variance, x1.shape[-1])
        return jnp.sum(self.variance * x1 * x2)


class Sum(Kernel):
    r"""Sum of two kernels, :math:`k(x, x') = k_1(x, x') + k_2(x, x')`. Made by ``k1 + k2``."""

    k1: Kernel
    k2: Kernel

    def evaluate(self, x1, x2):
        return self.k1.evaluate(x1, x2) + self.k2.evaluate(x1, x2)

    def _matrix(self, X1, X2, symmetric):
        return self.k1._matrix(X1, X2, symmetric) + self.k2._matrix(X1, X2, symmetric)

    def _diag(self, X):
        return self.k1.diag(X) + self.k2.diag(X)


class Product(Kernel):
    r"""Product of two kernels, :math:`k(x, x') = k_1(x, x')\, k_2(x, x')`. Made by ``k1 * k2``."""

    k1: Kernel
    k2: Kernel

    def evaluate(self, x1, x2):
        return self.k1.evaluate(x1, x2) * self.k2.evaluate(x1, x2)

    def _matrix(self, X1, X2, symmetric):
        return self.k1._matrix(X1, X2, symmetric) * self.k2._matrix(X1, X2, symmetric)

    def _diag(self, X):
        return self.k1.diag(X) * self.k2.diag(X)


class Scaled(Kernel):
    r"""A kernel times a positive scalar, :math:`k(x, x') = c\, k_0(x, x')`. Made by ``c * k``."""

    hyperparameters: ClassVar[dict[str, int]] = {"scale": 0}
    scale: Float[Array, ""]
    kernel: Kernel

    def __init__(self, scale, kernel: Kernel):
        if not isinstance(kernel, Kernel):
            raise TypeError(f"Scaled needs a Kernel, got {type(kernel).__name__}.")
        if not isinstance(scale, (int, float, np.ndarray, np.generic, jax.Array)):
            raise TypeError(
                f"a kernel can only be multiplied by a kernel or a positive scalar, "
                f"got {type(scale).__name__}."
            )
        self.scale = check_positive("scale", scale)
        self.kernel = kernel

    def evaluate(self, x1, x2):
        return self.scale * self.kernel.evaluate(x1, x2)

    def _matrix(self, X1, X2, symmetric):
        return self.scale * self.kernel._matrix(X1, X2, symmetric)

    def _diag(self, X):
        return self.scale * self.kernel.diag(X)


def _safe_arccos(t: jax.Array) -> jax.Array:
    # arccos has an infinite derivative at +-1 (every diagonal entry); the double
    # `where` gives 0 there instead of NaN.
    inside = jnp.abs(t) < 1.0
    return jnp.where(inside, jnp.arccos(jnp.where(inside, t, 0.0)), jnp.where(t > 0, 0.0, jnp.pi))


class Zonal(Kernel):
    r"""Abstract base of zonal kernels on the unit sphere.

    An input :math:`x \in \mathbb R^D` is first mapped to the sphere
    :math:`\mathbb S^{D} \subset \mathbb R^{D+1}` by appending a bias and normalising,
    :math:`\hat x = (x, b) / \|(x, b)\|`; then

    .. math:: k(x, x') = \sigma^2 \kappa(\hat x^\top \hat x'), \qquad \kappa(1) = 1,

    with the shape function :math:`\kappa` defined by subclasses. Such kernels have a
    Mercer expansion in spherical harmonics (:meth:`mercer_coefficients`), which is what
    :class:`~numpyro_svgp.SphericalHarmonicFeatures` uses (Dutordoir et al. 2020).

    :param variance: :math:`\sigma^2 > 0`.
    :param bias: :math:`b > 0`, appended to every input before normalising.
    """

    hyperparameters: ClassVar[dict[str, int]] = {"variance": 0, "bias": 0}
    variance: Float[Array, ""]
    bias: Float[Array, ""]

    @abc.abstractmethod
    def shape(self, t: Float[Array, "*T"]) -> Float[Array, "*T"]:
        r""":math:`\kappa(t)` for cosines :math:`t \in [-1, 1]`, with :math:`\kappa(1) = 1`."""

    def to_sphere(self, X: Float[Array, "N D"]) -> Float[Array, "N D+1"]:
        """The inputs with the bias appended, normalised to unit length."""
        bias = jnp.broadcast_to(self.bias, X.shape[:-1] + (1,)).astype(X.dtype)
        augmented = jnp.concatenate([X, bias], axis=-1)
        return augmented / jnp.linalg.norm(augmented, axis=-1, keepdims=True)

    def evaluate(self, x1, x2):
        t = jnp.clip(jnp.dot(self.to_sphere(x1), self.to_sphere(x2)), -1.0, 1.0)
        return self.variance * self.shape(t)

    def _matrix(self, X1, X2, symmetric):
        t = jnp.clip(self.to_sphere(X1) @ self.to_sphere(X2).T, -1.0, 1.0)
        if symmetric:
            # x.x is 1 - O(eps), and arccos turns that into O(sqrt(eps)): pin it
            t = jnp.where(jnp.eye(t.shape[0], dtype=bool), 1.0, t)
        return self.variance * self.shape(t)

    def _diag(self, X):
        X = _as_inputs("X", X)
        return self.variance * self.shape(jnp.ones(X.shape[0], X.dtype))

    def mercer_coefficients(self, dimension: int, max_degree: int, num_nodes: int = 1024):
        r"""The Funk–Hecke coefficients :math:`\sigma^2\lambda_0, \dots, \sigma^2\lambda_L` on
        :math:`\mathbb S^{d-1}`, ``d = dimension`` (= input features + 1), by
        ``num_nodes``-point Gauss–Gegenbauer quadrature of :meth:`shape` (see
        :mod:`numpyro_svgp._harmonics`). Differentiable in the hyperparameters.
        """
        # local import: _harmonics is pure NumPy/JAX maths, kernels stay importable alone
        from numpyro_svgp._harmonics import gegenbauer, gegenbauer_quadrature, sphere_area

        nodes, weights = gegenbauer_quadrature(dimension, num_nodes)
        dtype = jnp.result_type(self.variance)
        P = jnp.asarray(gegenbauer(max_degree, dimension, nodes), dtype)  # (nodes, L + 1)
        kappa = self.shape(jnp.asarray(nodes, dtype))
        area = sphere_area(dimension - 1)
        return self.variance * area * (jnp.asarray(weights, dtype) * kappa) @ P


class ArcCosine(Zonal):
    r"""Arc-cosine kernel of order 0 or 1 (Cho & Saul 2009) on the sphere

    .. math:: \kappa_0(t) = 1 - \frac{\theta}{\pi}, \qquad
        \kappa_1(t) = \frac{\sin\theta + (\pi - \theta)\cos\theta}{\pi}, \qquad
        \theta = \arccos t,

    the covariance of an infinitely wide one-layer network with step (order 0) or ReLU
    (order 1) activations, restricted to unit-norm inputs (see :class:`Zonal`).

    :param order: 0 or 1.
    :param variance: :math:`\sigma^2 > 0`.
    :param bias: :math:`b > 0`.
    """

    order: int = eqx.field(static=True)

    def __init__(self, order: int = 1, variance=1.0, bias=1.0):
        if order not in (0, 1):
            raise ValueError(f"ArcCosine order must be 0 or 1, got {order}.")
        self.order = order
        self.variance = check_positive("variance", variance)
        self.bias = check_positive("bias", bias)

    def shape(self, t):
        theta = _safe_arccos(t)
        if self.order == 0:
            return 1.0 - theta / jnp.pi
        return (_distance(1.0 - t * t) + (jnp.pi - theta) * t) / jnp.pi  # sin(theta), safely


class SphericalMatern(Zonal):
    r"""Matérn kernel of the chordal distance on the sphere

    .. math:: \kappa(t) = \mathrm{Matern}_\nu\big(r\big), \qquad
        r = \|\hat x - \hat x'\| / \ell = \sqrt{2 - 2t} / \ell,

    the restriction of a Euclidean Matérn kernel to the sphere (so positive definite),
    for :math:`\nu \in \{1/2, 3/2, 5/2\}`.

    :param smoothness: :math:`\nu`: 0.5, 1.5 or 2.5.
    :param variance: :math:`\sigma^2 > 0`.
    :param lengthscale: :math:`\ell > 0` (scalar).
    :param bias: :math:`b > 0`.
    """

    hyperparameters: ClassVar[dict[str, int]] = {"variance": 0, "lengthscale": 0, "bias": 0}
    smoothness: float = eqx.field(static=True)
    lengthscale: Float[Array, ""]

    def __init__(self, smoothness: float = 1.5, variance=1.0, lengthscale=1.0, bias=1.0):
        if smoothness not in (0.5, 1.5, 2.5):
            raise ValueError(
                f"SphericalMatern smoothness must be 0.5, 1.5 or 2.5, got {smoothness}."
            )
        self.smoothness = smoothness
        self.variance = check_positive("variance", variance)
        self.lengthscale = check_positive("lengthscale", lengthscale)
        self.bias = check_positive("bias", bias)

    def shape(self, t):
        r2 = jnp.maximum(2.0 - 2.0 * t, 0.0) / jnp.square(self.lengthscale)
        r = _distance(r2)
        if self.smoothness == 0.5:
            return jnp.exp(-r)
        if self.smoothness == 1.5:
            s = jnp.sqrt(3.0) * r
            return (1.0 + s) * jnp.exp(-s)
        s = jnp.sqrt(5.0) * r
        return (1.0 + s + 5.0 / 3.0 * r2) * jnp.exp(-s)


class Warped(Kernel):
    r"""A kernel on warped inputs (deep kernel learning; Wilson et al. 2016)

    .. math:: k(x, x') = k_0\big(g(x), g(x')\big),

    where :math:`g` maps one input :math:`x \in \mathbb R^D` to features in
    :math:`\mathbb R^F`, e.g. an equinox network registered in the model with
    :func:`numpyro.contrib.module.eqx_module` (its weights become ``numpyro.param`` sites
    that SVI fits with the other params) or
    :func:`~numpyro.contrib.module.random_eqx_module` (weights with priors)::

        net = eqx_module("net", eqx.nn.MLP(1, 2, 32, 2, key=key))
        kernel = ns.kernels.Warped(ns.kernels.RBF(variance, lengthscale), net)
        f = ns.svgp("f", kernel, X, ns.FeatureInducingPoints(Z))   # Z: (M, F)

    Inducing points may live in the input space (plain ``Z`` of shape ``(M, D)``, warped
    like the data) or in the feature space of :math:`g` with
    :class:`~numpyro_svgp.FeatureInducingPoints`.

    :param kernel: the base kernel :math:`k_0` on :math:`\mathbb R^F`.
    :param warp: :math:`g`, a callable on one input ``(D,) -> (F,)``.
    """

    kernel: Kernel
    warp: Callable

    def __init__(self, kernel: Kernel, warp):
        if not isinstance(kernel, Kernel):
            raise TypeError(f"Warped needs a base Kernel, got {type(kernel).__name__}.")
        if not callable(warp):
            raise TypeError(f"Warped needs a callable warp g(x), got {type(warp).__name__}.")
        self.kernel, self.warp = kernel, warp

    def features(self, X: Float[Array, "N D"]) -> Float[Array, "N F"]:
        """:math:`g` applied to every row of ``X``."""
        G = jax.vmap(self.warp)(X)
        if G.ndim != 2:
            raise ValueError(
                f"the warp must map one input (D,) to (F,), got output shape {G.shape[1:]}."
            )
        return G

    def evaluate(self, x1, x2):
        return self.kernel.evaluate(self.warp(x1), self.warp(x2))

    def _matrix(self, X1, X2, symmetric):
        G1 = self.features(X1)
        G2 = G1 if symmetric else self.features(X2)
        return self.kernel._matrix(G1, G2, symmetric)

    def _diag(self, X):
        return self.kernel.diag(self.features(_as_inputs("X", X)))
