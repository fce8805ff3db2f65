r"""The Gaussian data term of the ELBO: one entry point, four forms.

For a Gaussian likelihood :math:`y_n \sim \mathcal N(f_n, \sigma^2_n)` with weights
:math:`c_n` (a mini-batch's ``N / B``, a ``scale`` handler), the data term

.. math:: \sum_n c_n\, \mathbb E_{q(f_n)}\big[\log \mathcal N(y_n \mid f_n, \sigma^2_n)\big]

is closed form (Hensman, Fusi & Lawrence 2013, eq. 7).
:func:`gaussian_expected_log_likelihood` computes it in one of two forms, each taken
whole or in blocks of rows:

- ``"per_point"``: the marginals :math:`q(f_n)` from :math:`A = K_{xu} L^{-\top}`,
  then :func:`expected_log_likelihood` summed;
- ``"matrix"``: the same sum through :math:`K_{ux} \operatorname{diag}(w) K_{xu}`, one GEMM
  of O(N M²) flops (float64 only by default: its round-off grows with
  :math:`\kappa(K_{uu})` rather than :math:`\kappa(L)`);
- in blocks of rows (``block_rows``), no ``(N, M)`` array is ever held
  (see :mod:`numpyro_svgp._blocks`).

``"auto"`` chooses as :func:`use_matrix_form` and :func:`~numpyro_svgp._blocks.block_rows` say;
:class:`~numpyro_svgp.SVGP_ELBO` exposes both choices as options.
"""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular
from jaxtyping import Array, Float

from numpyro_svgp._blocks import block_rows as auto_block_rows
from numpyro_svgp._blocks import from_blocks, is_primal, split_rows, sum_over_blocks
from numpyro_svgp._conditional import Conditional, predictive_moments, residual_variance
from numpyro_svgp._linalg import lower_inverse

__all__ = [
    "FORMS",
    "expected_log_likelihood",
    "gaussian_expected_log_likelihood",
    "resolve_block_rows",
    "resolve_form",
    "use_matrix_form",
]

FORMS = ("auto", "matrix", "per_point")
"""The values of the ``form`` option."""

MATRIX_FORM_ROUNDOFF = 0.1
"""Under ``form="auto"``, a ``RuntimeWarning`` is given when the matrix form's estimated
round-off (in nats, see :func:`gaussian_expected_log_likelihood`) exceeds this."""


def expected_log_likelihood(y, mean, var, noise_var) -> jax.Array:
    r"""Elementwise :math:`\mathbb E_{f \sim \mathcal N(\mu, \sigma^2_f)}\big[\log
    \mathcal N(y \mid f, \sigma^2_y)\big]`.

    .. math:: -\tfrac12 \log(2\pi\sigma^2_y) - \frac{(y - \mu)^2 + \sigma^2_f}{2\sigma^2_y}.

    :param y: observations.
    :param mean: :math:`\mu`, the mean of :math:`q(f)`.
    :param var: :math:`\sigma^2_f`, the variance of :math:`q(f)`.
    :param noise_var: the likelihood's variance :math:`\sigma^2_y`.
    :return: an array of the broadcast shape of the inputs.
    """
    return -0.5 * (jnp.log(2 * jnp.pi * noise_var) + (jnp.square(y - mean) + var) / noise_var)


def use_matrix_form(num_points: int, num_inducing: int, dtype) -> bool:
    r"""Whether :class:`SVGP_ELBO` takes :func:`gaussian_expected_log_likelihood`'s
    matrix-product form for a Gaussian site: in float64, when the data outnumber
    the inducing points by 2 or more (there it is the fastest form; see
    ``benchmarks/step_time.py``). Not below float64: the form goes through
    :math:`L^{-1} K_{zx} K_{xz} L^{-\top}`, whose round-off grows with
    :math:`\kappa(K_{zz})` rather than :math:`\kappa(L)`, which float32 cannot carry
    at the jitters a float32 :math:`K_{zz}` needs."""
    return bool(num_points >= 2 * num_inducing and jnp.finfo(dtype).eps < 1e-10)


def _weighted_gram(
    K_zx: Float[Array, "M N"], w: Float[Array, "*N"], u: Float[Array, " N"]
) -> tuple[Float[Array, "M M"], Float[Array, " M"]]:
    r""":math:`(K_{zx} \operatorname{diag}(w) K_{xz},\ K_{zx} u)` for a scalar or ``(N,)``
    weight ``w``.

    The derivative is written by hand because of its cost: for a cotangent
    :math:`\bar P`, :math:`\bar K_{zx} = (\bar P + \bar P^\top) K_{zx} \operatorname{diag}(w)
    + \bar r u^\top` is one O(N M²) product, where the transpose of
    ``K_zx @ K_zx.T`` that JAX derives takes two (one per factor).
    """
    return _split_gram(_stacked_gram(K_zx, w, u))


