r"""MCMC on SVGP models: the SGPMC log density.

A model with an :func:`~numpyro_svgp.svgp` site has latent whitened inducing values
:math:`v`, its other latents :math:`\theta` (kernel hyperparameters, noise, ...), and
observed sites that depend on :math:`f(X)`. Given :math:`v` and :math:`\theta`, the
values of :math:`f` at the data are independent Gaussians,

.. math:: p(f_n \mid v, \theta) = \mathcal N\big(a_n^\top v,\; k_{nn} - a_n^\top a_n\big),
    \qquad A = K_{xz} L^{-\top},

and Hensman, Matthews, Filippone & Ghahramani (2015) sample :math:`(v, \theta)` by MCMC
from the density

.. math:: \log p(v) + \log p(\theta) + \sum_n \mathbb E_{p(f_n \mid v, \theta)}
    \big[\log p(y_n \mid f_n, \theta)\big],

which, with :math:`p(f \mid v, \theta)` for :math:`q`, is the data term of the ELBO at a
point mass :math:`q(v) = \delta_v`. :class:`sgpmc` makes a model's log density this one.
Each observed site's expectation is taken by :mod:`numpyro_svgp._integrate`: in closed
form for a Gaussian, by Gauss–Hermite quadrature for a likelihood that depends on one or
two outputs point by point, and never by sampling: a site that would need Monte Carlo is
refused. With :math:`Z = X` (and a Gaussian likelihood) the conditional variance is zero
and the density is the exact GP's, written in the whitened coordinates.

**Reference**: Hensman, Matthews, Filippone & Ghahramani (2015), *MCMC for
variationally sparse Gaussian processes*, NeurIPS.
"""

import jax
import jax.numpy as jnp
import numpyro
from numpyro.handlers import block, scale, trace
from numpyro.primitives import Messenger

from numpyro_svgp._checks import nan_on_failed_checks
from numpyro_svgp._integrate import (
    _ExpectedNormal,
    _Options,
    _peel,
    _rewrap,
    _run,
    check_quadrature_points,
    hermite_grid,
    plan_model,
)
from numpyro_svgp._predict_y import _pointwise
from numpyro_svgp._svgp import output_values

__all__ = ["sgpmc"]


class sgpmc:
    r"""The model with the SGPMC log density, for NUTS, HMC and HMCGibbs.

    Example::

        mcmc = MCMC(NUTS(ns.sgpmc(model)), num_warmup=500, num_samples=500)
        mcmc.run(jax.random.PRNGKey(0), X, y)
        samples = mcmc.get_samples()                        # v ("f_whitened") and θ
        draws = Predictive(model, samples)(jax.random.PRNGKey(1), X_test)   # f, y

    Warm start from an SVI fit (the guide's median as the initial values)::

        NUTS(ns.sgpmc(model), init_strategy=init_to_value(values=guide.median(params)))

    The result runs ``model`` with the same latent sites (each svgp's whitened site and
    every other latent) and replaces the model's observed sites by one factor each,
    ``f"{name}_sgpmc"``, holding one term per observation,

    .. math:: \ell_n(v, \theta) = \mathbb E_{p(f_n \mid v, \theta)}
        \big[\log p(y_n \mid f_n, \theta)\big],

    of the site's shape (without the sum of ``to_event``; a masked element gives 0; a
    distribution with an event shape of its own gives one term per vector), scaled in the
    density as the site was (a subsample's :math:`N / B`). Its log density is
    deterministic: nothing is drawn. Outputs and deterministic sites are not recorded
    (their values would be placeholders): draw them from the samples with
    ``Predictive(model, samples)``.

    ``az.from_numpyro(mcmc)`` and ``numpyro.infer.log_likelihood`` read the unscaled
    :math:`\ell_n`, so ``az.loo`` scores each observation, with the importance weights of
    leaving :math:`y_n` out of this density. By Jensen's inequality :math:`\ell_n` is at
    most the predictive :math:`\log \mathbb E_{p(f_n \mid v, \theta)}[p(y_n \mid f_n,
    \theta)]`, with equality where :math:`f_n` given :math:`v` has no variance (e.g.
    :math:`Z = X`); ``ns.to_inference_data(mcmc.get_samples(), model=model,
    model_args=(X, y), log_likelihood=True)`` scores that predictive density instead (see
    :func:`~numpyro_svgp.pointwise_log_likelihood`).

    A traced value check that fails (a lengthscale that overflows, a factor of
    :math:`K_{zz}` that cannot be found even with the largest jitter) makes the log
    density NaN, which NUTS and HMC record as a divergence, instead of raising.

    :param fn: the model, which calls :func:`~numpyro_svgp.svgp`.
    :param int quadrature_points: Gauss–Hermite points per svgp output for the observed
        sites that are not Gaussian in an output (default 20).
    :raises ValueError: (when the model runs) if it has no svgp site, if a latent site
        depends on an svgp output, or if an observed site cannot be integrated exactly
        (it depends on an output other than point by point, on more than two outputs,
        or on an svgp whose inputs come from another svgp's output).

    **Reference**: Hensman, Matthews, Filippone & Ghahramani (2015), *MCMC for
    variationally sparse Gaussian processes*.
    """

    def __init__(self, fn, *, quadrature_points: int = 20):
        check_quadrature_points(quadrature_points)
        if not callable(fn):
            raise TypeError(
                f"ns.sgpmc needs the model (a callable), got {type(fn).__name__}: "
                "use ns.sgpmc(model) or ns.sgpmc(model, quadrature_points=K)."
            )
        self.fn = fn
        self.options = _Options(quadrature_points, "auto", "auto", False)

    def __call__(self, *args, **kwargs):
        model = nan_on_failed_checks(self.fn)
        placeholders = output_values(placeholder=True)
        latents = trace(_likelihood_hidden(placeholders(model))).get_trace(*args, **kwargs)
        if not placeholders.outputs:
            raise ValueError(
                "ns.sgpmc: the model has no ns.svgp site; run MCMC on the model itself."
            )
        # every site that reached the outer handlers, with their values: latent ones, ones
        # they observe (HMCGibbs conditions its Gibbs sites from outside), and the plates'
        # subsample indices (which HMCECS sets)
        values = {
            name: site["value"]
            for name, site in latents.items()
            if site["type"] in ("param", "sample", "plate")
        }
        with block():
            plan = plan_model(model, jax.random.PRNGKey(0), {}, values, args, kwargs, self.options)
        for name, integration in plan.integrations.items():
            _check_integrable(name, plan.model_trace[name], integration, latents)
        with block(), nan_on_failed_checks():
            terms = {
                name: _expected_log_prob(plan, name, model, values, args, kwargs, self.options)
                for name, site in plan.model_trace.items()
                if site["type"] == "sample" and site["is_observed"]
            }
        for name, term in terms.items():
            weight = plan.model_trace[name]["scale"]
            # the weight (a subsample's N / B) scales the density, as it did the site's,
            # but not the pointwise values that log_likelihood reads
            with scale(scale=1.0 if weight is None else weight):
                numpyro.factor(f"{name}_sgpmc", term)


