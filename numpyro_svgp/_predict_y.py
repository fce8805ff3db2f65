r"""Predictions of an observed site: its mean, variance and quantiles, and log densities.

At new inputs the fitted SVGP gives each output Gaussian marginals
:math:`q(f_n) = \mathcal N(\mu_n, \sigma^2_n)`, and an observed site :math:`y` has the
predictive distribution

.. math:: p(y_n) = \frac1S \sum_{s=1}^S \int p(y_n \mid f_n, \theta_s)\,
    q(f_n \mid \theta_s)\, df_n, \qquad \theta_s \sim q(\theta),

where :math:`\theta` are the model's other latent sites (one term, :math:`S = 1`, when
there are none). The integral over :math:`f` is taken as
:class:`~numpyro_svgp.SVGP_ELBO` takes its expectations: for a ``Normal`` whose ``loc``
is the output (up to shape-only changes and an offset) it is the Gaussian
:math:`\mathcal N(y_n \mid \mu_n + c_n, s^2 + \sigma^2_n)`, in closed form; for any
likelihood that depends on one or two outputs point by point, Gauss–Hermite quadrature
turns it into a mixture of the likelihood at the nodes. Its moments follow from those of
the components; its quantiles are found by bisection on the mixture's CDF. A site whose
log density couples several values of an output (a softmax over a family of class GPs)
is a mixture over :math:`S` joint draws of the latents and the outputs instead, and
:func:`predict_y` states the Monte Carlo standard errors of what it estimates.

**Reference**: Hensman, Matthews & Ghahramani (2015), *Scalable variational Gaussian
process classification* (predictive densities by quadrature).
"""

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp
from numpyro.distributions import CategoricalLogits, CategoricalProbs, MaskedDistribution, Normal
from numpyro.handlers import block, condition, seed, substitute, trace

from numpyro_svgp._integrate import (
    _Options,
    _peel,
    _rewrap,
    _run,
    check_quadrature_points,
    hermite_grid,
    plan_model,
)
from numpyro_svgp._predict import _check_params, _explain_plate_size
from numpyro_svgp._svgp import output_values, svgp_site

__all__ = [
    "StandardError",
    "YPrediction",
    "pointwise_log_likelihood",
    "predict_log_density",
    "predict_y",
]

BISECTION_STEPS = 100
"""Halvings of the bracket of each quantile (enough for any bracket a float can hold to
shrink to the float's resolution)."""

WIDENINGS = 12
"""Doublings of the bracket's half-width, from 4 standard deviations, while the bracket does
not hold the quantile (a factor of 4096, for heavy-tailed mixtures)."""


class StandardError(NamedTuple):
    """Monte Carlo standard errors of a :class:`YPrediction`'s estimates."""

    mean: jax.Array
    """Of :attr:`YPrediction.mean`."""
    variance: jax.Array
    """Of :attr:`YPrediction.variance` (by the delta method)."""
    probabilities: "jax.Array | None"
    """Of :attr:`YPrediction.probabilities` (``None`` where those are ``None``)."""
    num_draws: int
    """The independent draws the estimates average."""


class _Moments(NamedTuple):
    mean: jax.Array
    variance: jax.Array
    quantiles: "jax.Array | None"


class YPrediction(_Moments):
    """What :func:`predict_y` returns, each of the observed site's shape.

    It unpacks as ``mean, variance, quantiles``; :attr:`probabilities` and
    :attr:`standard_error` are attributes beside them.
    """

    mean: jax.Array
    """:math:`\\mathbb E[y_n]` (NaN for a ``Categorical``, as numpyro's mean: see
    :attr:`probabilities`)."""
    variance: jax.Array
    """:math:`\\operatorname{Var}[y_n]` (the likelihood's noise included)."""
    quantiles: "jax.Array | None"
    """The requested quantiles, with a leading axis of their number (``None`` if none)."""
    probabilities: "jax.Array | None"
    """For a ``Categorical`` site, the class probabilities
    :math:`P(y_n = k) = \\mathbb E[\\operatorname{softmax}(\\text{logits}_n)_k]`, of the
    site's shape plus a last axis of the classes; ``None`` for other distributions."""
    standard_error: "StandardError | None"
    """Monte Carlo standard errors of :attr:`mean`, :attr:`variance` and
    :attr:`probabilities` when they are averages over draws (see :func:`predict_y`; NaN
    from a single draw); ``None`` when they are exact (closed form or quadrature, nothing
    drawn)."""

    def __new__(cls, mean, variance, quantiles, probabilities=None, standard_error=None):
        self = super().__new__(cls, mean, variance, quantiles)
        self.probabilities = probabilities
        self.standard_error = standard_error
        return self

    def __repr__(self) -> str:
        return (
            f"YPrediction(mean={self.mean!r}, variance={self.variance!r}, "
            f"quantiles={self.quantiles!r}, probabilities={self.probabilities!r}, "
            f"standard_error={self.standard_error!r})"
        )


