r"""Analytic posterior predictive moments of an svgp output at new inputs.

At new inputs :math:`X_*` the fitted SVGP gives the Gaussian marginals

.. math:: \mu_* = A_* m, \qquad
    \sigma^2_* = \operatorname{diag}(K_{**} - A_* A_*^\top)
    + \operatorname{rowsum}\big((A_* S)^{\circ 2}\big),
    \qquad A_* = K_{*z} L^{-\top},

(Hensman et al. 2013), with no sampling. They are the moments that
``numpyro.infer.Predictive`` samples of the same site converge to.
"""

import traceback

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp
from numpyro.distributions import MultivariateNormal
from numpyro.handlers import block, seed, substitute, trace

from numpyro_svgp._conditional import predictive_covariance, predictive_moments
from numpyro_svgp._svgp import fitted_model_trace, output_values, svgp_site

__all__ = ["predict_f", "held_out_log_likelihood"]


def _check_params(params, caller: str) -> None:
    """Refuse what is not a fitted params dict before it reaches the model."""
    if not isinstance(params, dict):
        raise TypeError(
            f"{caller} needs the fitted params as a dict (svi.get_params(state), "
            f"svi_result.params or ns.train(...).params), got {type(params).__name__}."
        )
    if not params:
        raise ValueError(
            f"{caller} got empty params: pass the fitted params (svi.get_params(state), "
            "svi_result.params or ns.train(...).params)."
        )


def _check_all_params_given(trace_, params, what: str, caller: str) -> None:
    missing = [
        name for name, site in trace_.items() if site["type"] == "param" and name not in params
    ]
    if missing:
        raise ValueError(
            f"{caller}: the {what} has params that are not in the given params: "
            f"{missing}. Without them it would silently use their initial values; pass "
            "the params fitted with this model and guide."
        )


def _explain_plate_size(error: Exception, caller: str) -> None:
    """A plate of size None fails inside numpyro with a bare TypeError; name the cause."""
    frames = traceback.extract_tb(error.__traceback__)
    if (
        isinstance(error, TypeError)
        and "NoneType" in str(error)
        and any(
            frame.name == "__init__" and frame.filename.endswith("primitives.py")
            for frame in frames
        )
    ):
        raise ValueError(
            f"{caller}: a numpyro.plate in the model got size None, typically a "
            "num_data=None keyword of a mini-batch model. Pass it (num_data=N), or write "
            "the plate as numpyro.plate('data', num_data or X.shape[0], "
            "subsample_size=X.shape[0]) so the model also runs on new inputs alone."
        ) from error


def predict_f(
    model,
    guide,
    params,
    *args,
    name: str = "f",
    rng_seed: int = 0,
    full_cov: bool = False,
    num_samples: int | None = 100,
    **kwargs,
):
    r"""Posterior mean and variance (or covariance) of the svgp output ``name`` at the
    model's inputs.

    Runs ``model(*args, **kwargs)`` (typically with new inputs) with the fitted
    params and reads off the moments under :math:`q(v)`. Latent sites other than the
    whitened ones (e.g. hyperparameters with priors) are integrated with ``num_samples``
    draws :math:`\theta_s` from the guide, as ``Predictive`` does: the moments are those of
    the mixture, :math:`\mu = \frac1S\sum_s \mu_s` and
    :math:`\Sigma = \frac1S\sum_s \big(\Sigma_s + (\mu_s - \mu)(\mu_s - \mu)^\top\big)`.
    With ``num_samples=None`` they are fixed at the guide's median instead (a plug-in).

    Example::

        mean, var = ns.predict_f(model, guide, svi_result.params, X_test)
        mean, cov = ns.predict_f(model, guide, svi_result.params, X_test, full_cov=True)

    :param model: the NumPyro model that calls ``ns.svgp(name, ...)``.
    :param guide: the fitted guide (an :class:`~numpyro_svgp.AutoSVGP`).
    :param dict params: the SVI params (``svi_result.params``).
    :param str name: the svgp output site; default ``"f"``.
    :param int rng_seed: seed for the guide's draws and any randomness the model needs.
    :param bool full_cov: return the joint covariance
        :math:`K_{**} - A_* A_*^\top + A_* S S^\top A_*^\top` of the outputs instead of
        their variances (one ``(N, N)`` matrix per GP of a family).
    :param num_samples: draws of the other latent sites (unused when there are none), or
        ``None`` for their median.
    :return: ``(mean, variance)``, each of the output's shape ``(N,)``, or with
        ``full_cov`` ``(mean, covariance)`` with covariance ``(..., N, N)``; neither
        includes the likelihood's noise.
    """
    _check_params(params, "predict_f")
    if num_samples is not None and (
        isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1
    ):
        raise ValueError(f"num_samples must be an int >= 1 or None, got {num_samples!r}.")
    whitened = f"{name}_whitened"
    try:
        guide_trace = trace(seed(substitute(guide, data=params), rng_seed)).get_trace(
            *args, **kwargs
        )
        _check_all_params_given(guide_trace, params, "guide", "predict_f")
        model_trace = fitted_model_trace(model, guide, params, args, kwargs, rng_seed)
    except TypeError as error:
        _explain_plate_size(error, "predict_f")
        raise
    _check_all_params_given(model_trace, params, "model", "predict_f")
    if whitened not in guide_trace:
        raise KeyError(
            f"the guide has no site '{whitened}': is '{name}' the name given to ns.svgp?"
        )
    q = guide_trace[whitened]["fn"]
    if not isinstance(q, MultivariateNormal):
        raise TypeError(
            f"predict_f needs a MultivariateNormal q({whitened}), as AutoSVGP makes; "
            f"the guide gave {type(q).__name__}."
        )
    others = [
        n
        for n, site in guide_trace.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and n in model_trace
        and svgp_site(model_trace[n]) is None
    ]
    if others and num_samples is not None:
        return _integrated_moments(
            model,
            guide,
            params,
            args,
            kwargs,
            whitened,
            tuple(others),
            jax.random.PRNGKey(rng_seed),
            num_samples,
            full_cov,
        )
    conditional = _conditional_of(model_trace, whitened)
    if full_cov:
        return predictive_covariance(conditional, q.loc, q.scale_tril)
    return predictive_moments(conditional, q.loc, q.scale_tril)