def _check_integrable(name, site, integration, latents) -> None:
    if integration.method == "exact":
        return
    if not integration.outputs:
        # the whole model is Monte Carlo (an svgp whose inputs are another's output)
        raise ValueError(
            f"ns.sgpmc: the model cannot be integrated exactly: {integration.reason}. The "
            "SGPMC density takes E[log p(y | f)] in closed form or by quadrature, which "
            "needs each output's Gaussian marginals given its inducing values."
        )
    outputs = ", ".join(f"'{o}'" for o in integration.outputs)
    if not site["is_observed"]:
        if name in latents and latents[name]["is_observed"]:
            raise ValueError(
                f"ns.sgpmc: site '{name}' was observed by a handler outside ns.sgpmc, which "
                "sees the model's sites only after ns.sgpmc has set its likelihood: condition "
                "inside, ns.sgpmc(numpyro.handlers.condition(model, data)), or pass the "
                "observations to the model."
            )
        raise ValueError(
            f"ns.sgpmc: the latent site '{name}' depends on svgp output {outputs}. The "
            "SGPMC density integrates an output given its inducing values in observed "
            "sites only: observe the site, or write its distribution without the output."
        )
    if integration.method == "Monte Carlo":
        raise ValueError(
            f"ns.sgpmc: the observed site '{name}' cannot be integrated exactly: "
            f"{integration.reason}. The SGPMC density takes E[log p(y | f)] in closed form "
            "or by quadrature only; write the site's distribution as a function of the "
            "output at each point (e.g. Normal(f, s), Bernoulli(logits=f))."
        )


def _expected_log_prob(plan, name, model, values, args, kwargs, options) -> jax.Array:
    r""":math:`\mathbb E_{p(f \mid v, \theta)}[\log p(y_n \mid f_n)]` of an observed site,
    one value per observation (see :func:`_elementwise`), unscaled."""
    site = plan.model_trace[name]
    integration = plan.integrations.get(name)
    if integration is None or integration.method == "exact":
        return _elementwise(site["fn"], site["value"], name)
    key = jax.random.PRNGKey(0)

    def run_at(outputs):
        handler = output_values(values=outputs, placeholder=True)
        return _run(model, key, {}, values, args, kwargs, handler)[name]

    if integration.method == "closed form":
        output = integration.outputs[0]
        mean, variance = plan.moments(output)

        def base_loc(f):
            _, base = _peel(run_at({output: f})["fn"])
            return jnp.broadcast_to(base.loc, base.batch_shape)

        # the loc is the output moved by shape-only operations plus an offset: its
        # tangent along the variance is the variance moved the same way
        loc, spread = jax.jvp(base_loc, (mean,), (variance,))
        wrappers, base = _peel(site["fn"])
        expected = _rewrap(wrappers, _ExpectedNormal(loc, base.scale, spread))
        return _elementwise(expected, site["value"], name)
    nodes, log_weights = hermite_grid(
        {o: plan.moments(o) for o in integration.outputs}, options.quadrature_points
    )

    def at(node_values):
        at_node = run_at(node_values)
        return _elementwise(at_node["fn"], at_node["value"], name)

    return jnp.tensordot(jnp.exp(log_weights), jax.vmap(at)(nodes), axes=1)


def _elementwise(fn, value, name) -> jax.Array:
    """``log p(value)`` per observation: element by element without the sum of
    ``to_event`` (a masked element gives 0), or per batch element for a distribution
    with an event shape of its own (a vector per point)."""
    _, base = _peel(fn)
    if base.event_shape:
        return fn.log_prob(value)
    return _pointwise(fn, value, name, "ns.sgpmc")


class _likelihood_hidden(Messenger):
    """Hides the model's observed and deterministic sites from the handlers outside.

    Sites that those handlers send themselves while processing one of the model's
    sites pass: numpyro's potential adds each latent site's log-Jacobian as a factor
    from inside its ``substitute``, and that factor belongs to the density.
    """

    def __init__(self, fn=None):
        self._passed = []
        super().__init__(fn)

    def process_message(self, msg):
        if self._passed:
            return  # sent by an outer handler while it processes a site of the model
        if msg["type"] == "deterministic" or (msg["type"] == "sample" and msg["is_observed"]):
            msg["stop"] = True
        else:
            self._passed.append(msg)

    def postprocess_message(self, msg):
        if self._passed and self._passed[-1] is msg:
            self._passed.pop()
