r"""The SVGP evidence lower bound: the KL term and the ``SVGP_ELBO`` estimator.

For whitened inducing values with :math:`q(v) = \mathcal N(m, S S^\top)` and prior
:math:`\mathcal N(0, I_M)`,

.. math::

    \mathcal L = \sum_{\text{sites}} \mathbb E_{q}[\log p(y \mid f, \dots)]
        - \mathrm{KL}\big(q(v)\,\|\,p(v)\big) - \dots,

where each site's expectation over the svgp outputs :math:`f` is taken as exactly as
:mod:`numpyro_svgp._integrate` can establish (closed form, quadrature, Monte Carlo).
"""

import jax
import jax.numpy as jnp
from jax import random
from numpyro.distributions.kl import kl_divergence
from numpyro.handlers import seed, substitute, trace
from numpyro.infer.elbo import ELBO
from numpyro.util import check_model_guide_match

from numpyro_svgp._gaussian import FORMS, resolve_block_rows
from numpyro_svgp._integrate import (
    _Options,
    check_quadrature_points,
    gaussian_q,
    plan_model,
    site_log_prob,
)
from numpyro_svgp._svgp import svgp_site

__all__ = ["kl", "SVGP_ELBO"]


def kl(loc: jax.Array, scale_tril: jax.Array) -> jax.Array:
    r""":math:`\mathrm{KL}\big(\mathcal N(m, S S^\top)\,\|\,\mathcal N(0, I_M)\big)`.

    .. math:: \tfrac12\big(\|S\|_F^2 + \|m\|^2 - M\big) - \sum_i \log |S_{ii}|.

    :param loc: :math:`m`, shape ``(M,)``.
    :param scale_tril: lower-triangular :math:`S`, shape ``(M, M)``.

    With leading batch axes (a family of GPs), the sum of the KLs.
    """
    size = jnp.size(loc)
    return 0.5 * (jnp.sum(jnp.square(scale_tril)) + jnp.sum(jnp.square(loc)) - size) - jnp.sum(
        jnp.log(jnp.abs(jnp.diagonal(scale_tril, axis1=-2, axis2=-1)))
    )


class SVGP_ELBO(ELBO):
    r"""ELBO estimator for models with :func:`~numpyro_svgp.svgp` sites.

    Every term is taken as exactly as it can be:

    - the KL of each whitened svgp site whose guide is Gaussian (the full-rank
      :class:`~numpyro.distributions.MultivariateNormal` of :class:`~numpyro_svgp.AutoSVGP`,
      a low-rank one, or a diagonal ``Normal(...).to_event(1)``) is :func:`kl`; other
      latent sites use numpyro's analytic
      ``kl_divergence`` where one is registered, else a Monte-Carlo estimate;
    - every site whose density depends on svgp outputs is integrated over
      :math:`q(f)`: in **closed form** for a Gaussian whose ``loc`` is an output up to
      shape-only changes and an offset (Hensman, Fusi & Lawrence 2013), by
      **Gauss–Hermite quadrature** for any likelihood that depends on one or two
      outputs point by point (Bernoulli, Poisson, Student-t, ``Normal(f, exp(g))``, ...;
      Hensman, Matthews & Ghahramani 2015), and by **Monte Carlo** only where neither
      can be established. :func:`~numpyro_svgp.integration_report` lists the choice
      for each site, with the reason for any Monte Carlo;
    - where the guide's :math:`q(v)` is not Gaussian (nor a point mass), :math:`f` given
      :math:`v` is integrated as above at one draw of :math:`v`, and the report says so.

    The estimate is unbiased in all cases; for a model whose only latent sites are svgp
    sites and whose sites are all closed form or quadrature, it does not depend on the
    random key. Observed values are checked for shape and for NaN/inf.

    :param int num_particles: Monte-Carlo particles for the terms that need them.
    :param vectorize_particles: as in :class:`numpyro.infer.elbo.ELBO`.
    :param int quadrature_points: Gauss–Hermite points per svgp output (default 20).
    :param str gaussian_form: form of the Gaussian data term, ``"matrix"``,
        ``"per_point"`` or ``"auto"`` (see
        :func:`~numpyro_svgp.gaussian_expected_log_likelihood`).
    :param block_rows: rows per block of the Gaussian data term, ``None`` for the data
        whole, or ``"auto"`` (small blocks on CPU, large ones on an accelerator; see
        :func:`~numpyro_svgp.gaussian_expected_log_likelihood`).
    :param bool strict: raise, naming the site and the reason, instead of falling back
        to Monte Carlo.

    **References**: Hensman, Fusi & Lawrence (2013), *Gaussian processes for big data*;
    Hensman, Matthews & Ghahramani (2015), *Scalable variational Gaussian process
    classification*.
    """

    def __init__(
        self,
        num_particles: int = 1,
        vectorize_particles: bool = True,
        *,
        quadrature_points: int = 20,
        gaussian_form: str = "auto",
        block_rows: "int | str | None" = "auto",
        strict: bool = False,
    ):
        check_quadrature_points(quadrature_points)
        if gaussian_form not in FORMS:
            raise ValueError(f"gaussian_form must be one of {FORMS}, got {gaussian_form!r}.")
        resolve_block_rows(block_rows, 2, 1)  # validates
        self.options = _Options(quadrature_points, gaussian_form, block_rows, bool(strict))
        super().__init__(num_particles=num_particles, vectorize_particles=vectorize_particles)

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        def single_particle_elbo(key):
            return elbo_terms(model, guide, args, kwargs, param_map, key, self.options)

        if self.num_particles == 1:
            elbo = single_particle_elbo(rng_key)
        else:
            keys = random.split(rng_key, self.num_particles)
            elbo = jnp.mean(self.vectorize_particles_fn(single_particle_elbo, keys))
        return {"loss": -elbo, "mutable_state": None}