def predict_y(
    model,
    guide,
    params,
    *args,
    site: str | None = None,
    quantiles=None,
    num_samples: int = 100,
    quadrature_points: int = 20,
    rng_key=None,
    **kwargs,
) -> YPrediction:
    r"""Predictive mean, variance and quantiles of an observed site at the model's inputs.

    Example::

        pred = ns.predict_y(model, guide, svi_result.params, X_test, quantiles=(0.05, 0.95))
        pred.mean            # class probabilities for Bernoulli, rates for Poisson
        pred.quantiles[0]    # the 5 % quantile at each point

    Class probabilities of a softmax over C class GPs, ``Categorical(logits=f.T)``::

        pred = ns.predict_y(model, guide, svi_result.params, X_test, num_samples=2000)
        pred.probabilities                   # (N, C), each row sums to 1
        pred.standard_error.probabilities    # their Monte Carlo standard errors

    The site's distribution is integrated over :math:`q(f)` as described in the module
    docstring: exactly for a Gaussian, by Gauss–Hermite quadrature otherwise. Other
    latent sites of the model (hyperparameters with priors) are integrated with
    ``num_samples`` draws from the guide, as ``Predictive`` does. A site that couples
    several values of an output at each point (a softmax over a family of class GPs),
    or that depends on more than two outputs, cannot be integrated that way: it is
    estimated from ``num_samples`` joint draws of every latent site and of the outputs
    from :math:`q`, the site's distribution at each draw averaged. Whenever draws are
    averaged, :attr:`YPrediction.standard_error` gives the estimates' Monte Carlo
    standard errors, :math:`\hat s / \sqrt S` with :math:`\hat s` the standard deviation
    of the :math:`S` draws' own values (the quantiles have none stated).

    :param model: the NumPyro model, run with ``*args, **kwargs`` (typically new inputs,
        no observations).
    :param guide: its fitted guide (e.g. :class:`~numpyro_svgp.AutoSVGP`).
    :param dict params: the SVI params.
    :param str site: the observed site; default the only one that depends on an svgp output.
    :param quantiles: levels in (0, 1), or ``None``. For a discrete site each quantile is
        the smallest value whose CDF reaches the level. A quantile beyond
        :math:`4 \cdot 2^{12}` standard deviations of the mean (a heavy tail) is NaN
        rather than a clamped value.
    :param int num_samples: draws of the other latent sites, and of the outputs for a
        site that needs Monte Carlo (unused when neither is drawn).
    :param int quadrature_points: Gauss–Hermite points per svgp output.
    :param rng_key: a JAX random key for those draws (default ``PRNGKey(0)``).
    :return: a :class:`YPrediction` ``(mean, variance, quantiles, probabilities,
        standard_error)``.
    :raises ValueError: if the guide's :math:`q(v)` is not Gaussian for a site that is
        otherwise integrated exactly, or a quantile is requested of a distribution
        without a CDF.
    """
    _check_params(params, "predict_y")
    levels = None
    if quantiles is not None:
        levels = np.atleast_1d(np.asarray(quantiles, dtype=float))
        if levels.ndim != 1 or not np.all((levels > 0) & (levels < 1)):
            raise ValueError(f"quantiles must be levels in (0, 1), got {quantiles!r}.")
    *components, draws = _components_of(
        model,
        guide,
        params,
        args,
        kwargs,
        site,
        num_samples,
        quadrature_points,
        rng_key,
        "predict_y",
    )
    return _moments_and_quantiles(components, levels, draws)


