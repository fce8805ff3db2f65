r"""Initial inducing inputs: k-means centres or a greedy variance-reduction choice.

Both are one line::

    Z_init = ns.kmeans_inducing(jax.random.PRNGKey(0), X, 100)
    Z_init = ns.greedy_variance_inducing(ns.kernels.RBF(1.0, 0.5), X, 100)

**References**

1. Lloyd (1982), *Least squares quantization in PCM*; Arthur & Vassilvitskii (2007),
   *k-means++: the advantages of careful seeding*.
2. Burt, Rasmussen & van der Wilk (2020), *Convergence of sparse variational
   inference in Gaussian processes regression*, JMLR (greedy variance selection,
   i.e. a partial pivoted Cholesky of :math:`K_{xx}`).
"""

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax, random
from jaxtyping import Array, Float

from numpyro_svgp._checks import as_float_array, check_finite, check_matrix
from numpyro_svgp.kernels import Kernel

__all__ = ["kmeans_inducing", "greedy_variance_inducing"]


def _inputs(X, num_inducing):
    X = check_finite("X", as_float_array("X", X))
    check_matrix("X", X)
    if not 1 <= num_inducing <= X.shape[0]:
        raise ValueError(
            f"num_inducing must be between 1 and the number of points ({X.shape[0]}), "
            f"got {num_inducing}."
        )
    return X


def _nearest_centre(X, centres, chunk_size):
    """Index of the nearest centre for every row of X, ``chunk_size`` rows at a time."""
    n = X.shape[0]
    pad = (-n) % chunk_size
    chunks = jnp.pad(X, ((0, pad), (0, 0))).reshape(-1, chunk_size, X.shape[1])
    c2 = jnp.sum(centres**2, axis=1)

    def assign(chunk):
        # |x - c|^2 up to the |x|^2 term, which does not change the argmin
        return jnp.argmin(c2[None, :] - 2.0 * chunk @ centres.T, axis=1)

    return lax.map(assign, chunks).reshape(-1)[:n]


def kmeans_inducing(
    key: jax.Array,
    X: Float[Array, "N D"],
    num_inducing: int,
    *,
    num_iters: int = 25,
    chunk_size: int = 4096,
) -> Float[Array, "M D"]:
    r"""k-means centres of ``X`` (Lloyd's algorithm), a standard SVGP initialisation.

    Starts from k-means++ seeding (Arthur & Vassilvitskii 2007) and runs
    ``num_iters`` Lloyd iterations inside ``jit``; a centre that loses all its points
    stays where it was. Assignments are computed ``chunk_size`` rows at a time, so memory is
    :math:`O(\text{chunk} \cdot M)`, not :math:`O(N M)`.

    :param key: a JAX random key for the initial centres.
    :param X: inputs ``(N, D)``.
    :param int num_inducing: :math:`M \le N`.
    :param int num_iters: Lloyd iterations.
    :param int chunk_size: rows per assignment block.
    :return: the centres, ``(M, D)``.
    """
    X = _inputs(X, num_inducing)
    return _kmeans(key, X, num_inducing, num_iters, min(chunk_size, X.shape[0]))


def _kmeans_plus_plus(key, X, num_inducing):
    """k-means++ seeding: each new centre drawn with probability ∝ squared distance
    to the nearest centre so far (Arthur & Vassilvitskii 2007)."""
    keys = random.split(key, num_inducing)
    first = X[random.randint(keys[0], (), 0, X.shape[0])]
    d2 = jnp.sum((X - first) ** 2, axis=1)
    centres = jnp.zeros((num_inducing, X.shape[1]), X.dtype).at[0].set(first)

    def add(m, state):
        centres, d2 = state
        logits = jnp.where(d2 > 0, jnp.log(jnp.where(d2 > 0, d2, 1.0)), -jnp.inf)
        # if every point is already a centre, fall back to a uniform draw
        logits = jnp.where(jnp.any(d2 > 0), logits, 0.0)
        new = X[random.categorical(keys[m], logits)]
        return centres.at[m].set(new), jnp.minimum(d2, jnp.sum((X - new) ** 2, axis=1))

    return lax.fori_loop(1, num_inducing, add, (centres, d2))[0]


@partial(jax.jit, static_argnums=(2, 3, 4))
def _kmeans(key, X, num_inducing, num_iters, chunk_size):
    start = _kmeans_plus_plus(key, X, num_inducing)

    def lloyd(_, centres):
        labels = _nearest_centre(X, centres, chunk_size)
        sums = jax.ops.segment_sum(X, labels, num_segments=num_inducing)
        counts = jax.ops.segment_sum(
            jnp.ones(X.shape[0], X.dtype), labels, num_segments=num_inducing
        )
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], centres)

    return lax.fori_loop(0, num_iters, lloyd, start)


def greedy_variance_inducing(
    kernel: Kernel, X: Float[Array, "N D"], num_inducing: int
) -> Float[Array, "M D"]:
    r"""Rows of ``X`` chosen greedily by largest remaining variance (partial pivoted Cholesky).

    At each step the point with the largest conditional variance
    :math:`d_n = k(x_n, x_n) - Q_{nn}` given the points chosen so far is added, and
    :math:`d` is updated with one new row of the incomplete Cholesky factor. After
    :math:`M` steps :math:`\sum_n d_n = \operatorname{tr}(K_{xx} - Q_{xx})`, the term
    that separates the Titsias bound from the exact evidence, which this choice
    drives down greedily (Burt et al. 2020). Cost :math:`O(N M^2)`, memory :math:`O(N M)`.

    :param kernel: the covariance function (its hyperparameters set the notion of "far").
    :param X: inputs ``(N, D)``.
    :param int num_inducing: :math:`M \le N`.
    :return: the chosen rows of ``X``, ``(M, D)``, in the order chosen.
    """
    X = _inputs(X, num_inducing)
    return X[_greedy_indices(kernel, X, num_inducing)]


@partial(jax.jit, static_argnums=(2,))
def _greedy_indices(kernel, X, num_inducing):
    n = X.shape[0]

    def pick(m, state):
        rows, residual, taken, chosen = state
        i = jnp.argmax(jnp.where(taken, -jnp.inf, residual))
        k_i = kernel(X[i][None, :], X)[0]
        d_i = residual[i]
        # d_i = 0 only when every point left is already explained (duplicates)
        new = jnp.where(
            d_i > 0, (k_i - rows.T @ rows[:, i]) / jnp.sqrt(jnp.where(d_i > 0, d_i, 1.0)), 0.0
        )
        residual = jnp.maximum(residual - new**2, 0.0)
        return rows.at[m].set(new), residual, taken.at[i].set(True), chosen.at[m].set(i)

    state = (
        jnp.zeros((num_inducing, n), X.dtype),
        kernel.diag(X),
        jnp.zeros(n, bool),
        jnp.zeros(num_inducing, jnp.result_type(int)),
    )
    return lax.fori_loop(0, num_inducing, pick, state)[3]
