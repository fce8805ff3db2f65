r"""Inducing variables: what :func:`~numpyro_svgp.svgp` conditions on.

An inducing point is one kind of inducing variable, :math:`u_m = f(z_m)`. Any linear
functional of :math:`f` will do (Lázaro-Gredilla & Figueiras-Vidal 2009); all the SVGP
needs from it is :math:`K_{uu}` (through its Cholesky factor) and :math:`K_{xu}`. An
:class:`InducingFeatures` supplies exactly these two, and everything above it (the
conditional, the ELBO, the guide, prediction) has one code path for all of them:

- :class:`InducingPoints` (a raw ``(M, D)`` array ``Z`` passed to ``svgp`` becomes one),
- :class:`FeatureInducingPoints`, points in the feature space of a warped kernel,
- :class:`SphericalHarmonicFeatures` (Dutordoir, Durrande & Hensman 2020).

:class:`SphericalHarmonicFeatures` projects :math:`f` onto the spherical harmonics
:math:`Y_{n,j}` up to a maximum degree in the reproducing-kernel Hilbert space of a
zonal kernel, so that

.. math:: K_{uu} = \operatorname{diag}(\lambda_n^{-1}), \qquad
    [K_{xu}]_{:, (n,j)} = Y_{n,j}(\hat x),

equivalently (scaling each :math:`u_{n,j}` by :math:`\lambda_n`)
:math:`K_{uu} = \operatorname{diag}(\lambda_n)` and
:math:`K_{xu} = Y(\hat x) \operatorname{diag}(\lambda)`, the form used here; the whitened
projection is :math:`A = Y(\hat x) \operatorname{diag}(\sqrt{\lambda})` either way.
:math:`K_{uu}` is diagonal: no O(M³) Cholesky, and two features can never
pile up on each other as learnt inducing points can. Truncating the kernel's Mercer
expansion at the same degree makes :math:`Q_{xx} = K_{xx}`: the SVGP is then exact.
"""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from numpyro_svgp._checks import (
    as_float_array,
    check_finite,
    check_matrix,
    fail_if,
    failed_check_action,
    is_traced,
)
from numpyro_svgp._harmonics import fundamental_system, gegenbauer, num_harmonics
from numpyro_svgp._linalg import cholesky_with_jitter
from numpyro_svgp.kernels import Kernel, Warped, Zonal

__all__ = [
    "FeatureInducingPoints",
    "InducingFeatures",
    "InducingPoints",
    "SphericalHarmonicFeatures",
    "as_inducing",
]


class InducingFeatures(eqx.Module):
    """Abstract inducing variables: :math:`K_{uu}` (factorised) and :math:`K_{xu}`."""

    @property
    @abc.abstractmethod
    def num_features(self) -> int:
        """:math:`M`, the number of inducing variables."""

    @abc.abstractmethod
    def check_inputs(self, kernel: Kernel, X: Float[Array, "N D"]) -> None:
        """Raise (at trace time) if ``kernel`` or ``X`` does not fit these inducing variables."""

    def dtype(self, X: Float[Array, "N D"]):
        """The dtype the conditional is computed in (that of ``X`` unless the
        inducing variables carry their own inputs)."""
        return X.dtype

    @abc.abstractmethod
    def cholesky(
        self, kernel: Kernel, dtype, jitter: float, max_escalations: int
    ) -> tuple[Float[Array, "M M"], Float[Array, ""]]:
        r"""``(L, jitter_used)`` with :math:`L L^\top = K_{uu} + \epsilon I`."""

    @abc.abstractmethod
    def cross_covariance(self, kernel: Kernel, X: Float[Array, "N D"]) -> Float[Array, "N M"]:
        r""":math:`K_{xu}`."""

    def cross_covariance_ux(self, kernel: Kernel, X: Float[Array, "N D"]) -> Float[Array, "M N"]:
        r""":math:`K_{ux}`, in the ``(M, N)`` layout that the matrix-product form of the
        Gaussian data term multiplies (its products then need no ``(M, N)`` transpose)."""
        return self.cross_covariance(kernel, X).T