def predict_log_density(
    model,
    guide,
    params,
    *args,
    site: str | None = None,
    num_samples: int = 100,
    quadrature_points: int = 20,
    rng_key=None,
    **kwargs,
) -> jax.Array:
    r"""Pointwise log predictive density :math:`\log p(y_n)` of observed values.

    Example::

        log_p = ns.predict_log_density(model, guide, svi_result.params, X_test, y_test)
        log_p.mean()         # mean log predictive density of the test set

    :math:`p(y_n)` is the predictive distribution of the module docstring: for a Gaussian
    likelihood :math:`\mathcal N(y_n \mid \mu_n + c_n, s^2 + \sigma^2_n)` exactly, for any
    other a Gauss–Hermite sum :math:`\sum_k w_k\, p(y_n \mid \mu_n + \sigma_n x_k)`;
    averaged over ``num_samples`` draws of any other latent sites.

    :param model: the NumPyro model, run with ``*args, **kwargs`` (inputs and the
        observations to score).
    :param guide: its fitted guide.
    :param dict params: the SVI params.
    :param str site: the observed site; default the only one that depends on an svgp output.
    :param int num_samples: draws of the other latent sites (unused when there are none).
    :param int quadrature_points: Gauss–Hermite points per svgp output.
    :param rng_key: a JAX random key for those draws (default ``PRNGKey(0)``).
    :return: :math:`\log p(y_n)`, of the site's shape (sum or average it as needed).
    """
    _check_params(params, "predict_log_density")
    log_w, stats, _ = _components_of(
        model,
        guide,
        params,
        args,
        kwargs,
        site,
        num_samples,
        quadrature_points,
        rng_key,
        "predict_log_density",
    )
    if stats["log_prob"] is None:
        raise ValueError(
            "predict_log_density needs the observations: pass them as the model's "
            "observed argument (e.g. predict_log_density(model, guide, params, X, y))."
        )
    return logsumexp(_expand(log_w, stats["log_prob"]) + stats["log_prob"], axis=0)


def pointwise_log_likelihood(
    model,
    samples: dict,
    *args,
    params: dict | None = None,
    quadrature_points: int = 20,
    **kwargs,
) -> dict:
    r"""Log likelihood of each observation at each posterior draw, for PSIS-LOO and WAIC.

    For a draw :math:`(v_s, \theta_s)` (every latent site, the whitened ones included, from
    a guide's ``sample_posterior`` or from MCMC on :func:`~numpyro_svgp.sgpmc`), the
    likelihood of :math:`y_n` integrates :math:`f_n` over its conditional
    :math:`p(f_n \mid v_s, \theta_s) = \mathcal N(a_n^\top v_s, k_{nn} - a_n^\top a_n)`:

    .. math:: \log p(y_n \mid v_s, \theta_s) = \log \int p(y_n \mid f_n, \theta_s)\,
        p(f_n \mid v_s, \theta_s)\, df_n,

    in closed form for a Gaussian, by Gauss–Hermite quadrature otherwise. Sites that do
    not depend on an svgp output give their own log density.

    :param model: the NumPyro model, run with ``*args, **kwargs`` (inputs and observations).
    :param dict samples: site name to draws with a leading sample axis.
    :param dict params: the model's ``numpyro.param`` values (SVI params), if it has any.
    :param int quadrature_points: Gauss–Hermite points per svgp output.
    :return: observed site name to an array of shape ``(S,) + site_shape``.
    """
    if not samples:
        raise ValueError("pointwise_log_likelihood: samples is empty.")
    sizes = {int(jnp.shape(v)[0]) for v in samples.values()}
    if len(sizes) != 1:
        raise ValueError(
            f"pointwise_log_likelihood: all samples need the same number of draws on axis 0, "
            f"got {sorted(sizes)}."
        )
    check_quadrature_points(quadrature_points)
    try:
        return _pointwise_log_likelihood(
            model, dict(samples), dict(params or {}), args, kwargs, quadrature_points
        )
    except TypeError as error:
        _explain_plate_size(error, "pointwise_log_likelihood")
        raise


