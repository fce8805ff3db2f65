r"""Analytic posterior predictive moments of an svgp output at new inputs.

At new inputs :math:`X_*` the fitted SVGP gives the Gaussian marginals

.. math:: \mu_* = A_* m, \qquad
    \sigma^2_* = \operatorname{diag}(K_{**} - A_* A_*^\top) + \operatorname{rowsum}\big((A_* S)^{\circ 2}\big),
    \qquad A_* = K_{*z} L^{-\top},

(Hensman et al. 2013), with no sampling. They are the moments that
``numpyro.infer.Predictive`` samples of the same site converge to.
"""

from numpyro.distributions import MultivariateNormal
from numpyro.handlers import seed, substitute, trace

from numpyro_svgp._conditional import predictive_moments
from numpyro_svgp._svgp import fitted_model_trace, svgp_site

__all__ = ["predict_f"]


def predict_f(model, guide, params, *args, name: str = "f", rng_seed: int = 0, **kwargs):
    r"""Posterior mean and variance of the svgp output ``name`` at the model's inputs.

    Runs ``model(*args, **kwargs)`` (typically with new inputs) with the fitted
    params and reads off the moments under :math:`q(v)`. Latent sites other than the
    whitened one (e.g. hyperparameters with priors) are fixed at the guide's median.

    Example::

        mean, var = ns.predict_f(model, guide, svi_result.params, X_test)

    :param model: the NumPyro model that calls ``ns.svgp(name, ...)``.
    :param guide: the fitted guide (an :class:`~numpyro_svgp.AutoSVGP`).
    :param dict params: the SVI params (``svi_result.params``).
    :param str name: the svgp output site; default ``"f"``.
    :param int rng_seed: seed for any randomness the model needs while tracing.
    :return: ``(mean, variance)``, each of the output's shape ``(N,)``; the variance
        excludes the likelihood's noise.
    """
    whitened = f"{name}_whitened"
    guide_trace = trace(seed(substitute(guide, data=params), rng_seed)).get_trace(*args, **kwargs)
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
    model_trace = fitted_model_trace(model, guide, params, args, kwargs, rng_seed)
    info = svgp_site(model_trace[whitened])
    return predictive_moments(info.conditional, q.loc, q.scale_tril)