def _split_gram(stacked: Float[Array, "M M+1"]) -> tuple[Float[Array, "M M"], Float[Array, " M"]]:
    r"""``(P, r)`` from the ``[P | r]`` that the custom-derivative functions return.

    Those functions return one array, not the pair: JAX batches a custom VJP's outputs
    one by one, so under ``vmap`` (numpyro's vectorised particles) :math:`P` can be
    unbatched (the kernel and noise are params) while :math:`r` is batched (it carries
    ``y`` minus a latent offset). The backward rule then receives :math:`\bar P` already
    summed over the batch, adds it to every element's own :math:`\bar r u^\top`, and
    the sum over the batch counts :math:`\bar P`'s share once per particle: a gradient
    that is wrong while the value is right. One output is batched whenever any input is.
    """
    return stacked[:, :-1], stacked[:, -1]


@jax.custom_vjp
def _stacked_gram(
    K_zx: Float[Array, "M N"], w: Float[Array, "*N"], u: Float[Array, " N"]
) -> Float[Array, "M M+1"]:
    return _gram_forward(K_zx, w, u)[0]


def _gram_forward(K_zx, w, u):
    r = (K_zx @ u)[:, None]
    if jnp.ndim(w) == 0:
        gram = K_zx @ K_zx.T
        return jnp.concatenate([w * gram, r], axis=1), (K_zx, w, u, gram)
    return jnp.concatenate([(K_zx * w) @ K_zx.T, r], axis=1), (K_zx, w, u, None)


def _gram_backward(residuals, cotangent):
    K_zx, w, u, gram = residuals
    P_bar, r_bar = _split_gram(cotangent)
    G = (P_bar + P_bar.T) @ K_zx
    if gram is None:
        # dP/dw_n = k_n k_nᵀ; a sum over M as a GEMV, not a slow column reduction
        w_bar = 0.5 * (jnp.ones(K_zx.shape[0], K_zx.dtype) @ (G * K_zx))
        K_bar = G * w
    else:
        w_bar = jnp.sum(P_bar * gram)
        K_bar = w * G
    return K_bar + jnp.outer(r_bar, u), w_bar, r_bar @ K_zx


_stacked_gram.defvjp(_gram_forward, _gram_backward)