@eqx.filter_jit
def _pointwise_log_likelihood(model, samples, params, args, kwargs, points):
    options = _Options(points, "auto", "auto", False)
    key = jax.random.PRNGKey(0)
    samples = _latent_draws(model, samples, params, args, kwargs, key)

    def one_draw(draw):
        values = {**params, **draw}
        with block():
            # no guide: every whitened site is the point mass at its draw
            plan = plan_model(model, key, {}, values, args, kwargs, options)
            result = {}
            for name, site in plan.model_trace.items():
                if site["type"] != "sample" or not site["is_observed"]:
                    continue
                integration = plan.integrations.get(name)
                if integration is None or integration.method == "exact":
                    result[name] = _pointwise(
                        site["fn"], site["value"], name, "pointwise_log_likelihood"
                    )
                    continue
                _refuse_inexact(integration, name, "pointwise_log_likelihood")
                log_w, stats = _site_components(
                    plan,
                    {},
                    model,
                    values,
                    args,
                    kwargs,
                    key,
                    name,
                    integration,
                    points,
                    True,
                    "pointwise_log_likelihood",
                )
                result[name] = logsumexp(
                    _expand(log_w, stats["log_prob"]) + stats["log_prob"], axis=0
                )
            return result

    return jax.lax.map(one_draw, samples)


def _latent_draws(model, samples, params, args, kwargs, key):
    """``samples`` restricted to the model's latent sites, after checking that they and
    ``params`` cover every latent and param site: a missing one would otherwise be drawn
    from its prior or left at its initial value, silently."""
    first = jax.tree.map(lambda x: x[0], samples)
    with block():
        model_trace = trace(
            seed(substitute(output_values(model, placeholder=True), data={**params, **first}), key)
        ).get_trace(*args, **kwargs)
    latent = [
        n for n, site in model_trace.items() if site["type"] == "sample" and not site["is_observed"]
    ]
    missing = [n for n in latent if n not in samples]
    if missing:
        raise ValueError(
            f"pointwise_log_likelihood: samples has no draws of the latent sites {missing}; "
            "pass every latent site, the whitened ones included (guide.sample_posterior, "
            "mcmc.get_samples())."
        )
    unset = [n for n, site in model_trace.items() if site["type"] == "param" and n not in params]
    if unset:
        raise ValueError(
            f"pointwise_log_likelihood: the model's params {unset} are not in params; pass "
            "the fitted ones (params=svi_result.params)."
        )
    # observations, outputs and deterministic sites among the samples would replace the
    # values the likelihood is computed from
    return {n: samples[n] for n in latent}


def _expand(log_w, x):
    return log_w.reshape(log_w.shape + (1,) * (jnp.ndim(x) - 1))


def _components_of(model, guide, params, args, kwargs, site, num_samples, points, rng_key, caller):
    check_quadrature_points(points)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}.")
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    try:
        return _components(
            model, guide, params, args, kwargs, site, num_samples, points, rng_key, caller
        )
    except TypeError as error:
        _explain_plate_size(error, caller)
        raise


