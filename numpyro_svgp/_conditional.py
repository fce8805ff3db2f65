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

import functools
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from numpyro_svgp._checks import as_float_array, check_finite, check_matrix
from numpyro_svgp._features import InducingFeatures
from numpyro_svgp.kernels import Kernel

__all__ = [
    "MAX_JITTER_ESCALATIONS",
    "Conditional",
    "cholesky_with_jitter",
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


MAX_JITTER_ESCALATIONS = 6
"""Default number of tenfold jitter increases tried when a Cholesky factor is not finite."""


def _symmetric(A: jax.Array) -> jax.Array:
    return 0.5 * (A + A.T)  # as jnp.linalg.cholesky symmetrises its input


def _all_finite(A: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(A))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _escalating_cholesky(
    K: Float[Array, "M M"], jitter: float, limit: int, message: str
) -> tuple[Float[Array, "M M"], Float[Array, ""]]:
    """``(chol(K + used I), used)``, ``used`` the first of ``jitter * 10**k``,
    ``k = 0..limit``, whose factor is finite (the last one tried if none is; then the
    factor is NaN). See :func:`cholesky_with_jitter`."""
    K = _symmetric(K)
    eye = jnp.eye(K.shape[-1], dtype=K.dtype)
    L = lax.linalg.cholesky(K + jitter * eye, symmetrize_input=False)
    used = jnp.asarray(jitter, K.dtype)
    if limit == 0:
        return eqx.error_if(L, ~_all_finite(L), message), used

    def escalate(K):
        def factor(k):
            return lax.linalg.cholesky(K + jitter * 10.0**k * eye, symmetrize_input=False)

        def keep_going(state):
            k, L_k = state
            return ~_all_finite(L_k) & (k < limit)

        def next_try(state):
            k = state[0] + 1
            return k, factor(k)

        k, L_k = lax.while_loop(keep_going, next_try, (1, factor(1)))
        L_k = eqx.error_if(L_k, ~_all_finite(L_k), message)
        return L_k, jnp.asarray(jitter, K.dtype) * jnp.asarray(10.0, K.dtype) ** k

    return lax.cond(_all_finite(L), lambda K: (L, used), escalate, K)


@_escalating_cholesky.defjvp
def _escalating_cholesky_jvp(jitter, limit, message, primals, tangents):
    # The jitter used is piecewise constant in K, so the derivative is that of the
    # factor that was returned: JAX's own Cholesky rule (Murray 2016,
    # arXiv:1602.07527), L_dot = L Phi(L^-1 sym(K_dot) L^-T). Written here so that
    # the search above stays out of the derivative: a lax.cond that carries tangents
    # also carries, and copies, the residuals of both branches at every step.
    (K,), (K_dot,) = primals, tangents
    L, used = _escalating_cholesky(K, jitter, limit, message)
    eye = jnp.eye(K.shape[-1], dtype=K.dtype)
    tmp = lax.linalg.triangular_solve(
        L, _symmetric(K_dot), left_side=False, transpose_a=True, conjugate_a=True, lower=True
    )
    inner = lax.linalg.triangular_solve(L, tmp, left_side=True, transpose_a=False, lower=True)
    L_dot = lax.dot(L, jnp.tril(inner) / (1.0 + eye), precision=lax.Precision.HIGHEST)
    return (L, used), (L_dot, jnp.zeros_like(used))


def cholesky_with_jitter(
    K: Float[Array, "M M"],
    jitter: float,
    *,
    name: str = "K_zz",
    max_escalations: int = MAX_JITTER_ESCALATIONS,
) -> tuple[Float[Array, "M M"], Float[Array, ""]]:
    r"""Lower Cholesky factor of :math:`K + \epsilon I` that raises the jitter when it must.

    The factor with :math:`\epsilon` = ``jitter`` is tried first. Only if it is not
    finite are :math:`10\epsilon, 100\epsilon, \dots, 10^{E}\epsilon` tried in turn
    (:math:`E` = ``max_escalations``), inside ``jit``, in a ``lax.while_loop`` in the
    failure branch of a ``lax.cond``: in the common case that is one factorisation.
    The jitter used is piecewise constant in :math:`K`, so the derivative is that of
    :math:`\operatorname{chol}(K + \epsilon_{\text{used}} I)`; it is written out
    (Murray 2016) so that the search never enters the backward pass. A jitter of 0
    is never escalated.

    :param K: a symmetric positive semi-definite matrix.
    :param jitter: the base :math:`\epsilon \ge 0` added to the diagonal.
    :param name: what to call the matrix in the error message.
    :param max_escalations: how many tenfold increases to try; 0 disables escalation.
    :return: ``(L, jitter_used)``.
    :raises: (when the compiled program runs) an error naming the matrix, its size
        and dtype, the largest jitter tried and the likely causes, if no factor is finite.

    **Reference**: Murray (2016), *Differentiation of the Cholesky decomposition*,
    arXiv:1602.07527.
    """
    jitter = float(jitter)
    M = K.shape[-1]
    limit = max_escalations if jitter > 0 else 0
    largest = jitter * 10.0**limit
    tried = f"{jitter:g} I" if limit == 0 else f"up to {largest:g} I"
    message = (
        f"Cholesky factorisation of {name} + jitter ({M}x{M}, {K.dtype}, jitter tried "
        f"{tried}) failed: the matrix is not numerically positive definite. Likely "
        "causes: duplicate or near-duplicate inducing inputs Z, a lengthscale that "
        "collapsed or grew huge, a very large kernel variance, or float32 with many "
        "inducing points. Remedies: a larger `jitter`, float64 "
        "(jax.config.update('jax_enable_x64', True)), or re-initialising Z."
    )
    return _escalating_cholesky(K, jitter, limit, message)


def jittered_cholesky(
    K: Float[Array, "M M"], jitter: float, name: str = "K_zz"
) -> Float[Array, "M M"]:
    r"""Lower Cholesky factor of :math:`K + \epsilon I` with a fixed jitter and a clear
    error when it fails (:func:`cholesky_with_jitter` without escalation)."""
    return cholesky_with_jitter(K, jitter, name=name, max_escalations=0)[0]


class Conditional(NamedTuple):
    """The whitened conditional at ``N`` inputs with ``M`` inducing points."""

    projection: Float[Array, "N M"]
    r""":math:`A = K_{xz} L^{-\top}`, so that :math:`\mathbb E[f \mid v] = A v`."""
    variance: Float[Array, " N"]
    r""":math:`\operatorname{diag}(K_{xx} - A A^\top) \ge 0`, the variance left given :math:`v`."""
    jitter: Float[Array, ""]
    r"""The jitter :math:`\epsilon` that the factorisation of :math:`K_{zz}` needed."""
    cholesky: Float[Array, "M M"]
    r""":math:`L = \operatorname{chol}(K_{zz} + \epsilon I)`."""
    cross_covariance: Float[Array, "N M"]
    r""":math:`K_{xz}`."""
    prior_variance: Float[Array, " N"]
    r""":math:`\operatorname{diag}(K_{xx})`."""
    cross_covariance_zx: Float[Array, "M N"]
    r""":math:`K_{zx}`, computed in this layout for the matrix-product form of the
    Gaussian ELBO (its products with the data then need no ``(M, N)`` transpose;
    under ``jit`` whichever of the two layouts is unused is never computed)."""
    kernel: Kernel
    """The covariance function, kept (with the two below) so that the ELBO can
    recompute rows of :math:`K_{xz}` block by block instead of holding all ``N``
    (see :mod:`numpyro_svgp._blocks`)."""
    inputs: Float[Array, "N D"]
    """:math:`X`, as checked."""
    inducing: "Float[Array, 'M D'] | InducingFeatures"
    """:math:`Z` as checked, or the inducing features."""


def cross_covariance(
    kernel: Kernel, inducing: "Float[Array, 'M D'] | InducingFeatures", X: Float[Array, "N D"]
) -> Float[Array, "N M"]:
    """:math:`K_{xz}` for inducing points or inducing features."""
    if isinstance(inducing, InducingFeatures):
        return inducing.cross_covariance(kernel, X)
    return kernel(X, inducing)


def cross_covariance_zx(
    kernel: Kernel, inducing: "Float[Array, 'M D'] | InducingFeatures", X: Float[Array, "N D"]
) -> Float[Array, "M N"]:
    """:math:`K_{zx}`, in the ``(M, N)`` layout that the matrix-product form multiplies."""
    if isinstance(inducing, InducingFeatures):
        return inducing.cross_covariance(kernel, X).T
    return kernel(inducing, X)


def _checked_jitter(jitter, dtype) -> float:
    if jitter is None:
        return default_jitter(dtype)
    if not jitter >= 0:
        raise ValueError(f"jitter must be non-negative, got {jitter}.")
    return jitter


def lower_inverse(L: Float[Array, "M M"]) -> Float[Array, "M M"]:
    r"""The explicit :math:`L^{-1}` of a lower-triangular :math:`L` (O(M³), once per step)."""
    return lax.linalg.triangular_solve(
        L, jnp.eye(L.shape[0], dtype=L.dtype), left_side=True, lower=True
    )


def residual_variance(
    prior_variance: Float[Array, " N"], A: Float[Array, "N M"]
) -> Float[Array, " N"]:
    r""":math:`\operatorname{diag}(K_{xx} - A A^\top)`, clamped at 0 per point: round-off can
    leave tiny negative values where :math:`f` is pinned by :math:`Z` (e.g. :math:`Z = X`)."""
    return jnp.maximum(prior_variance - jnp.sum(jnp.square(A), axis=1), 0.0)


def _right_solve_transposed(L: Float[Array, "M M"], K: Float[Array, "N M"]) -> Float[Array, "N M"]:
    r""":math:`K L^{-\top}` for lower-triangular :math:`L`.

    With more rows than inducing points it is a matrix product with the explicit
    :math:`L^{-1}` (O(M³) once, then a GEMM, several times faster on CPU than a
    triangular solve with ``N`` right-hand sides; forward error of the same order,
    :math:`\epsilon\,\kappa(L)`). Otherwise a right-side triangular solve. Both keep
    the result ``(N, M)``, so its row sums run along contiguous memory; reducing over
    the long axis of :math:`L^{-1} K_{zx}` instead is several times slower on XLA:CPU.
    """
    num_points, num_inducing = K.shape
    if num_points >= num_inducing:
        return K @ lower_inverse(L).T
    return lax.linalg.triangular_solve(L, K, left_side=False, lower=True, transpose_a=True)


def whitened_conditional(
    kernel: Kernel,
    X: Float[Array, "N D"],
    Z: "Float[Array, 'M D'] | InducingFeatures",
    *,
    jitter: float | None = None,
    max_jitter_escalations: int = MAX_JITTER_ESCALATIONS,
) -> Conditional:
    r"""Projection and conditional variance of :math:`f(X)` given whitened inducing values.

    .. math:: A = K_{xz} L^{-\top},\quad L = \operatorname{chol}(K_{zz} + \epsilon I),\quad
        \operatorname{var} = \operatorname{diag}(K_{xx}) - \operatorname{rowsum}(A^{\circ 2}).

    :param kernel: the covariance function.
    :param X: inputs, shape ``(N, D)``.
    :param Z: inducing inputs, shape ``(M, D)``, or :class:`~numpyro_svgp.InducingFeatures`
        (then :math:`K_{zz}, K_{xz}` are the features' :math:`K_{uu}, K_{xu}`).
    :param jitter: :math:`\epsilon`; defaults to :func:`default_jitter` of the dtype.
    :param max_jitter_escalations: tenfold jitter increases allowed when the factor
        of :math:`K_{zz}` is not finite (see :func:`cholesky_with_jitter`).
    :return: a :class:`Conditional` ``(projection, variance, jitter, cholesky,
        cross_covariance, prior_variance, cross_covariance_zx, kernel, inputs, inducing)``.
    """
    X = as_float_array("X", X)
    check_matrix("X", X)
    if isinstance(Z, InducingFeatures):
        Z.check_inputs(X)
        X = check_finite("X", X)
        dtype = X.dtype
        jitter = _checked_jitter(jitter, dtype)
        L, jitter_used = Z.cholesky(kernel, dtype, jitter, max_jitter_escalations)
        K_xz = cross_covariance(kernel, Z, X)
        K_zx = K_xz.T
    else:
        Z = as_float_array("Z", Z)
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
        jitter = _checked_jitter(jitter, jnp.result_type(X, Z))
        L, jitter_used = cholesky_with_jitter(
            kernel(Z, Z), jitter, max_escalations=max_jitter_escalations
        )
        K_xz = cross_covariance(kernel, Z, X)
        K_zx = cross_covariance_zx(kernel, Z, X)
    A = _right_solve_transposed(L, K_xz)
    prior_variance = kernel.diag(X)
    variance = residual_variance(prior_variance, A)
    return Conditional(A, variance, jitter_used, L, K_xz, prior_variance, K_zx, kernel, X, Z)


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
    A = conditional.projection
    mean = A @ loc
    return mean, conditional.variance + jnp.sum(jnp.square(A @ scale_tril), axis=-1)