def _conditional_of(model_trace, whitened):
    """The conditional of the svgp whose whitened site is ``whitened``."""
    info = svgp_site(model_trace[whitened]) if whitened in model_trace else None
    if info is None:
        raise KeyError(f"the model has no svgp site '{whitened}'.")
    return info.conditional


@eqx.filter_jit
def _integrated_moments(
    model, guide, params, args, kwargs, whitened, others, key, num_samples, full_cov
):
    draw_key, key = jax.random.split(key)
    draws = guide.sample_posterior(draw_key, params, *args, sample_shape=(num_samples,), **kwargs)

    def one_draw(draw):
        values = {**params, **draw}
        with block():
            q = trace(substitute(seed(guide, key), data=values)).get_trace(*args, **kwargs)
            model_trace = trace(
                seed(substitute(output_values(model, placeholder=True), data=values), key)
            ).get_trace(*args, **kwargs)
        conditional = _conditional_of(model_trace, whitened)
        q = q[whitened]["fn"]
        moments = predictive_covariance if full_cov else predictive_moments
        return moments(conditional, q.loc, q.scale_tril)

    means, spreads = jax.lax.map(one_draw, {n: draws[n] for n in others})
    mean = jnp.mean(means, axis=0)
    centred = means - mean
    if full_cov:
        between = jnp.einsum("s...i,s...j->...ij", centred, centred) / num_samples
    else:
        between = jnp.mean(jnp.square(centred), axis=0)
    return mean, jnp.mean(spreads, axis=0) + between


def held_out_log_likelihood(
    model, guide, params, *args, rng_key, num_samples: int = 100, **kwargs
) -> jax.Array:
    r"""Mean log predictive density of the model's observed sites under the fitted guide,

    .. math:: \frac1N \sum_n \log \frac1S \sum_{s=1}^S p(y_n \mid \theta_s), \qquad
        \theta_s \sim q,

    a Monte-Carlo estimate of :math:`\frac1N\sum_n \log \int p(y_n \mid f_n)\, q(f_n)\, df_n`
    for any likelihood (each draw of the svgp output includes its conditional
    variance). Call it with held-out data; with a fixed ``rng_key`` it is a smooth
    function of the params, which is what early stopping needs.

    :param model: the NumPyro model; it is run with ``*args, **kwargs`` (the held-out
        inputs and observations).
    :param guide: the fitted :class:`~numpyro_svgp.AutoSVGP`.
    :param dict params: the SVI params.
    :param rng_key: a JAX random key (keyword).
    :param int num_samples: draws :math:`S` from the guide.
    :return: a scalar, the mean over all observed values of the log predictive density.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    _check_params(params, "held_out_log_likelihood")
    try:
        return _held_out_log_likelihood(model, guide, params, args, kwargs, rng_key, num_samples)
    except TypeError as error:
        _explain_plate_size(error, "held_out_log_likelihood")
        raise


@eqx.filter_jit
def _held_out_log_likelihood(model, guide, params, args, kwargs, rng_key, num_samples):
    # one compiled program per (model, guide, shapes): early stopping calls this every
    # few epochs, and op by op it would dispatch (and first compile) each primitive alone
    draw_key, model_key = jax.random.split(rng_key)
    draws = guide.sample_posterior(draw_key, params, *args, sample_shape=(num_samples,), **kwargs)

    def log_density(draw, key):
        with block():
            model_trace = trace(seed(substitute(model, data={**params, **draw}), key)).get_trace(
                *args, **kwargs
            )
        terms = [
            jnp.ravel(site["fn"].log_prob(site["value"]))
            for site in model_trace.values()
            if site["type"] == "sample" and site["is_observed"]
        ]
        if not terms:
            raise ValueError("the model has no observed site: pass the held-out observations.")
        return jnp.concatenate(terms)

    log_p = jax.vmap(log_density)(draws, jax.random.split(model_key, num_samples))
    return jnp.mean(logsumexp(log_p, axis=0) - jnp.log(num_samples))
