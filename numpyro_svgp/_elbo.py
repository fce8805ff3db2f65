r"""The SVGP evidence lower bound: its closed-form terms and the ``SVGP_ELBO`` estimator.

For whitened inducing values with :math:`q(v) = \mathcal N(m, S S^\top)` and prior
:math:`\mathcal N(0, I_M)`,

.. math::

    \mathcal L = \sum_n \mathbb E_{q(f_n)}[\log p(y_n \mid f_n)]
        - \mathrm{KL}\big(q(v)\,\|\,p(v)\big),

where :math:`q(f_n) = \mathcal N(\mu_n, \sigma^2_n)` are the marginals of
:func:`~numpyro_svgp.predictive_moments`. For a Gaussian likelihood the
expectation is closed form (Hensman, Fusi & Lawrence 2013, eq. 7), which makes the
whole bound deterministic.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import random
from jax.scipy.linalg import solve_triangular
from jaxtyping import Array, Float
from numpyro.distributions import ExpandedDistribution, Independent, MultivariateNormal, Normal
from numpyro.distributions.kl import kl_divergence
from numpyro.handlers import replay, seed, substitute, trace
from numpyro.infer.elbo import ELBO
from numpyro.util import check_model_guide_match

from numpyro_svgp._blocks import block_rows, from_blocks, is_primal, split_rows, sum_over_blocks
from numpyro_svgp._checks import check_observed_site
from numpyro_svgp._conditional import (
    Conditional,
    cross_covariance,
    cross_covariance_zx,
    lower_inverse,
    predictive_moments,
    residual_variance,
)
from numpyro_svgp._svgp import svgp_site

__all__ = ["kl", "expected_log_likelihood", "gaussian_expected_log_likelihood", "SVGP_ELBO"]


def kl(loc: jax.Array, scale_tril: jax.Array) -> jax.Array:
    r""":math:`\mathrm{KL}\big(\mathcal N(m, S S^\top)\,\|\,\mathcal N(0, I_M)\big)`.

    .. math:: \tfrac12\big(\|S\|_F^2 + \|m\|^2 - M\big) - \sum_i \log |S_{ii}|.

    :param loc: :math:`m`, shape ``(M,)``.
    :param scale_tril: lower-triangular :math:`S`, shape ``(M, M)``.
    """
    num_inducing = loc.shape[-1]
    return 0.5 * (
        jnp.sum(jnp.square(scale_tril)) + jnp.sum(jnp.square(loc)) - num_inducing
    ) - jnp.sum(jnp.log(jnp.abs(jnp.diagonal(scale_tril))))


def expected_log_likelihood(y, mean, var, noise_var) -> jax.Array:
    r"""Elementwise :math:`\mathbb E_{f \sim \mathcal N(\mu, \sigma^2_f)}\big[\log \mathcal N(y \mid f, \sigma^2_y)\big]`.

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
    :math:`\kappa(K_{zz})` rather than :math:`\kappa(L)`; in float32 with jitter 1e-4
    that moved the toy problem's ELBO by several nats."""
    return num_points >= 2 * num_inducing and jnp.finfo(dtype).eps < 1e-10


@jax.custom_vjp
def _weighted_gram(
    K_zx: Float[Array, "M N"], w: Float[Array, "*N"], u: Float[Array, " N"]
) -> tuple[Float[Array, "M M"], Float[Array, " M"]]:
    r""":math:`(K_{zx} \operatorname{diag}(w) K_{xz},\ K_{zx} u)` for a scalar or ``(N,)`` weight ``w``.

    The derivative is written by hand because of its cost: for a cotangent
    :math:`\bar P`, :math:`\bar K_{zx} = (\bar P + \bar P^\top) K_{zx} \operatorname{diag}(w)
    + \bar r u^\top` is one O(N M²) product, where the transpose of
    ``K_zx @ K_zx.T`` that JAX derives takes two (one per factor).
    """
    return _gram_forward(K_zx, w, u)[0]


def _gram_forward(K_zx, w, u):
    if jnp.ndim(w) == 0:
        gram = K_zx @ K_zx.T
        return (w * gram, K_zx @ u), (K_zx, w, u, gram)
    return ((K_zx * w) @ K_zx.T, K_zx @ u), (K_zx, w, u, None)


def _gram_backward(residuals, cotangents):
    K_zx, w, u, gram = residuals
    P_bar, r_bar = cotangents
    G = (P_bar + P_bar.T) @ K_zx
    if gram is None:
        # dP/dw_n = k_n k_nᵀ; a sum over M as a GEMV, not a slow column reduction
        w_bar = 0.5 * (jnp.ones(K_zx.shape[0], K_zx.dtype) @ (G * K_zx))
        K_bar = G * w
    else:
        w_bar = jnp.sum(P_bar * gram)
        K_bar = w * G
    return K_bar + jnp.outer(r_bar, u), w_bar, r_bar @ K_zx


