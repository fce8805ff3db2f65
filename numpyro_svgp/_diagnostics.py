"""Diagnostics of the svgp sites of a fitted model: the jitter each one needed."""

from numpyro_svgp._svgp import fitted_model_trace, svgp_site

__all__ = ["svgp_diagnostics"]


def svgp_diagnostics(model, guide, params, *args, rng_seed: int = 0, **kwargs) -> dict:
    r"""Per svgp site, what the factorisation of :math:`K_{zz}` needed.

    Traces ``model(*args, **kwargs)`` with the fitted params (other latent sites at
    the guide's median) and reports, for every svgp output name, a dict with

    - ``"jitter"``: the jitter actually added to :math:`K_{zz}` (larger than the base
      jitter if :func:`~numpyro_svgp.cholesky_with_jitter` had to escalate);
    - ``"num_inducing"``: :math:`M`.

    :param model: the NumPyro model.
    :param guide: its fitted guide, or ``None`` if the model has no latent sites
        besides the svgp ones.
    :param dict params: the SVI params.
    """
    model_trace = fitted_model_trace(model, guide, params, args, kwargs, rng_seed)
    report = {}
    for site in model_trace.values():
        prior = svgp_site(site)
        if prior is not None:
            report[prior.output] = {
                "jitter": float(prior.conditional.jitter),
                "num_inducing": int(prior.conditional.projection.shape[-1]),
            }
    return report