def guide_and_plan(model, guide, args, kwargs, param_map, rng_key, options):
    """The guide's trace and the model's :class:`~numpyro_svgp._integrate.ModelPlan` for
    one particle."""
    model_key, guide_key = random.split(rng_key)
    guide_trace = trace(substitute(seed(guide, guide_key), data=param_map)).get_trace(
        *args, **kwargs
    )
    plan = plan_model(model, model_key, guide_trace, param_map, args, kwargs, options)
    check_model_guide_match(plan.model_trace, guide_trace)
    mutable = [
        n
        for t in (plan.model_trace, guide_trace)
        for n, site in t.items()
        if site["type"] == "mutable"
    ]
    if mutable:
        raise NotImplementedError(
            f"SVGP_ELBO does not carry mutable state (sites {mutable}); use "
            "numpyro.infer.TraceMeanField_ELBO for such models."
        )
    return guide_trace, plan


def elbo_terms(model, guide, args, kwargs, param_map, rng_key, options) -> jax.Array:
    """One particle of the ELBO."""
    guide_trace, plan = guide_and_plan(model, guide, args, kwargs, param_map, rng_key, options)
    elbo = jnp.zeros(())
    for name, site in plan.model_trace.items():
        if site["type"] != "sample":
            continue
        if site["is_observed"]:
            elbo = elbo + plan.log_density(name)
            continue
        q_site = guide_trace[name]
        q, scale = q_site["fn"], q_site["scale"]
        gaussian = gaussian_q(q)
        if svgp_site(site) is not None and gaussian is not None:
            kl_qp = kl(*gaussian)
            elbo = elbo - (kl_qp if scale is None else scale * kl_qp)
            continue
        if name not in plan.integrations or plan.integrations[name].method == "exact":
            try:
                kl_qp = kl_divergence(q, site["fn"])
                elbo = elbo - jnp.sum(kl_qp if scale is None else scale * kl_qp)
                continue
            except NotImplementedError:
                pass
        elbo = elbo + plan.log_density(name) - site_log_prob(q_site)

    for name, site in guide_trace.items():
        # auxiliary guide sites (none from AutoSVGP) enter as -log q
        if site["type"] == "sample" and name not in plan.model_trace:
            elbo = elbo - site_log_prob(site)
    return elbo