_weighted_gram.defvjp(_gram_forward, _gram_backward)


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
        return cross_covariance_zx(*eqx.combine(dynamic, static), X_block)

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
        (P, r), _ = jax.lax.scan(lambda acc, b: (jax.tree.map(jnp.add, acc, block(b)), None), init, blocks)
        if rest is not None:
            P, r = jax.tree.map(jnp.add, (P, r), block(rest))
        return P, r

    @jax.custom_vjp
    def weighted_gram(dynamic, X, w, u):
        P, r = gram(dynamic, X, w, u)
        return (P if per_point else w * P), r

    def forward(dynamic, X, w, u):
        X_value = X.value
        values = jax.tree.map(lambda p: p.value, (dynamic, w, u), is_leaf=is_primal)
        dynamic, w, u = values
        P, r = gram(dynamic, X_value, w, u)
        # the structure of the residuals says whether X needs a gradient
        X_needed = jnp.zeros(()) if X.perturbed else None
        return ((P if per_point else w * P), r), (dynamic, X_value, w, u, P, X_needed)

    def backward(residuals, cotangents):
        dynamic, X, w, u, P, X_needed = residuals
        P_bar, r_bar = cotangents
        P_bar = jnp.zeros_like(P) if _is_zero(P_bar) else P_bar
        r_bar = jnp.zeros(P.shape[:1], P.dtype) if _is_zero(r_bar) else r_bar
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
    return weighted_gram(dynamic, X, w, u)


def _is_zero(x) -> bool:
    return isinstance(x, jax.custom_derivatives.SymbolicZero)


def gaussian_expected_log_likelihood(
    conditional: Conditional,
    loc: Float[Array, " M"],
    scale_tril: Float[Array, "M M"],
    y: Float[Array, " N"],
    noise_var: Float[Array, "*N"],
    weight: Float[Array, "*N"] | None = None,
) -> Float[Array, ""]:
    r"""The summed expected log-likelihood of a Gaussian likelihood under the SVGP,
    :math:`\sum_n c_n\, \mathbb E_{q(f_n)}[\log \mathcal N(y_n \mid f_n, \sigma^2_n)]`,
    as matrix products.

    With :math:`w_n = c_n / \sigma^2_n`, :math:`P = K_{zx} \operatorname{diag}(w) K_{xz}`,
    :math:`T = L^{-1} P L^{-\top}` and :math:`\tilde\Sigma = m m^\top + S S^\top - I`,

    .. math::

        -\tfrac12 \sum_n c_n \log(2\pi\sigma^2_n)
        - \tfrac12\Big(\sum_n w_n (y_n^2 + k_{nn})
        - 2\, m^\top L^{-1} K_{zx} (w \circ y) + \operatorname{tr}(T \tilde\Sigma)\Big),

    which is the sum of :func:`expected_log_likelihood` over :math:`n` (expand
    :math:`(y_n - a_n^\top m)^2 + k_{nn} - a_n^\top a_n + a_n^\top S S^\top a_n`).
    The data enter only through :math:`K_{zx} \operatorname{diag}(w) K_{xz}` and
    :math:`K_{zx}(w \circ y)`, one GEMM of O(N M²) flops, instead of the triangular
    solve behind :math:`A`. The summed conditional variance
    :math:`\sum_n w_n (k_{nn} - a_n^\top a_n)` is clamped at 0 (the per-point form clamps
    each term), since round-off can make the difference of the two sums negative.

    :param conditional: the output of :func:`~numpyro_svgp.whitened_conditional`.
    :param loc: :math:`m`, shape ``(M,)``.
    :param scale_tril: :math:`S`, shape ``(M, M)``.
    :param y: observations, shape ``(N,)``.
    :param noise_var: :math:`\sigma^2_n`, broadcastable to ``(N,)``.
    :param weight: :math:`c_n` (e.g. ``N_total / B`` for a mini-batch), broadcastable
        to ``(N,)``; default 1.
    """
    K_zx, L = conditional.cross_covariance_zx, conditional.cholesky
    num_points = K_zx.shape[1]
    weight = jnp.ones((), y.dtype) if weight is None else weight
    w = weight / noise_var
    if jnp.size(w) == 1:
        w = jnp.reshape(w, ())
        log_norm = jnp.reshape(weight, ()) * num_points * jnp.log(2 * jnp.pi * jnp.reshape(noise_var, ()))
    else:
        w = jnp.broadcast_to(w, (num_points,))
        log_norm = jnp.sum(jnp.broadcast_to(weight * jnp.log(2 * jnp.pi * noise_var), (num_points,)))
    wy = w * y
    rows = block_rows(num_points, L.shape[0])
    if rows is None:
        P, r = _weighted_gram(K_zx, w, wy)
    else:
        P, r = _blocked_weighted_gram(conditional, w, wy, rows)
    b = solve_triangular(L, r, lower=True)
    T = solve_triangular(L, solve_triangular(L, P, lower=True).T, lower=True)
    q_cov = jnp.outer(loc, loc) + scale_tril @ scale_tril.T
    # sum_n w_n (k_nn - a_n^T a_n) >= 0, but as a difference of two sums it can come out
    # negative by round-off, which a shrinking noise variance then turns into an
    # unbounded spurious gain; clamped at 0 as the per-point form clamps each term.
    residual_variance = jnp.maximum(jnp.sum(w * conditional.prior_variance) - jnp.trace(T), 0.0)
    quadratic = jnp.sum(wy * y) + residual_variance - 2.0 * (loc @ b) + jnp.sum(T * q_cov)
    return -0.5 * (log_norm + quadratic)


