r"""Closed-form references for a Gaussian likelihood: the Titsias (2009) collapsed
bound and the exact GP log marginal likelihood.

For :math:`y = f(X) + \epsilon`, :math:`\epsilon \sim \mathcal N(0, \sigma^2 I)`, the
SVGP ELBO maximised over :math:`q(v)` equals the collapsed bound

.. math::

    \mathcal L_{\rm T} = \log \mathcal N\big(y \mid 0,\ Q_{xx} + \sigma^2 I\big)
        - \frac{1}{2\sigma^2}\operatorname{tr}(K_{xx} - Q_{xx}),
    \qquad Q_{xx} = A A^\top = K_{xz}(K_{zz} + \epsilon I)^{-1} K_{zx},

which is at most :math:`\log p(y) = \log \mathcal N(y \mid 0, K_{xx} + \sigma^2 I)` and
equals it (up to jitter) when :math:`Z = X`. These are what a fitted SVGP is
checked against.
"""

import jax.numpy as jnp
from jax.scipy.linalg import cho_solve, solve_triangular
from jaxtyping import Array, Float

from numpyro_svgp._checks import as_float_array, check_finite, check_positive
from numpyro_svgp._conditional import (
    compiled,
    conditional_variance,
    projection,
    whitened_conditional,
)
from numpyro_svgp._linalg import jittered_cholesky
from numpyro_svgp.kernels import Kernel

__all__ = ["titsias_bound", "exact_log_marginal_likelihood"]


def _check_length(y, num_points: int) -> None:
    if y.shape != (num_points,):
        raise ValueError(f"y must have shape ({num_points},) to match X, got {y.shape}.")


def titsias_bound(
    kernel: Kernel,
    X: Float[Array, "N D"],
    y: Float[Array, " N"],
    Z: Float[Array, "M D"],
    noise_var,
    *,
    jitter: float | None = None,
) -> Float[Array, ""]:
    r"""The collapsed variational bound of Titsias (2009) for a Gaussian likelihood.

    Computed in :math:`O(N M^2)` with the matrix inversion lemma on
    :math:`B = I_M + A^\top A / \sigma^2`.

    :param kernel: the covariance function.
    :param X: inputs ``(N, D)``.
    :param y: targets ``(N,)``.
    :param Z: inducing inputs ``(M, D)``.
    :param noise_var: :math:`\sigma^2 > 0`.
    :param jitter: added to :math:`K_{zz}`, as in :func:`~numpyro_svgp.svgp`.
    """
    # checked here, before the compiled program, so that bad values raise at once
    y = check_finite("y", as_float_array("y", y))
    noise_var = check_positive("noise_var", noise_var)
    return _titsias_bound(kernel, X, y, Z, noise_var, jitter)


@compiled
def _titsias_bound(kernel, X, y, Z, noise_var, jitter):
    conditional = whitened_conditional(kernel, X, Z, jitter=jitter)
    A = projection(conditional)
    cond_var = conditional_variance(conditional, A)
    _check_length(y, A.shape[0])  # y's values were checked before the compiled program
    num_points, num_inducing = A.shape
    B = jnp.eye(num_inducing, dtype=A.dtype) + A.T @ A / noise_var
    L_B = jittered_cholesky(B, 0.0, name="I + A^T A / noise_var")
    c = solve_triangular(L_B, A.T @ y, lower=True) / noise_var
    log_marginal = -0.5 * (
        num_points * jnp.log(2 * jnp.pi * noise_var)
        + 2 * jnp.sum(jnp.log(jnp.diagonal(L_B)))
        + jnp.dot(y, y) / noise_var
        - jnp.dot(c, c)
    )
    return log_marginal - 0.5 * jnp.sum(cond_var) / noise_var


def exact_log_marginal_likelihood(
    kernel: Kernel, X: Float[Array, "N D"], y: Float[Array, " N"], noise_var
) -> Float[Array, ""]:
    r"""The exact GP log marginal likelihood :math:`\log \mathcal N(y \mid 0, K_{xx} + \sigma^2 I)`,
    in :math:`O(N^3)` (Rasmussen & Williams 2006, eq. 2.30).

    :param kernel: the covariance function.
    :param X: inputs ``(N, D)``.
    :param y: targets ``(N,)``.
    :param noise_var: :math:`\sigma^2 > 0`.
    """
    X = check_finite("X", as_float_array("X", X))
    y = check_finite("y", as_float_array("y", y))
    _check_length(y, X.shape[0])
    noise_var = check_positive("noise_var", noise_var)
    return _exact_log_marginal_likelihood(kernel, X, y, noise_var)


@compiled
def _exact_log_marginal_likelihood(kernel, X, y, noise_var):
    K = kernel(X, X)
    L = jittered_cholesky(K, noise_var, name="K_xx + noise_var I")
    alpha = cho_solve((L, True), y)
    return -0.5 * (
        jnp.dot(y, alpha) + 2 * jnp.sum(jnp.log(jnp.diagonal(L))) + K.shape[0] * jnp.log(2 * jnp.pi)
    )