@eqx.filter_jit
def _components(model, guide, params, args, kwargs, site, num_samples, points, rng_key, caller):
    """``(log_weights, stats, draws)`` of the mixture that is the site's predictive
    distribution: one component per (draw of the other latents, quadrature node), or per
    joint draw of the latents and outputs for a site that needs Monte Carlo, with each
    component's mean, variance, log density of the observed value, class probabilities
    and the distribution itself (batched over the components) for its CDF; ``draws``
    is the number of independent draws, each owning one contiguous run of components
    (0 when nothing is drawn)."""
    options = _Options(points, "auto", "auto", False)
    draw_key, key = jax.random.split(rng_key)
    with block():
        first, guide_trace = _plan(model, guide, params, args, kwargs, {}, key, options)
    site = _pick_site(first, guide_trace, site, caller)
    observed = first.model_trace[site]["is_observed"]
    if not observed:
        # observed at a placeholder, the site's density has a fixed value, which is what
        # lets the engine see a Gaussian in an output (closed form, not quadrature)
        value = first.model_trace[site]["value"]
        model = condition(model, data={site: jnp.zeros(jnp.shape(value), jnp.result_type(value))})
        with block():
            first, guide_trace = _plan(model, guide, params, args, kwargs, {}, key, options)
    integration = first.integrations[site]
    _refuse_inexact(integration, site, caller)
    monte_carlo = integration.method == "Monte Carlo"
    others = [
        n
        for n, s in guide_trace.items()
        if s["type"] == "sample"
        and not s["is_observed"]
        and n in first.model_trace
        and svgp_site(first.model_trace[n]) is None
    ]
    if not others and not monte_carlo:
        num_samples = 1
    draws = guide.sample_posterior(draw_key, params, *args, sample_shape=(num_samples,), **kwargs)
    draws = {n: draws[n] for n in others}
    if monte_carlo:
        return (
            *_drawn_components(
                model,
                guide,
                params,
                args,
                kwargs,
                site,
                observed,
                draws,
                jax.random.split(key, num_samples),
                caller,
            ),
            num_samples,
        )

    def one_draw(values):
        with block():
            plan, guide_trace = _plan(model, guide, params, args, kwargs, values, key, options)
            return _site_components(
                plan,
                guide_trace,
                model,
                params,
                args,
                kwargs,
                key,
                site,
                integration,
                points,
                observed,
                caller,
            )

    # one draw at a time: each holds (nodes, N) arrays and its distributions
    if draws:
        log_w, stats = jax.lax.map(one_draw, draws)
    else:
        log_w, stats = jax.tree.map(lambda x: x[None], one_draw({}))
    flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), stats)
    return log_w.reshape(-1) - jnp.log(num_samples), flat, num_samples if draws else 0


def _drawn_components(model, guide, params, args, kwargs, site, observed, draws, keys, caller):
    """One equally weighted component per key: the site's distribution at a joint draw of
    v from the guide (given the other latents' ``draws``) and of the outputs given v."""

    def one_draw(inputs):
        values, key = inputs
        guide_key, model_key = jax.random.split(key)
        with block():
            guide_trace = trace(
                substitute(seed(guide, guide_key), data={**params, **values})
            ).get_trace(*args, **kwargs)
            # no output handler: each svgp output is drawn given its v, as the model does
            at = _run(model, model_key, guide_trace, params, args, kwargs, lambda fn: fn)[site]
            return _stats(at["fn"], at, observed, site, caller)

    stats = jax.lax.map(one_draw, (draws, keys))
    log_w = jnp.full(len(keys), -jnp.log(len(keys)), stats["mean"].dtype)
    return log_w, stats


def _plan(model, guide, params, args, kwargs, values, key, options):
    guide_trace = trace(substitute(seed(guide, key), data={**params, **values})).get_trace(
        *args, **kwargs
    )
    return plan_model(model, key, guide_trace, params, args, kwargs, options), guide_trace


def _pick_site(plan, guide_trace, site, caller):
    # the site's values are data: observed, or left unobserved (y=None) to be predicted
    # (then it is latent in the model but the guide does not cover it)
    candidates = [
        n
        for n, s in plan.model_trace.items()
        if s["type"] == "sample"
        and n not in guide_trace
        and n in plan.integrations
        and plan.integrations[n].method != "exact"
    ]
    if site is None:
        if len(candidates) != 1:
            raise ValueError(
                f"{caller}: the model has {len(candidates)} likelihood sites that depend on "
                f"svgp outputs ({candidates}); name one with site=."
            )
        return candidates[0]
    if site not in plan.model_trace or plan.model_trace[site]["type"] != "sample":
        raise ValueError(f"{caller}: the model has no sample site '{site}'.")
    if site not in candidates:
        raise ValueError(
            f"{caller}: site '{site}' is not a likelihood site that depends on an svgp "
            f"output; those are {candidates}."
        )
    return site


def _refuse_inexact(integration, site, caller):
    if integration.method == "Monte Carlo" and caller == "predict_y":
        return  # estimated from draws, with its standard error stated
    if integration.method == "Monte Carlo":
        raise ValueError(
            f"{caller}: site '{site}' cannot be integrated over q(f) exactly: "
            f"{integration.reason}. Draw it with numpyro.infer.Predictive instead."
        )
    if integration.reason:
        # closed form or quadrature over f given v, but v itself only as one draw
        raise ValueError(
            f"{caller}: site '{site}' cannot be integrated exactly: {integration.reason}. "
            "Use a Gaussian guide for the whitened sites (ns.AutoSVGP), or draw with "
            "numpyro.infer.Predictive."
        )


