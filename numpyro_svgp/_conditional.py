r"""The whitened conditional :math:`p(f \mid v)` and its moments under :math:`q(v)`.

With inducing inputs :math:`Z` (``M`` rows), :math:`L = \operatorname{chol}(K_{zz} + \epsilon I)`
and whitened inducing values :math:`v \sim \mathcal N(0, I_M)`, the function values
at inputs :math:`X` are

.. math::

    f \mid v \sim \mathcal N\big(A v,\ \operatorname{diag}(K_{xx} - A A^\top)\big),
    \qquad A = K_{xz} L^{-\top},

(only the marginal variances matter for a factorising likelihood). Under
:math:`q(v) = \mathcal N(m, S S^\top)` the marginals of :math:`f` are

.. math::

    \mu = A m, \qquad \sigma^2_f = \operatorname{diag}(K_{xx} - A A^\top)
        + \operatorname{rowsum}\big((A S)^{\circ 2}\big).

The jitter :math:`\epsilon` goes on :math:`K_{zz}` only (as in GPflow), so the ELBO is
exactly that of Hensman et al. (2013) for the jittered :math:`K_{zz}`.

**References**

1. Titsias (2009), *Variational learning of inducing variables in sparse Gaussian processes*.
2. Hensman, Fusi & Lawrence (2013), *Gaussian processes for big data*.
3. Hensman, Matthews & Ghahramani (2015), *Scalable variational Gaussian process classification*.
"""

from typing import NamedTuple

import equinox as eqx
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular
from jaxtyping import Array, Float

from numpyro_svgp._checks import as_float_array, check_finite, check_matrix
from numpyro_svgp.kernels import Kernel

__all__ = [
    "Conditional",
    "default_jitter",
    "jittered_cholesky",
    "whitened_conditional",
    "predictive_moments",
]


def default_jitter(dtype) -> float:
    """The jitter added to :math:`K_{zz}` when none is given: ``1e-6`` in float64,
    ``1e-4`` in float32 (whose machine epsilon is about ``1.2e-7``) and ``1e-2``
    for 16-bit floats."""
    eps = float(jnp.finfo(dtype).eps)
    if eps < 1e-10:
        return 1e-6
    if eps < 1e-5:
        return 1e-4
    return 1e-2


def jittered_cholesky(
    K: Float[Array, "M M"], jitter: float, name: str = "K_zz"
) -> Float[Array, "M M"]:
    r"""Lower Cholesky factor of :math:`K + \epsilon I`, with a clear error when it fails.

    :param K: a symmetric positive semi-definite matrix.
    :param jitter: :math:`\epsilon \ge 0` added to the diagonal.
    :param name: what to call the matrix in the error message.
    :raises: (when the compiled program runs) an error naming the matrix, its
        size and dtype and the likely causes if the factor is not finite.
    """
    M = K.shape[-1]
    L = jnp.linalg.cholesky(K + jitter * jnp.eye(M, dtype=K.dtype))
    return eqx.error_if(
        L,
        ~jnp.all(jnp.isfinite(L)),
        f"Cholesky factorisation of {name} + {jitter:g} I ({M}x{M}, {K.dtype}) failed: "
        "the matrix is not numerically positive definite. Likely causes: duplicate or "
        "near-duplicate inducing inputs Z, a lengthscale that collapsed or grew huge, "
        "a very large kernel variance, or float32 with many inducing points. Remedies: "
        "a larger `jitter`, float64 (jax.config.update('jax_enable_x64', True)), or "
        "re-initialising Z.",
    )


class Conditional(NamedTuple):
    """The whitened conditional at ``N`` inputs with ``M`` inducing points."""

    projection: Float[Array, "N M"]
    r""":math:`A = K_{xz} L^{-\top}`, so that :math:`\mathbb E[f \mid v] = A v`."""
    variance: Float[Array, " N"]
    r""":math:`\operatorname{diag}(K_{xx} - A A^\top) \ge 0`, the variance left given :math:`v`."""


def whitened_conditional(
    kernel: Kernel,
    X: Float[Array, "N D"],
    Z: Float[Array, "M D"],
    *,
    jitter: float | None = None,
) -> Conditional:
    r"""Projection and conditional variance of :math:`f(X)` given whitened inducing values.

    .. math:: A = K_{xz} L^{-\top},\quad L = \operatorname{chol}(K_{zz} + \epsilon I),\quad
        \operatorname{var} = \operatorname{diag}(K_{xx}) - \operatorname{rowsum}(A^{\circ 2}).

    :param kernel: the covariance function.
    :param X: inputs, shape ``(N, D)``.
    :param Z: inducing inputs, shape ``(M, D)``.
    :param jitter: :math:`\epsilon`; defaults to :func:`default_jitter` of the dtype.
    :return: a :class:`Conditional` ``(projection, variance)``.
    """
    X = as_float_array("X", X)
    Z = as_float_array("Z", Z)
    check_matrix("X", X)
    check_matrix("Z", Z)
    if X.shape[1] != Z.shape[1]:
        raise ValueError(
            f"X has {X.shape[1]} features but Z has {Z.shape[1]}: inducing inputs "
            "must live in the same input space as the data."
        )
    if Z.shape[0] == 0:
        raise ValueError("Z is empty: at least one inducing point is needed.")
    X = check_finite("X", X)
    Z = check_finite("Z", Z)
    dtype = jnp.result_type(X, Z)
    if jitter is None:
        jitter = default_jitter(dtype)
    elif not jitter >= 0:
        raise ValueError(f"jitter must be non-negative, got {jitter}.")

    L = jittered_cholesky(kernel(Z, Z), jitter)
    W = solve_triangular(L, kernel(Z, X), lower=True)  # L^{-1} K_zx = A^T
    # Round-off can leave tiny negative values where f is pinned by Z (e.g. Z = X).
    variance = jnp.maximum(kernel.diag(X) - jnp.sum(jnp.square(W), axis=0), 0.0)
    return Conditional(W.T, variance)


def predictive_moments(
    conditional: Conditional,
    loc: Float[Array, " M"],
    scale_tril: Float[Array, "M M"],
) -> tuple[Float[Array, " N"], Float[Array, " N"]]:
    r"""Marginal mean and variance of :math:`f` under :math:`q(v) = \mathcal N(m, S S^\top)`.

    .. math:: \mu = A m, \qquad \sigma^2_f = \operatorname{var} + \operatorname{rowsum}\big((A S)^{\circ 2}\big).

    :param conditional: the output of :func:`whitened_conditional`.
    :param loc: :math:`m`, shape ``(M,)``.
    :param scale_tril: lower-triangular :math:`S`, shape ``(M, M)``.
    :return: ``(mean, variance)``, each of shape ``(N,)``.
    """
    A, variance = conditional
    mean = A @ loc
    return mean, variance + jnp.sum(jnp.square(A @ scale_tril), axis=-1)