class InducingPoints(InducingFeatures):
    r"""Inducing points :math:`u_m = f(z_m)` in the input space:
    :math:`K_{uu} = k(Z, Z)`, :math:`K_{xu} = k(X, Z)`.

    ``svgp`` accepts a raw ``(M, D)`` array for ``Z`` and wraps it in this class.

    :param Z: inducing inputs, shape ``(M, D)``.
    """

    Z: Float[Array, "M D"]

    def __init__(self, Z):
        self.Z = _points("Z", Z)

    @property
    def num_features(self) -> int:
        return self.Z.shape[0]

    def check_inputs(self, kernel, X):
        if X.shape[1] != self.Z.shape[1]:
            raise ValueError(
                f"X has {X.shape[1]} features but Z has {self.Z.shape[1]}: inducing inputs "
                "must live in the same input space as the data."
            )
        if not is_traced(self.Z):
            # concrete Z: refuse it here, with the index, before the compiled factorisation
            check_finite("Z", self.Z)

    def dtype(self, X):
        return jnp.result_type(X, self.Z)

    def cholesky(self, kernel, dtype, jitter, max_escalations):
        Z = check_finite("Z", self.Z)
        return cholesky_with_jitter(
            kernel(Z, Z), jitter, max_escalations=max_escalations, on_failure=failed_check_action()
        )

    def cross_covariance(self, kernel, X):
        return kernel(X, self.Z)

    def cross_covariance_ux(self, kernel, X):
        return kernel(self.Z, X)


def _points(name, Z) -> Float[Array, "M D"]:
    Z = as_float_array(name, Z)
    check_matrix(name, Z)
    if Z.shape[0] == 0:
        raise ValueError(f"{name} is empty: at least one inducing point is needed.")
    return Z


def as_inducing(Z) -> InducingFeatures:
    """``Z`` as inducing variables: :class:`InducingFeatures` pass through, an array
    becomes :class:`InducingPoints`."""
    return Z if isinstance(Z, InducingFeatures) else InducingPoints(Z)


class SphericalHarmonicFeatures(InducingFeatures):
    r"""Spherical-harmonic inducing features up to degree ``max_degree`` (Dutordoir et al. 2020).

    Use with a :class:`~numpyro_svgp.kernels.Zonal` kernel (e.g.
    :class:`~numpyro_svgp.kernels.ArcCosine`, :class:`~numpyro_svgp.kernels.SphericalMatern`),
    in place of ``Z``::

        features = ns.SphericalHarmonicFeatures(max_degree=10, input_dim=X.shape[1])
        f = ns.svgp("f", ns.kernels.ArcCosine(1, variance, bias), X, features)

    There are :math:`M = \sum_{n \le L} N(D + 1, n)` features (e.g. :math:`(L + 1)^2` for
    :math:`D = 2`). The harmonics are built once, in NumPy, from fundamental systems of
    points (:func:`numpyro_svgp._harmonics.fundamental_system`); the kernel's Mercer
    coefficients are recomputed at every call from its (possibly learnt) hyperparameters.

    :param int max_degree: :math:`L \ge 0`, the largest degree.
    :param int input_dim: :math:`D`, the number of input features (the sphere is
        :math:`\mathbb S^D \subset \mathbb R^{D + 1}`, the bias being the extra coordinate).
    :param int num_nodes: Gauss–Gegenbauer nodes for the Mercer coefficients.
    """

    max_degree: int = eqx.field(static=True)
    input_dim: int = eqx.field(static=True)
    num_nodes: int = eqx.field(static=True)
    points: tuple[np.ndarray, ...]
    inverse_factors: tuple[np.ndarray, ...]

    def __init__(self, max_degree: int, input_dim: int, *, num_nodes: int = 1024):
        if int(max_degree) != max_degree or max_degree < 0:
            raise ValueError(f"max_degree must be a non-negative integer, got {max_degree}.")
        if int(input_dim) != input_dim or input_dim < 1:
            raise ValueError(f"input_dim must be a positive integer, got {input_dim}.")
        self.max_degree, self.input_dim, self.num_nodes = int(max_degree), int(input_dim), num_nodes
        systems = [fundamental_system(self.dimension, n) for n in range(self.max_degree + 1)]
        self.points = tuple(v for v, _ in systems)
        self.inverse_factors = tuple(r for _, r in systems)

    @property
    def dimension(self) -> int:
        """:math:`d = D + 1`, the ambient dimension of the sphere."""
        return self.input_dim + 1

    @property
    def num_features(self) -> int:
        return sum(num_harmonics(self.dimension, n) for n in range(self.max_degree + 1))

    @property
    def degrees(self) -> np.ndarray:
        """The degree :math:`n` of each feature, shape ``(M,)``."""
        return np.concatenate(
            [np.full(num_harmonics(self.dimension, n), n) for n in range(self.max_degree + 1)]
        )

    def check_inputs(self, kernel, X):
        self._zonal(kernel)
        if X.shape[1] != self.input_dim:
            raise ValueError(
                f"X has {X.shape[1]} features but the SphericalHarmonicFeatures were built "
                f"for input_dim={self.input_dim}."
            )

    def _zonal(self, kernel) -> Zonal:
        if not isinstance(kernel, Zonal):
            raise TypeError(
                "SphericalHarmonicFeatures need a zonal kernel (numpyro_svgp.kernels.Zonal, "
                f"e.g. ArcCosine or SphericalMatern), got {type(kernel).__name__}."
            )
        return kernel

    def eigenvalues(self, kernel: Zonal, dtype=None) -> Float[Array, " M"]:
        r"""The Mercer coefficient :math:`\sigma^2 \lambda_n` of each feature, shape ``(M,)``."""
        lam = self._zonal(kernel).mercer_coefficients(
            self.dimension, self.max_degree, self.num_nodes
        )
        lam = lam if dtype is None else lam.astype(dtype)
        return lam[jnp.asarray(self.degrees)]

    def harmonics(self, kernel: Zonal, X: Float[Array, "N D"]) -> Float[Array, "N M"]:
        r"""The orthonormal harmonics :math:`Y_{n,j}(\hat x)` at the inputs mapped to the
        sphere by ``kernel``, shape ``(N, M)``."""
        return self.spherical_harmonics(self._zonal(kernel).to_sphere(X))

    def spherical_harmonics(self, Xs: Float[Array, "N D+1"]) -> Float[Array, "N M"]:
        r"""The orthonormal harmonics :math:`Y_{n,j}` (all degrees, in order) at unit
        vectors ``Xs`` of :math:`\mathbb R^{D+1}`, shape ``(N, M)``."""
        blocks = []
        for n, (V, R_inv) in enumerate(zip(self.points, self.inverse_factors, strict=True)):
            t = jnp.clip(Xs @ jnp.asarray(V, Xs.dtype).T, -1.0, 1.0)
            blocks.append(gegenbauer(n, self.dimension, t)[..., n] @ jnp.asarray(R_inv, Xs.dtype).T)
        return jnp.concatenate(blocks, axis=-1)

    def cholesky(self, kernel, dtype, jitter, max_escalations):
        variances = self.eigenvalues(kernel, dtype) + jitter
        root = fail_if(
            jnp.sqrt(variances),
            ~jnp.all(variances > 0),
            "K_uu of the SphericalHarmonicFeatures has a zero or negative entry (a kernel "
            "whose Mercer coefficient vanishes at some degree, e.g. ArcCosine(0) at even "
            "degrees in D = 1): use a positive jitter.",
        )
        return jnp.diag(root), jnp.asarray(jitter, dtype)

    def cross_covariance(self, kernel, X):
        return self.harmonics(kernel, X) * self.eigenvalues(kernel, X.dtype)


