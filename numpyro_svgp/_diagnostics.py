"""Diagnostics of a fitted model: the jitter each svgp site needed, and how the ELBO
integrates each site."""

import jax
import numpy as np
from numpyro.handlers import block

from numpyro_svgp._elbo import SVGP_ELBO, guide_and_plan
from numpyro_svgp._svgp import fitted_model_trace, svgp_site

__all__ = ["format_integration_report", "integration_report", "svgp_diagnostics"]


def svgp_diagnostics(model, guide, params, *args, rng_seed: int = 0, **kwargs) -> dict:
    r"""Per svgp site, what the factorisation of :math:`K_{zz}` needed.

    Traces ``model(*args, **kwargs)`` with the fitted params (other latent sites at
    the guide's median) and reports, for every svgp output name, a dict with

    - ``"jitter"``: the jitter actually added to :math:`K_{zz}` (larger than the base
      jitter if :func:`~numpyro_svgp.cholesky_with_jitter` had to escalate); for a
      family of GPs (svgp inside plates), an array of the family's shape, one per GP;
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
            conditional = prior.conditional
            jitter = np.asarray(conditional.jitter).reshape(conditional.family.shape)
            report[prior.output] = {
                "jitter": float(jitter) if jitter.ndim == 0 else jitter,
                "num_inducing": int(prior.conditional.num_inducing),
            }
    return report


def integration_report(
    model, guide, params, *args, elbo: SVGP_ELBO | None = None, **kwargs
) -> dict:
    r"""How :class:`~numpyro_svgp.SVGP_ELBO` integrates each site that depends on an svgp output.

    Example::

        report = ns.integration_report(model, guide, svi_result.params, X, y)
        # {'y': {'integration': 'quadrature (20 points)', 'outputs': ('f',), 'reason': ''}}
        print(ns.format_integration_report(report))

    :param model: the NumPyro model.
    :param guide: its guide (e.g. :class:`~numpyro_svgp.AutoSVGP`).
    :param dict params: the SVI params (``svi_result.params``) or initial ones.
    :param elbo: the :class:`~numpyro_svgp.SVGP_ELBO` whose options apply; default ``SVGP_ELBO()``.
    :return: site name to ``{"integration": "closed form" | "quadrature (K points)" |
        "quadrature (K x K points)" | "Monte Carlo", "outputs": (svgp output names,),
        "reason": why Monte Carlo, or what is sampled (a
        non-Gaussian q(v)), else ""}``, for every sample site that depends on an
        svgp output, in model order.
    """
    elbo = SVGP_ELBO() if elbo is None else elbo
    with block():
        _, plan = guide_and_plan(
            model, guide, args, kwargs, params, jax.random.PRNGKey(0), elbo.options
        )
    return {
        name: {"integration": i.describe(), "outputs": i.outputs, "reason": i.reason}
        for name, i in plan.integrations.items()
        if i.method != "exact"
    }


def format_integration_report(report: dict) -> str:
    """:func:`integration_report` as a table, one line per site."""
    if not report:
        return "no site depends on an svgp output"
    width = max(len(name) for name in report)
    lines = []
    for name, entry in report.items():
        line = f"{name:<{width}}  {entry['integration']}"
        if entry["outputs"]:
            line += f"  (of {', '.join(entry['outputs'])})"
        if entry["reason"]:
            line += f": {entry['reason']}"
        lines.append(line)
    return "\n".join(lines)