def _site_components(
    plan, guide_trace, model, params, args, kwargs, key, site, integration, points, observed, caller
):
    """The components of one draw: ``(log_weights (C,), stats with leading C)``."""
    outputs = integration.outputs

    def run_at(values):
        handler = output_values(values=values, placeholder=True)
        return _run(model, key, guide_trace, params, args, kwargs, handler)[site]

    if integration.method == "closed form":
        output = outputs[0]
        mean, variance = plan.moments(output)

        def base_loc(f):
            _, base = _peel(run_at({output: f})["fn"])
            return jnp.broadcast_to(base.loc, base.batch_shape)

        loc, spread = jax.jvp(base_loc, (mean,), (variance,))
        at_mean = run_at({output: mean})
        wrappers, base = _peel(at_mean["fn"])
        fn = _rewrap(wrappers, Normal(loc, jnp.sqrt(jnp.square(base.scale) + spread)))
        stats = _stats(fn, at_mean, observed, site, caller)
        return jnp.zeros((1,), loc.dtype), jax.tree.map(lambda x: x[None], stats)

    nodes, log_weights = hermite_grid({o: plan.moments(o) for o in outputs}, points)

    def at(node_values):
        at_node = run_at(node_values)
        return _stats(at_node["fn"], at_node, observed, site, caller)

    return log_weights, jax.vmap(at)(nodes)


def _pointwise(fn, value, site, caller):
    """``log p(value)`` element by element, of the site's full shape: the base
    distribution's, without the sum of ``to_event`` (a masked element gives 0)."""
    wrappers, base = _peel(fn)
    if base.event_shape:
        raise ValueError(
            f"{caller}: site '{site}' has a {type(base).__name__} with event shape "
            f"{base.event_shape}; pointwise predictions need a distribution of one value "
            "per point."
        )
    log_prob = jnp.broadcast_to(base.log_prob(value), fn.batch_shape + fn.event_shape)
    for wrapper in wrappers:
        if isinstance(wrapper, MaskedDistribution):
            mask = jnp.reshape(wrapper._mask, jnp.shape(wrapper._mask) + (1,) * len(fn.event_shape))
            log_prob = jnp.where(mask, log_prob, 0.0)
    return log_prob


def _stats(fn, site, observed, name, caller):
    """Pointwise statistics of the site's distribution ``fn`` at one component. The
    distribution kept for the CDF is the base one, without the plates' ``expand``,
    ``to_event`` and masks (pointwise quantities are the same)."""
    shape = fn.batch_shape + fn.event_shape
    log_prob = _pointwise(fn, site["value"], name, caller) if observed else None
    _, base = _peel(fn)
    probs = None
    if isinstance(base, (CategoricalProbs, CategoricalLogits)):
        probs = jnp.broadcast_to(base.probs, shape + base.probs.shape[-1:])
    return {
        "mean": jnp.broadcast_to(base.mean, shape),
        "variance": jnp.broadcast_to(base.variance, shape),
        "log_prob": log_prob,
        "probs": probs,
        "fn": base,
    }


def _moments_and_quantiles(components, levels, draws):
    log_w, stats = components
    weights = jnp.exp(_expand(log_w, stats["mean"]))
    mean = jnp.sum(weights * stats["mean"], axis=0)
    second = jnp.sum(weights * (stats["variance"] + jnp.square(stats["mean"])), axis=0)
    variance = jnp.maximum(second - jnp.square(mean), 0.0)
    probs = stats["probs"]
    probabilities = None
    if probs is not None:
        probabilities = jnp.sum(jnp.exp(_expand(log_w, probs)) * probs, axis=0)
    error = None
    if draws:
        # one draw gives no spread to measure: its errors are NaN, not absent
        error = _standard_error(log_w, stats, draws, mean, probs)
    quantiles = None
    if levels is not None:
        quantiles = _quantiles(stats["fn"], stats["mean"], weights, mean, variance, levels)
    return YPrediction(mean, variance, quantiles, probabilities, error)