class FeatureInducingPoints(InducingFeatures):
    r"""Inducing points in the feature space of a :class:`~numpyro_svgp.kernels.Warped`
    kernel: :math:`u_m = f` at the feature vector :math:`z_m \in \mathbb R^F`, so

    .. math:: K_{uu} = k_0(Z, Z), \qquad K_{xu} = k_0\big(g(X), Z\big),

    with :math:`k_0` the base kernel and :math:`g` the warp. The network then never needs an
    inverse image of :math:`Z`, and :math:`Z` moves with the features as they are learnt.

    :param Z: inducing points, shape ``(M, F)``.
    """

    Z: Float[Array, "M F"]

    def __init__(self, Z):
        self.Z = _points("Z", Z)

    @property
    def num_features(self) -> int:
        return self.Z.shape[0]

    def check_inputs(self, kernel, X):
        # D is the network's business; the F it maps to must be Z's
        num_features = jax.eval_shape(self._warped(kernel).features, X).shape[1]
        self._check_features(num_features)

    def _check_features(self, num_features):
        if num_features != self.Z.shape[1]:
            raise ValueError(
                f"the warp maps inputs to {num_features} features but Z has {self.Z.shape[1]} "
                "columns: feature-space inducing points need shape (M, F)."
            )

    def _warped(self, kernel) -> Warped:
        if not isinstance(kernel, Warped):
            raise TypeError(
                "FeatureInducingPoints need a numpyro_svgp.kernels.Warped kernel, got "
                f"{type(kernel).__name__}; for inducing points in the input space pass Z itself."
            )
        return kernel

    def cholesky(self, kernel, dtype, jitter, max_escalations):
        base = self._warped(kernel).kernel
        Z = check_finite("Z", self.Z)
        return cholesky_with_jitter(
            base(Z, Z), jitter, max_escalations=max_escalations, on_failure=failed_check_action()
        )

    def cross_covariance(self, kernel, X):
        warped = self._warped(kernel)
        G = warped.features(X)
        self._check_features(G.shape[1])
        return warped.kernel(G, self.Z)