def _blocked_weighted_gram(
    conditional: Conditional, w: Float[Array, "*N"], u: Float[Array, " N"], rows: int
) -> tuple[Float[Array, "M M"], Float[Array, " M"]]:
    r""":func:`_weighted_gram` of :math:`K_{zx}`, with :math:`K_{zx}` formed ``rows`` data
    points at a time from the conditional's kernel and inputs (see :mod:`numpyro_svgp._blocks`).

    The derivative takes a second pass over the blocks: each block's :math:`K_{zx}` is
    formed again and pulled back with :math:`\bar K_{zx} = (\bar P + \bar P^\top)
    K_{zx} \operatorname{diag}(w) + \bar r u^\top`, which needs the whole :math:`\bar P`
    (so it cannot share the first pass). Re-forming a block is O(rows · M · D), small
    beside the O(rows · M²) products; the inputs' own gradient is taken only where
    they are differentiated (e.g. the outputs of a network).
    """
    dynamic, static = eqx.partition((conditional.kernel, conditional.inducing), eqx.is_array)
    X = conditional.inputs
    num_points = X.shape[0]
    per_point = jnp.ndim(w) == 1

    def cross(dynamic, X_block):
        kernel, inducing = eqx.combine(dynamic, static)
        return inducing.cross_covariance_ux(kernel, X_block)

    def per_row(X, w, u):
        return {"X": X, "u": u, "w": w} if per_point else {"X": X, "u": u}

    def gram(dynamic, X, w, u):
        """The unweighted (scalar w) or weighted (per-point w) sums over blocks."""

        def block(b):
            K = cross(dynamic, b["X"])
            return (K * b["w"] if per_point else K) @ K.T, K @ b["u"]

        blocks, rest = split_rows(per_row(X, w, u), num_points, rows)
        num_inducing = conditional.cholesky.shape[0]
        init = (jnp.zeros((num_inducing, num_inducing), u.dtype), jnp.zeros(num_inducing, u.dtype))
        (P, r), _ = jax.lax.scan(
            lambda acc, b: (jax.tree.map(jnp.add, acc, block(b)), None), init, blocks
        )
        if rest is not None:
            P, r = jax.tree.map(jnp.add, (P, r), block(rest))
        return P, r

    # one output, not the pair (P, r): see _split_gram
    @jax.custom_vjp
    def weighted_gram(dynamic, X, w, u):
        P, r = gram(dynamic, X, w, u)
        return jnp.concatenate([P if per_point else w * P, r[:, None]], axis=1)

    def forward(dynamic, X, w, u):
        X_value = X.value
        values = jax.tree.map(lambda p: p.value, (dynamic, w, u), is_leaf=is_primal)
        dynamic, w, u = values
        P, r = gram(dynamic, X_value, w, u)
        # the structure of the residuals says whether X needs a gradient
        X_needed = jnp.zeros(()) if X.perturbed else None
        stacked = jnp.concatenate([P if per_point else w * P, r[:, None]], axis=1)
        return stacked, (dynamic, X_value, w, u, P, X_needed)

    def backward(residuals, cotangent):
        dynamic, X, w, u, P, X_needed = residuals
        if _is_zero(cotangent):
            cotangent = jnp.zeros((P.shape[0], P.shape[0] + 1), P.dtype)
        P_bar, r_bar = _split_gram(cotangent)
        H = P_bar + P_bar.T if per_point else w * (P_bar + P_bar.T)

        def block(b):
            if X_needed is None:
                K, pull = jax.vjp(lambda d: cross(d, b["X"]), dynamic)
            else:
                K, pull = jax.vjp(cross, dynamic, b["X"])
            G = H @ K
            K_bar = (G * b["w"] if per_point else G) + jnp.outer(r_bar, b["u"])
            grads = pull(K_bar)
            out = {"u": r_bar @ K, "X": grads[1] if X_needed is not None else None}
            if per_point:
                # dP/dw_n = k_n k_n^T; a sum over M as a GEMV, not a slow column reduction
                out["w"] = 0.5 * (jnp.ones(K.shape[0], K.dtype) @ (G * K))
            return grads[0], out

        blocks, rest = split_rows(per_row(X, w, u), num_points, rows)

        def body(acc, b):
            d_dynamic, out = block(b)
            return jax.tree.map(jnp.add, acc, d_dynamic), out

        d_dynamic, outs = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, dynamic), blocks)
        outs = jax.tree.map(from_blocks, outs)
        if rest is not None:
            d_rest, out_rest = block(rest)
            d_dynamic = jax.tree.map(jnp.add, d_dynamic, d_rest)
            outs = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), outs, out_rest)
        w_bar = outs["w"] if per_point else jnp.sum(P_bar * P)
        return d_dynamic, outs["X"], w_bar, outs["u"]

    weighted_gram.defvjp(forward, backward, symbolic_zeros=True)
    return _split_gram(weighted_gram(dynamic, X, w, u))


def _is_zero(x) -> bool:
    return isinstance(x, jax.custom_derivatives.SymbolicZero)