def blocked_gaussian_expected_log_likelihood(
    conditional: Conditional,
    loc: Float[Array, " M"],
    scale_tril: Float[Array, "M M"],
    y: Float[Array, " N"],
    noise_var: Float[Array, "*N"],
    weight: Float[Array, "*N"] | None,
    rows: int,
) -> Float[Array, ""]:
    r"""The per-point Gaussian data term :math:`\sum_n c_n \mathbb E_{q(f_n)}[\log
    \mathcal N(y_n \mid f_n, \sigma^2_n)]`, summed over blocks of ``rows`` data points.

    The same sum as :func:`expected_log_likelihood` of :func:`predictive_moments`,
    with :math:`K_{xz}` and :math:`A = K_{xz} L^{-\top}` recomputed per block from the
    conditional's kernel and inputs, so that no ``(N, M)`` array is ever held (see
    :mod:`numpyro_svgp._blocks`). :math:`L^{-1}` is formed once, and each block's
    :math:`A` is a matrix product with it, as :func:`~numpyro_svgp.whitened_conditional`
    does for ``N >= M``.

    :param conditional: the output of :func:`~numpyro_svgp.whitened_conditional`.
    :param loc: :math:`m`, shape ``(M,)``.
    :param scale_tril: :math:`S`, shape ``(M, M)``.
    :param y: observations, shape ``(N,)``.
    :param noise_var: :math:`\sigma^2`, a scalar or shape ``(N,)``.
    :param weight: :math:`c_n`, ``None`` (1), a scalar or shape ``(N,)``.
    :param rows: data points per block (:func:`~numpyro_svgp._blocks.block_rows`).
    """
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
        if jnp.ndim(value) == 0:
            shared[name] = value
        else:
            per_row[name] = value
    return sum_over_blocks(_gaussian_block, shared, per_row, rows)


def _gaussian_block(shared, per_row) -> jax.Array:
    X = per_row["X"]
    A = cross_covariance(shared["kernel"], shared["inducing"], X) @ shared["projector"]
    # the marginal variance of predictive_moments
    variance = residual_variance(shared["kernel"].diag(X), A)
    variance = variance + jnp.sum(jnp.square(A @ shared["scale_tril"]), axis=1)
    noise_var = per_row["noise_var"] if "noise_var" in per_row else shared["noise_var"]
    ell = expected_log_likelihood(per_row["y"], A @ shared["loc"], variance, noise_var)
    weight = per_row.get("weight", shared.get("weight"))
    return jnp.sum(ell if weight is None else weight * ell)


def _site_log_prob(site) -> jax.Array:
    log_prob = site["fn"].log_prob(site["value"])
    if site["scale"] is not None:
        log_prob = site["scale"] * log_prob
    return jnp.sum(log_prob)


def _gaussian_base(fn):
    """The Normal under plate expansion / ``to_event`` wrappers, if any."""
    while isinstance(fn, (ExpandedDistribution, Independent)):
        fn = fn.base_dist
    return fn if isinstance(fn, Normal) else None


