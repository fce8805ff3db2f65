r"""``AutoSVGP``: the automatic guide for models that contain ``svgp`` sites.

For every whitened site ``f"{name}_whitened"`` placed by :func:`~numpyro_svgp.svgp`
it supplies a full-rank Gaussian :math:`q(v) = \mathcal N(m, S S^\top)` with lower
triangular :math:`S`, so :math:`\log\det(S S^\top) = 2\sum_i \log |S_{ii}|` and the KL
to the :math:`\mathcal N(0, I)` prior is analytic.

:math:`S` is parametrised as in GPflow's SVGP: its lower triangle is free, the
diagonal included, and starts at the prior, :math:`S = I`. The diagonal is not
pushed through ``exp``/``softplus``: on the toy problem of the main example that
reparametrisation slows the early shrinking of :math:`q(v)` so much that the kernel
variance is driven down to 0.31 before :math:`q` catches up (−ELBO −176.9 after 800
Adam steps against −184.5 with the free diagonal). A diagonal entry may change sign;
that leaves :math:`S S^\top` unchanged, and the guide hands numpyro the equivalent
factor with positive diagonal, :math:`S\,\operatorname{diag}(\operatorname{sign} S_{ii})`. Every other continuous
latent site gets a mean-field Normal in unconstrained space, as
:class:`numpyro.infer.autoguide.AutoNormal` does. Sites are emitted in model order,
which :class:`numpyro.infer.TraceMeanField_ELBO` relies on.
"""

from contextlib import ExitStack

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to
from numpyro.handlers import block, seed, trace
from numpyro.infer.autoguide import AutoGuide
from numpyro.infer.initialization import init_to_median

from numpyro_svgp._checks import check_observed_site
from numpyro_svgp._svgp import svgp_site

__all__ = ["AutoSVGP", "whitened_scale_tril"]


def whitened_scale_tril(raw: jax.Array) -> jax.Array:
    r"""The Cholesky factor of :math:`q(v)` from AutoSVGP's ``scale_tril`` param.

    Takes the lower triangle :math:`S` of ``raw`` and flips the sign of every column
    whose diagonal entry is negative: :math:`S D` with
    :math:`D = \operatorname{diag}(\pm 1)` is lower triangular with a positive
    diagonal and :math:`S D D S^\top = S S^\top`.
    """
    tril = jnp.tril(raw)
    signs = jnp.where(jnp.diagonal(tril, axis1=-2, axis2=-1) < 0, -1.0, 1.0)
    return tril * signs[..., None, :]