def resolve_form(form: str, num_points: int, num_inducing: int, dtype) -> str:
    """``"matrix"`` or ``"per_point"`` for the option ``form`` (``"auto"``:
    :func:`use_matrix_form`)."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}.")
    if form == "auto":
        return "matrix" if use_matrix_form(num_points, num_inducing, dtype) else "per_point"
    return form


def resolve_block_rows(rows, num_points: int, num_inducing: int) -> int | None:
    """Rows per block for the option ``block_rows``: ``"auto"`` as
    :func:`~numpyro_svgp._blocks.block_rows`, ``None`` for the data whole, or an int."""
    if rows == "auto":
        return auto_block_rows(num_points, num_inducing)
    if rows is None:
        return None
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"block_rows must be 'auto', None or a positive int, got {rows!r}.")
    return rows if rows < num_points else None


def gaussian_expected_log_likelihood(
    conditional: Conditional,
    loc: Float[Array, " M"],
    scale_tril: Float[Array, "M M"],
    y: Float[Array, " N"],
    noise_var: Float[Array, "*N"],
    weight: Float[Array, "*N"] | None = None,
    *,
    form: str = "auto",
    block_rows: "int | str | None" = "auto",
) -> Float[Array, ""]:
    r"""The summed expected log-likelihood of a Gaussian likelihood under the SVGP,
    :math:`\sum_n c_n\, \mathbb E_{q(f_n)}[\log \mathcal N(y_n \mid f_n, \sigma^2_n)]`.

    Every form gives the same number (up to round-off). In the matrix-product form,
    with :math:`w_n = c_n / \sigma^2_n`, :math:`P = K_{ux} \operatorname{diag}(w) K_{xu}`,
    :math:`T = L^{-1} P L^{-\top}` and :math:`\tilde\Sigma = m m^\top + S S^\top - I`,

    .. math::

        -\tfrac12 \sum_n c_n \log(2\pi\sigma^2_n)
        - \tfrac12\Big(\sum_n w_n (y_n^2 + k_{nn})
        - 2\, m^\top L^{-1} K_{ux} (w \circ y) + \operatorname{tr}(T \tilde\Sigma)\Big),

    which is the sum of :func:`expected_log_likelihood` over :math:`n` (expand
    :math:`(y_n - a_n^\top m)^2 + k_{nn} - a_n^\top a_n + a_n^\top S S^\top a_n`). The
    summed conditional variance :math:`\sum_n w_n (k_{nn} - a_n^\top a_n)` is clamped at
    0, as the per-point form clamps each term: round-off can make the difference of
    the two sums negative, which a shrinking noise variance would turn into a spurious gain.

    The matrix form's round-off grows with :math:`\kappa(K_{uu})`, not
    :math:`\kappa(L)`: its error in :math:`T` is about
    :math:`\varepsilon \operatorname{tr}(P) / \lambda_{\min}(K_{uu})`, taken against
    :math:`\tilde\Sigma`. Under ``form="auto"`` it is estimated in the program as
    :math:`\varepsilon \operatorname{tr}(P)\,(\|m\|^2 + \|S\|_F^2 + M) / \min_i L_{ii}^2`,
    and where that exceeds :data:`MATRIX_FORM_ROUNDOFF` nats (large kernel variances
    with long lengthscales, as unnormalised data give) a ``RuntimeWarning`` names
    ``form="per_point"``, whose round-off grows with :math:`\kappa(L)` only.

    :param conditional: the output of :func:`~numpyro_svgp.whitened_conditional`.
    :param loc: :math:`m`, shape ``(M,)``.
    :param scale_tril: :math:`S`, shape ``(M, M)``.
    :param y: observations, shape ``(N,)``.
    :param noise_var: :math:`\sigma^2_n`, a scalar or shape ``(N,)``.
    :param weight: :math:`c_n` (e.g. ``N_total / B`` for a mini-batch), ``None`` (1),
        a scalar or shape ``(N,)``.
    :param form: ``"matrix"``, ``"per_point"`` or ``"auto"`` (matrix product in float64
        when ``N >= 2 M``, see :func:`use_matrix_form`; a warning where its round-off
        estimate is too large, above).
    :param block_rows: rows per block, ``None`` for the data whole, or ``"auto"``
        (blocks of about 2¹⁸ entries on CPU, 2²⁷ on an accelerator, once the data hold
        two of them and ``N >= 4 M``).
    """
    num_points, num_inducing = conditional.num_points, conditional.num_inducing
    dtype = conditional.dtype
    resolved = resolve_form(form, num_points, num_inducing, dtype)
    rows = resolve_block_rows(block_rows, num_points, num_inducing)
    if jnp.shape(y) != (num_points,):
        raise ValueError(f"y must have shape ({num_points},), got {jnp.shape(y)}.")
    for name, value in (("noise_var", noise_var), ("weight", weight)):
        if value is not None and jnp.shape(value) not in ((), (1,), (num_points,)):
            raise ValueError(
                f"{name} must be a scalar or of shape ({num_points},), got {jnp.shape(value)}."
            )
    noise_var = _per_row_or_scalar(noise_var, num_points)
    weight = None if weight is None else _per_row_or_scalar(weight, num_points)
    arguments = (conditional, loc, scale_tril, y, noise_var, weight, rows)
    if resolved == "per_point":
        return _per_point_form(*arguments)
    value, roundoff = _matrix_form(*arguments)
    if form == "auto":
        # a branch that holds only the warning: a cond choosing between the two forms
        # made every step 2-3 times slower (the gradient carries both branches' residuals)
        jax.lax.cond(
            roundoff > MATRIX_FORM_ROUNDOFF,
            lambda r: jax.debug.callback(_warn_roundoff, r),
            lambda r: None,
            roundoff,
        )
    return value


def _warn_roundoff(roundoff) -> None:
    # under vmap the cond becomes a select and runs its branches for every estimate
    roundoff = np.max(np.asarray(roundoff))
    if not roundoff > MATRIX_FORM_ROUNDOFF:
        return
    # one text whatever the estimate, so that Python's filter shows it once, not per step
    warnings.warn(
        "SVGP_ELBO: the Gaussian data term's matrix form (the float64 default for N >= 2 M) "
        f"may be off by more than {MATRIX_FORM_ROUNDOFF} nats at these hyperparameters: "
        "K_uu is far from white (a large kernel variance with long lengthscales, as "
        "unnormalised data give). Pass SVGP_ELBO(gaussian_form='per_point'), or standardise y.",
        RuntimeWarning,
        stacklevel=2,
    )


def _per_point_form(conditional, loc, scale_tril, y, noise_var, weight, rows):
    if rows is None:
        mean, var = predictive_moments(conditional, loc, scale_tril)
        ell = expected_log_likelihood(y, mean, var, noise_var)
        return jnp.sum(ell if weight is None else weight * ell)
    return _blocked_per_point(conditional, loc, scale_tril, y, noise_var, weight, rows)


def _per_row_or_scalar(value, num_points: int):
    value = jnp.asarray(value)
    return (
        jnp.reshape(value, ()) if jnp.size(value) == 1 else jnp.broadcast_to(value, (num_points,))
    )


def _matrix_form(conditional, loc, scale_tril, y, noise_var, weight, rows):
    L, num_points = conditional.cholesky, conditional.num_points
    weight = jnp.ones((), y.dtype) if weight is None else weight
    w = weight / noise_var
    log_norm = jnp.sum(jnp.broadcast_to(weight * jnp.log(2 * jnp.pi * noise_var), (num_points,)))
    wy = w * y
    if rows is None:
        K_zx = conditional.inducing.cross_covariance_ux(conditional.kernel, conditional.inputs)
        P, r = _weighted_gram(K_zx, w, wy)
    else:
        P, r = _blocked_weighted_gram(conditional, w, wy, rows)
    b = solve_triangular(L, r, lower=True)
    T = solve_triangular(L, solve_triangular(L, P, lower=True).T, lower=True)
    q_cov = jnp.outer(loc, loc) + scale_tril @ scale_tril.T
    prior_variance = conditional.kernel.diag(conditional.inputs)
    residual = jnp.maximum(jnp.sum(w * prior_variance) - jnp.trace(T), 0.0)
    quadratic = jnp.sum(wy * y) + residual - 2.0 * (loc @ b) + jnp.sum(T * q_cov)
    # |dT| <~ eps tr(P) / lambda_min(K_uu), lambda_min estimated by the factor's smallest
    # pivot; the terms take dT against m m^T + S S^T - I
    smallest_pivot = jnp.min(jnp.abs(jnp.diagonal(L)))
    roundoff = (
        jnp.finfo(L.dtype).eps
        * jnp.trace(P)
        / jnp.square(smallest_pivot)
        * (jnp.sum(jnp.square(loc)) + jnp.sum(jnp.square(scale_tril)) + loc.shape[0])
    )
    return -0.5 * (log_norm + quadratic), jax.lax.stop_gradient(roundoff)


def _blocked_per_point(conditional, loc, scale_tril, y, noise_var, weight, rows):
    r"""The per-point form summed over blocks of ``rows`` data points: each block's
    :math:`K_{xu}` and :math:`A` are formed from the kernel and inputs, with
    :math:`L^{-1}` formed once (see :mod:`numpyro_svgp._blocks`)."""
    shared = {
        "kernel": conditional.kernel,
        "inducing": conditional.inducing,
        "projector": lower_inverse(conditional.cholesky).T,
        "loc": loc,
        "scale_tril": scale_tril,
    }
    per_row = {"X": conditional.inputs, "y": y}
    for name, value in (("noise_var", noise_var), ("weight", weight)):
        if value is None:
            continue
        (shared if jnp.ndim(value) == 0 else per_row)[name] = value
    return sum_over_blocks(_gaussian_block, shared, per_row, rows)


def _gaussian_block(shared, per_row) -> jax.Array:
    X = per_row["X"]
    A = shared["inducing"].cross_covariance(shared["kernel"], X) @ shared["projector"]
    # the marginal variance of predictive_moments
    variance = residual_variance(shared["kernel"].diag(X), A)
    variance = variance + jnp.sum(jnp.square(A @ shared["scale_tril"]), axis=1)
    noise_var = per_row["noise_var"] if "noise_var" in per_row else shared["noise_var"]
    ell = expected_log_likelihood(per_row["y"], A @ shared["loc"], variance, noise_var)
    weight = per_row.get("weight", shared.get("weight"))
    return jnp.sum(ell if weight is None else weight * ell)