def _standard_error(log_w, stats, draws, mean, probs):
    """Standard errors of averages over ``draws`` independent draws, each owning one run
    of components: the standard deviation of the draws' own values over
    :math:`\\sqrt S`. The variance :math:`\\bar b - \\bar a^2` (``a`` the mean, ``b`` the
    second moment) is a function of two averages; its error is that of the average of
    :math:`b_s - 2 \\bar a\\, a_s`, its linearisation (the delta method)."""

    def own(x):
        # a draw's components carry weights that sum to 1 / S
        w = jnp.exp(_expand(log_w, x)).reshape((draws, -1) + (1,) * (x.ndim - 1))
        return draws * jnp.sum(w * x.reshape((draws, -1) + x.shape[1:]), axis=1)

    def error(values):
        return jnp.std(values, axis=0, ddof=1) / np.sqrt(draws)

    a = own(stats["mean"])
    b = own(stats["variance"] + jnp.square(stats["mean"]))
    return StandardError(
        error(a),
        error(b - 2 * mean * a),
        None if probs is None else error(own(probs)),
        draws,
    )


def _quantiles(fn, component_mean, weights, mean, variance, levels):
    """Bisection on the mixture CDF :math:`\\sum_c w_c F_c(y)` for each level and point,
    from a bracket widened until it holds the level."""
    discrete = fn.support.is_discrete
    cdf = _cdf_of(fn)
    levels = jnp.asarray(levels, mean.dtype).reshape((-1,) + (1,) * mean.ndim)

    def component_cdf(y):
        # outside the support a CDF formula may not hold (NaN for a Gamma at y < 0, not 0
        # for Poisson's): there the CDF is 0 below the values and 1 above them
        return jnp.where(fn.support(y), cdf(y), jnp.where(y < component_mean, 0.0, 1.0))

    def mixture_cdf(y):
        # y: (Q, ...) -> (Q, ...); the components' axis is summed out
        return jax.vmap(lambda v: jnp.sum(weights * component_cdf(v[None]), axis=0))(y)

    def rounded(y, down):
        return (jnp.floor(y) if down else jnp.ceil(y)) if discrete else y

    half = jnp.broadcast_to(4.0 * jnp.sqrt(variance) + 1.0, levels.shape[:1] + mean.shape)
    low, high = rounded(mean - half, True), rounded(mean + half, False)

    def widen(_, bracket):
        # doubling the half-width 60 times covers any float
        low, high, half = bracket
        short = mixture_cdf(high) < levels
        beyond = mixture_cdf(low) >= levels
        return (
            jnp.where(beyond, rounded(mean - 2 * half, True), low),
            jnp.where(short, rounded(mean + 2 * half, False), high),
            2 * half,
        )

    low, high, _ = jax.lax.fori_loop(0, WIDENINGS, widen, (low, high, half))
    # a bracket that still misses the level would bisect to one of its ends: NaN there
    held = (mixture_cdf(low) < levels) & (mixture_cdf(high) >= levels)

    def step(_, bracket):
        low, high = bracket
        middle = rounded(0.5 * (low + high), True)
        below = mixture_cdf(middle) < levels
        return jnp.where(below, middle, low), jnp.where(below, high, middle)

    low, high = jax.lax.fori_loop(0, BISECTION_STEPS, step, (low, high))
    return jnp.where(held, high, jnp.nan)


def _cdf_of(fn):
    """``y -> F(y)`` for a distribution batched over components, from its ``cdf`` or, for a
    finite discrete support, by summing the probabilities of the values up to ``y``."""
    try:
        fn.cdf(jnp.zeros(()))
        return fn.cdf
    except NotImplementedError:
        pass
    if fn.support.is_discrete and fn.has_enumerate_support:
        values = np.unique(np.asarray(fn.enumerate_support(expand=False)))

        def cdf(y):
            return sum(jnp.where(v <= y, jnp.exp(fn.log_prob(v)), 0.0) for v in values)

        return cdf
    raise ValueError(
        f"predict_y: {type(fn).__name__} has no CDF, so its quantiles cannot be found; "
        "ask for the mean and variance only (quantiles=None)."
    )