class SVGP_ELBO(ELBO):
    r"""ELBO estimator for models with :func:`~numpyro_svgp.svgp` sites.

    Where it can, every term is exact:

    - the KL of each whitened svgp site whose guide is a
      :class:`~numpyro.distributions.MultivariateNormal` (as :class:`~numpyro_svgp.AutoSVGP`
      makes) is :func:`kl`; other latent sites use numpyro's analytic
      ``kl_divergence`` where one is registered;
    - an observed site whose distribution is a :class:`~numpyro.distributions.Normal`
      with ``loc`` equal to an svgp output (possibly under plates or ``to_event``)
      contributes the closed-form :func:`expected_log_likelihood` of Hensman et al.
      (2013) under :math:`q(f)`.

    Everything else (other likelihoods, KLs without a closed form) falls back to the
    Monte-Carlo estimate of :class:`~numpyro.infer.TraceMeanField_ELBO`, so the
    estimate is unbiased in all cases and has zero variance for a Gaussian SVGP with
    hyperparameters as ``numpyro.param``. Observed values are checked for shape and
    for NaN/inf.

    :param int num_particles: Monte-Carlo particles for the terms that need them.
    :param vectorize_particles: as in :class:`numpyro.infer.elbo.ELBO`.

    **References**: Hensman, Fusi & Lawrence (2013), *Gaussian processes for big data*;
    Hensman, Matthews & Ghahramani (2015).
    """

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        def single_particle_elbo(key):
            model_seed, guide_seed = random.split(key)
            guide_trace = trace(substitute(seed(guide, guide_seed), data=param_map)).get_trace(
                *args, **kwargs
            )
            model_trace = trace(
                substitute(replay(seed(model, model_seed), guide_trace), data=param_map)
            ).get_trace(*args, **kwargs)
            check_model_guide_match(model_trace, guide_trace)
            mutable = [n for t in (model_trace, guide_trace) for n, site in t.items()
                       if site["type"] == "mutable"]
            if mutable:
                raise NotImplementedError(
                    f"SVGP_ELBO does not carry mutable state (sites {mutable}); use "
                    "numpyro.infer.TraceMeanField_ELBO for such models."
                )
            return elbo_terms(model_trace, guide_trace)

        if self.num_particles == 1:
            elbo = single_particle_elbo(rng_key)
        else:
            keys = random.split(rng_key, self.num_particles)
            elbo = jnp.mean(self.vectorize_particles_fn(single_particle_elbo, keys))
        return {"loss": -elbo, "mutable_state": None}


def elbo_terms(model_trace, guide_trace) -> jax.Array:
    """One-particle ELBO from a model trace replayed against a guide trace."""
    # svgp output value -> its marginals under q, for svgp sites whose q is Gaussian.
    gaussian_outputs = []
    elbo = jnp.zeros(())
    for name, site in model_trace.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        q = guide_trace[name]["fn"]
        scale = guide_trace[name]["scale"]
        info = svgp_site(site)
        if info is not None and isinstance(q, MultivariateNormal):
            kl_qp = kl(q.loc, q.scale_tril)
            elbo = elbo - (kl_qp if scale is None else scale * kl_qp)
            gaussian_outputs.append((model_trace[info.output]["value"], info.conditional, q))
            continue
        try:
            kl_qp = kl_divergence(q, site["fn"])
            elbo = elbo - jnp.sum(kl_qp if scale is None else scale * kl_qp)
        except NotImplementedError:
            elbo = elbo + _site_log_prob(site) - _site_log_prob(guide_trace[name])

    for name, site in model_trace.items():
        if site["type"] != "sample" or not site["is_observed"]:
            continue
        check_observed_site(name, site)
        base = _gaussian_base(site["fn"])
        match = None
        if base is not None:
            match = next(((c, q) for f, c, q in gaussian_outputs if base.loc is f), None)
        if match is None:
            elbo = elbo + _site_log_prob(site)
            continue
        conditional, q = match
        y, noise_var, weight = site["value"], jnp.square(base.scale), site["scale"]
        num_points, num_inducing = conditional.cross_covariance.shape
        if (
            use_matrix_form(num_points, num_inducing, conditional.cross_covariance.dtype)
            and jnp.shape(y) == (num_points,)
            and jnp.ndim(noise_var) <= 1
            and jnp.ndim(weight if weight is not None else 1.0) <= 1
        ):
            elbo = elbo + gaussian_expected_log_likelihood(
                conditional, q.loc, q.scale_tril, y, noise_var, weight
            )
            continue
        rows = block_rows(num_points, num_inducing)
        if (
            rows is not None
            and jnp.shape(y) == (num_points,)
            and jnp.ndim(noise_var) in (0, 1)
            and jnp.ndim(weight if weight is not None else 1.0) in (0, 1)
        ):
            noise_var = jnp.broadcast_to(noise_var, (num_points,)) if jnp.ndim(noise_var) else noise_var
            if weight is not None and jnp.ndim(weight):
                weight = jnp.broadcast_to(weight, (num_points,))
            elbo = elbo + blocked_gaussian_expected_log_likelihood(
                conditional, q.loc, q.scale_tril, y, noise_var, weight, rows
            )
            continue
        mean, var = predictive_moments(conditional, q.loc, q.scale_tril)
        ell = expected_log_likelihood(y, mean, var, noise_var)
        ell = jnp.broadcast_to(ell, jnp.shape(y))
        if weight is not None:
            ell = weight * ell
        elbo = elbo + jnp.sum(ell)

    for name, site in guide_trace.items():
        # auxiliary guide sites (none from AutoSVGP) enter as -log q
        if site["type"] == "sample" and name not in model_trace:
            elbo = elbo - _site_log_prob(site)
    return elbo
