r"""The bottom layer: Cholesky factors with jitter, and triangular inverses.

Nothing here knows about kernels, inducing variables or NumPyro; every module above
imports from here and this module imports none of them.

:func:`cholesky_with_jitter` factorises :math:`K + \epsilon I` and, only when that factor
is not finite, retries with tenfold larger jitter inside ``jit``. Its derivative is
written out (Murray 2016) so that the search never enters the backward pass.

**Reference**: Murray (2016), *Differentiation of the Cholesky decomposition*,
arXiv:1602.07527.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

__all__ = [
    "MAX_JITTER_ESCALATIONS",
    "after",
    "after_both_ways",
    "blocked_cholesky",
    "cholesky_with_jitter",
    "default_jitter",
    "fail_if",
    "jittered_cholesky",
    "lower_inverse",
    "lower_solve",
    "lower_solve_right",
    "safe_sqrt",
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


def fail_if(x: jax.Array, failed: jax.Array, message: str | None) -> jax.Array:
    """``x`` with an error raised when the compiled program runs if ``failed`` holds; with
    ``message=None``, NaN in place of ``x`` instead (an MCMC proposal out of range is then
    a divergence, see :mod:`numpyro_svgp._checks`)."""
    if message is None:
        return jnp.where(failed, jnp.asarray(jnp.nan, x.dtype), x)
    return eqx.error_if(x, failed, message)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _escalating_cholesky(
    K: Float[Array, "M M"], jitter: float, limit: int, message: str
) -> tuple[Float[Array, "M M"], Float[Array, ""]]:
    """``(chol(K + used I), used)``, ``used`` the first of ``jitter * 10**k``,
    ``k = 0..limit``, whose factor is finite (the last one tried if none is; then the
    factor is NaN). See :func:`cholesky_with_jitter`."""
    K = _symmetric(K)
    eye = jnp.eye(K.shape[-1], dtype=K.dtype)

    def factor(k):
        return blocked_cholesky(K + jitter * 10.0**k * eye)

    if limit == 0:
        L = factor(0)
        return fail_if(L, ~_all_finite(L), message), jnp.asarray(jitter, K.dtype)

    def keep_going(state):
        k, L_k = state
        return ~_all_finite(L_k) & (k < limit)

    def next_try(state):
        k = state[0] + 1
        return k, factor(k)

    # A loop rather than a cond around a loop: under vmap (a family of GPs) a cond
    # becomes a select that runs both branches, and two batched LAPACK calls running
    # at once can deadlock XLA:CPU's thread pool (each waits for workers the other holds).
    k, L = lax.while_loop(keep_going, next_try, (0, factor(0)))
    L = fail_if(L, ~_all_finite(L), message)
    return L, jnp.asarray(jitter, K.dtype) * jnp.asarray(10.0, K.dtype) ** k


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
    inner = lower_solve(L, lower_solve_right(L, _symmetric(K_dot)))
    L_dot = lax.dot(L, jnp.tril(inner) / (1.0 + eye), precision=lax.Precision.HIGHEST)
    return (L, used), (L_dot, jnp.zeros_like(used))


def cholesky_with_jitter(
    K: Float[Array, "M M"],
    jitter: float,
    *,
    name: str = "K_zz",
    max_escalations: int = MAX_JITTER_ESCALATIONS,
    on_failure: str = "raise",
) -> tuple[Float[Array, "M M"], Float[Array, ""]]:
    r"""Lower Cholesky factor of :math:`K + \epsilon I` that raises the jitter when it must.

    The factor with :math:`\epsilon` = ``jitter`` is tried first. Only if it is not
    finite are :math:`10\epsilon, 100\epsilon, \dots, 10^{E}\epsilon` tried in turn
    (:math:`E` = ``max_escalations``), inside ``jit``, in a ``lax.while_loop`` that
    stops at the first finite factor: in the common case that is one factorisation.
    The jitter used is piecewise constant in :math:`K`, so the derivative is that of
    :math:`\operatorname{chol}(K + \epsilon_{\text{used}} I)`; it is written out
    (Murray 2016) so that the search never enters the backward pass. A jitter of 0
    is never escalated.

    :param K: a symmetric positive semi-definite matrix.
    :param jitter: the base :math:`\epsilon \ge 0` added to the diagonal.
    :param name: what to call the matrix in the error message.
    :param max_escalations: how many tenfold increases to try; 0 disables escalation.
    :param on_failure: ``"raise"``, or ``"nan"`` for a NaN factor instead of the error
        (an MCMC proposal outside the model's range is then a divergence).
    :return: ``(L, jitter_used)``.
    :raises: (when the compiled program runs) an error naming the matrix, its size
        and dtype, the largest jitter tried and the likely causes, if no factor is finite.

    **Reference**: Murray (2016), *Differentiation of the Cholesky decomposition*,
    arXiv:1602.07527.
    """
    if on_failure not in ("raise", "nan"):
        raise ValueError(f"on_failure must be 'raise' or 'nan', got {on_failure!r}.")
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
    return _escalating_cholesky(K, jitter, limit, message if on_failure == "raise" else None)


def jittered_cholesky(
    K: Float[Array, "M M"], jitter: float, name: str = "K_zz"
) -> Float[Array, "M M"]:
    r"""Lower Cholesky factor of :math:`K + \epsilon I` with a fixed jitter and a clear
    error when it fails (:func:`cholesky_with_jitter` without escalation)."""
    return cholesky_with_jitter(K, jitter, name=name, max_escalations=0)[0]


SOLVE_BLOCK = 128
"""Triangular systems up to this order go to LAPACK whole; larger ones are split."""


def lower_solve(L: Float[Array, "M M"], B: Float[Array, "M K"]) -> Float[Array, "M K"]:
    r""":math:`X = L^{-1} B` for a lower-triangular :math:`L`, by blocks.

    With :math:`L = \begin{pmatrix} L_{11} & 0 \\ L_{21} & L_{22} \end{pmatrix}`,
    :math:`X_1 = L_{11}^{-1} B_1` and :math:`X_2 = L_{22}^{-1}(B_2 - L_{21} X_1)`,
    recursively down to blocks of :data:`SOLVE_BLOCK`, which LAPACK solves. The same
    flops as one solve (forward substitution by blocks, as LAPACK's own), but most of
    them are matrix products, which XLA:CPU runs several times faster than a triangular
    solve; the derivative, built from the same parts, is products and small solves too.
    """
    M = L.shape[0]
    if M <= SOLVE_BLOCK:
        return lax.linalg.triangular_solve(L, B, left_side=True, lower=True)
    h = M // 2
    X1 = lower_solve(L[:h, :h], B[:h])
    X2 = lower_solve(L[h:, h:], B[h:] - L[h:, :h] @ X1)
    return jnp.concatenate([X1, X2], axis=0)


def lower_solve_right(L: Float[Array, "M M"], B: Float[Array, "K M"]) -> Float[Array, "K M"]:
    r""":math:`X = B L^{-\top}` for a lower-triangular :math:`L` (so :math:`X L^\top = B`),
    as :math:`(L^{-1} B^\top)^\top` by :func:`lower_solve`: its blocks are then rows,
    contiguous in memory, where blocks of columns of ``B`` would each be a strided copy."""
    if L.shape[0] <= SOLVE_BLOCK:
        return lax.linalg.triangular_solve(L, B, left_side=False, lower=True, transpose_a=True)
    return lower_solve(L, B.T).T


def blocked_cholesky(K: Float[Array, "M M"]) -> Float[Array, "M M"]:
    r"""The lower Cholesky factor of a symmetric :math:`K`, by blocks (read from its lower
    triangle, as LAPACK reads it).

    :math:`L_{11} = \operatorname{chol}(K_{11})`, :math:`L_{21} = K_{21} L_{11}^{-\top}`
    (:func:`lower_solve_right`), :math:`L_{22} = \operatorname{chol}(K_{22} - L_{21}
    L_{21}^\top)`, recursively down to blocks of :data:`SOLVE_BLOCK`, which LAPACK
    factorises; most of the flops are then matrix products. A matrix that is not
    positive definite gives a factor with NaN in it, as LAPACK's does.
    """
    M = K.shape[0]
    if M <= SOLVE_BLOCK:
        return lax.linalg.cholesky(K, symmetrize_input=False)
    h = M // 2
    L11 = blocked_cholesky(K[:h, :h])
    L21 = lower_solve_right(L11, K[h:, :h])
    L22 = blocked_cholesky(K[h:, h:] - L21 @ L21.T)
    top = jnp.concatenate([L11, jnp.zeros((h, M - h), K.dtype)], axis=1)
    return jnp.concatenate([top, jnp.concatenate([L21, L22], axis=1)], axis=0)


def lower_inverse(L: Float[Array, "M M"]) -> Float[Array, "M M"]:
    r"""The explicit :math:`L^{-1}` of a lower-triangular :math:`L` (O(M³), once per step)."""
    return lower_solve(L, jnp.eye(L.shape[0], dtype=L.dtype))


def _probe(leaf: jax.Array) -> jax.Array:
    """One entry of ``leaf`` as an unsigned 32-bit integer (its bits, for a float)."""
    leaf = jnp.asarray(leaf)
    first = jnp.ravel(leaf)[0] if leaf.size else jnp.zeros((), jnp.uint32)
    if jnp.issubdtype(first.dtype, jnp.complexfloating):
        first = jnp.real(first)
    if jnp.issubdtype(first.dtype, jnp.floating):
        bits = jnp.dtype(f"uint{8 * first.dtype.itemsize}")
        first = lax.bitcast_convert_type(first, bits)
    return first.astype(jnp.uint32)


def _never(leaves) -> jax.Array:
    """``False``, computed from one entry of each leaf in a way XLA cannot fold."""
    k = functools.reduce(jnp.add, (_probe(leaf) for leaf in leaves))
    return k == k + jnp.uint32(1)


def after(x, *deps):
    r"""``x`` bit for bit, in a form that XLA computes only once every array in ``deps`` is.

    Two batched LAPACK calls (a family's Cholesky factors or triangular solves) that no
    data dependence orders may run at the same time on XLA:CPU, and then each can hold
    the threads of XLA's pool that the other waits for, for ever (jaxlib's batched
    LAPACK kernels split the batch over that pool and block until it is done). Passing
    the input of one call through ``after(input, output_of_the_other)`` orders them.

    ``lax.optimization_barrier`` does not do it: XLA:CPU removes the barrier before it
    schedules, and the dependence with it. Here each leaf of ``x`` goes through a select
    on :math:`k = k + 1` in unsigned 32-bit arithmetic, :math:`k` built from one entry
    of every array in ``deps``: never true, so the value is unchanged (NaN and infinities
    included), but not something XLA's simplifier can prove, so the dependence stays.

    :param x: an array or a pytree of arrays.
    :param deps: arrays or pytrees of arrays to wait for.
    :return: ``x``, unchanged.
    """
    leaves = jax.tree.leaves(deps)
    if not leaves:
        return x
    never = _never(leaves)
    return jax.tree.map(lambda a: jnp.where(never, jnp.zeros_like(a), a), x)


def after_both_ways(x, *deps):
    r"""``x`` after ``deps`` (as :func:`after`), and in the derivative the reverse too:
    the cotangents of ``deps`` are computed only once that of ``x`` is.

    Reverse-mode differentiation runs the transposed computations in the opposite
    order, but nothing in the transpose of :func:`after` ties them together: the
    transposed solves of the computation that reads ``x`` and those of the one that
    made ``deps`` may still run at once. Here the cotangent of ``x`` passes through
    unchanged and each floating leaf of ``deps`` receives, besides its own, the
    cotangent :math:`-0`, a select on a condition built from the cotangent of ``x``
    (as in :func:`after`). :math:`c + (-0) = c` bit for bit for every :math:`c`,
    :math:`\pm 0` and NaN included, so values and derivatives are those without it.

    Only inexact (floating or complex) array leaves are differentiated; the other array
    leaves of ``x`` go through :func:`after`, its other leaves (Python numbers, ``None``)
    are left as they are, and ``deps`` count only by their inexact array leaves.

    :param x: an array or a pytree of arrays.
    :param deps: arrays or pytrees of arrays to wait for.
    :return: ``x``, unchanged.
    """
    waits = [d for d in jax.tree.leaves(deps) if eqx.is_inexact_array(d)]
    if not waits:
        return after(x, *deps)
    inexact, rest = eqx.partition(x, eqx.is_inexact_array)
    arrays, static = eqx.partition(rest, eqx.is_array)
    return eqx.combine(_after_both_ways(inexact, waits), after(arrays, *waits), static)


@jax.custom_vjp
def _after_both_ways(x, deps):
    return after(x, deps)


def _after_both_ways_forward(x, deps):
    return after(x, deps), deps


def _after_both_ways_backward(deps, cotangent):
    leaves = jax.tree.leaves(cotangent)
    # 1 on the never-taken side: with -0 on both, XLA would fold the select away
    never = _never(leaves) if leaves else jnp.zeros((), bool)
    waiting = [jnp.where(never, jnp.ones_like(d), -jnp.zeros_like(d)) for d in deps]
    return cotangent, waiting


_after_both_ways.defvjp(_after_both_ways_forward, _after_both_ways_backward)


def safe_sqrt(x: jax.Array) -> jax.Array:
    r""":math:`\sqrt{x}` for :math:`x \ge 0` with a finite derivative (0) where :math:`x = 0`.

    The inner select keeps :math:`d\sqrt{x}/dx` from being evaluated at 0 (an infinite
    derivative times a zero cotangent is NaN).
    """
    positive = x > 0
    return lax.select(
        positive, jnp.sqrt(lax.select(positive, x, jnp.ones_like(x))), jnp.zeros_like(x)
    )