class AutoSVGP(AutoGuide):
    r"""Automatic guide for models built with :func:`~numpyro_svgp.svgp`.

    Usage::

        guide = ns.AutoSVGP(model)
        svi = SVI(model, guide, optax.adam(5e-2), ns.SVGP_ELBO())

    Parameters it creates, following numpyro's naming:

    - ``{site}_{prefix}_loc`` (``(M,)``, init 0) and ``{site}_{prefix}_scale_tril``
      (``(M, M)``, init ``init_whitened_scale * I``; its lower triangle is
      :math:`S`, see :func:`whitened_scale_tril`) for each whitened svgp site;
    - ``{site}_{prefix}_loc`` and ``{site}_{prefix}_scale`` for every other
      continuous latent site (mean-field Normal in unconstrained space, as in
      :class:`~numpyro.infer.autoguide.AutoNormal`).

    :param callable model: a NumPyro model.
    :param str prefix: prefix of the parameter names; default ``"auto"``.
    :param callable init_loc_fn: initialisation of the non-svgp sites' locations
        (see numpyro's ``init_strategy``); default ``init_to_median``.
    :param float init_scale: initial scale of the non-svgp mean-field Normals.
    :param float init_whitened_scale: initial :math:`S = c I` of :math:`q(v)`;
        the default 1.0 starts :math:`q(v)` at the prior.
    :param callable create_plates: as in :class:`~numpyro.infer.autoguide.AutoGuide`.

    **References**: Hensman, Matthews & Ghahramani (2015), *Scalable variational
    Gaussian process classification*.
    """

    scale_constraint = constraints.softplus_positive

    def __init__(
        self,
        model,
        *,
        prefix="auto",
        init_loc_fn=init_to_median,
        init_scale=0.1,
        init_whitened_scale=1.0,
        create_plates=None,
    ):
        if not init_scale > 0 or not init_whitened_scale > 0:
            raise ValueError(
                f"init_scale and init_whitened_scale must be positive, got "
                f"{init_scale} and {init_whitened_scale}."
            )
        self._init_scale = init_scale
        self._init_whitened_scale = init_whitened_scale
        self._event_dims = {}
        self._whitened_sites = frozenset()
        super().__init__(
            model, prefix=prefix, init_loc_fn=init_loc_fn, create_plates=create_plates
        )

    def _setup_prototype(self, *args, **kwargs):
        # numpyro's initialisation evaluates log densities, where a wrongly sized
        # or non-finite observation fails with a vague message; name it first.
        with block():
            model_trace = trace(seed(self.model, 0)).get_trace(*args, **kwargs)
        for name, site in model_trace.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                check_observed_site(name, site)
            elif site["fn"].support.is_discrete:
                raise ValueError(
                    f"AutoSVGP handles continuous latent sites only; site '{name}' is "
                    "discrete. Marginalise it out (numpyro's enumeration) or use another guide."
                )
        super()._setup_prototype(*args, **kwargs)
        whitened = []
        for name, site in self._latent_sites():
            prior = svgp_site(site)
            if prior is not None:
                whitened.append(name)
                # the dtype of the svgp's computation, not of the prototype's draw
                # (numpyro draws MVN noise in the default float dtype, float64 under x64)
                dtype = prior.conditional.projection.dtype
                self._init_locs[name] = jnp.zeros(jnp.shape(site["value"]), dtype)
                continue
            self._event_dims[name] = (
                site["fn"].event_dim + jnp.ndim(self._init_locs[name]) - jnp.ndim(site["value"])
            )
        self._whitened_sites = frozenset(whitened)

    def _latent_sites(self):
        for name, site in self.prototype_trace.items():
            if site["type"] == "sample" and not site["is_observed"]:
                yield name, site

    def _param_name(self, site_name, what):
        return f"{site_name}_{self.prefix}_{what}"

    def __call__(self, *args, **kwargs):
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        result = {}
        for name, site in self._latent_sites():
            if name in self._whitened_sites:
                loc, scale_tril = self._whitened_params(name)
                result[name] = numpyro.sample(
                    name, dist.MultivariateNormal(loc, scale_tril=scale_tril)
                )
                continue
            event_dim = self._event_dims[name]
            init_loc = self._init_locs[name]
            with ExitStack() as stack:
                for frame in site["cond_indep_stack"]:
                    stack.enter_context(plates[frame.name])
                loc = numpyro.param(self._param_name(name, "loc"), init_loc, event_dim=event_dim)
                scale = numpyro.param(
                    self._param_name(name, "scale"),
                    jnp.full(jnp.shape(init_loc), self._init_scale),
                    constraint=self.scale_constraint,
                    event_dim=event_dim,
                )
                normal = dist.Normal(loc, scale).to_event(event_dim)
                support = site["fn"].support
                if support is constraints.real or (
                    isinstance(support, constraints.independent)
                    and support.base_constraint is constraints.real
                ):
                    result[name] = numpyro.sample(name, normal)
                else:
                    result[name] = numpyro.sample(
                        name, dist.TransformedDistribution(normal, biject_to(support))
                    )
        return result

    def _whitened_params(self, name):
        init_loc = self._init_locs[name]
        num_inducing = init_loc.shape[-1]
        loc = numpyro.param(self._param_name(name, "loc"), init_loc)
        raw = numpyro.param(
            self._param_name(name, "scale_tril"),
            self._init_whitened_scale * jnp.eye(num_inducing, dtype=init_loc.dtype),
        )
        return loc, whitened_scale_tril(raw)

    def _constrain(self, unconstrained):
        """Map unconstrained latent values (with any leading sample dims) to the model's supports."""
        constrained = {}
        for name, site in self._latent_sites():
            value = unconstrained[name]
            if name not in self._whitened_sites:
                value = biject_to(site["fn"].support)(value)
            constrained[name] = value
        return constrained

    def _check_setup(self):
        if self.prototype_trace is None:
            raise RuntimeError(
                "AutoSVGP has not seen the model yet: run SVI (or call the guide with "
                "the model's arguments) before asking for posterior summaries."
            )

    def sample_posterior(self, rng_key, params, *args, sample_shape=(), **kwargs):
        """Draw latent values from the fitted guide.

        :param rng_key: a JAX random key.
        :param dict params: the SVI params (``svi_result.params``).
        :param tuple sample_shape: leading shape of the draws.
        :return: a dict from latent site name to constrained draws of shape
            ``sample_shape + site_shape``.
        """
        self._check_setup()
        keys = jax.random.split(rng_key, len(self._init_locs))
        draws = {}
        for key, (name, _) in zip(keys, self._latent_sites()):
            loc = params[self._param_name(name, "loc")]
            if name in self._whitened_sites:
                tril = whitened_scale_tril(params[self._param_name(name, "scale_tril")])
                q = dist.MultivariateNormal(loc, scale_tril=tril)
            else:
                q = dist.Normal(loc, params[self._param_name(name, "scale")])
            draws[name] = q.sample(key, sample_shape)
        return self._constrain(draws)

    def median(self, params):
        """Posterior median of each latent site (the Gaussian's mean, mapped to the support)."""
        self._check_setup()
        return self._constrain(
            {name: params[self._param_name(name, "loc")] for name, _ in self._latent_sites()}
        )

    def quantiles(self, params, quantiles):
        """Marginal posterior quantiles of each latent site.

        :param dict params: the SVI params.
        :param list quantiles: values in (0, 1).
        :return: a dict from site name to an array of shape ``(len(quantiles),) + site_shape``.
        """
        self._check_setup()
        quantiles = jnp.asarray(quantiles)
        latent = {}
        for name, _ in self._latent_sites():
            loc = params[self._param_name(name, "loc")]
            if name in self._whitened_sites:
                tril = whitened_scale_tril(params[self._param_name(name, "scale_tril")])
                scale = jnp.sqrt(jnp.sum(jnp.square(tril), axis=-1))
            else:
                scale = params[self._param_name(name, "scale")]
            q = quantiles.reshape((-1,) + (1,) * jnp.ndim(loc))
            latent[name] = dist.Normal(loc, scale).icdf(q)
        return self._constrain(latent)
