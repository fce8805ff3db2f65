r"""Integration of every model site that depends on svgp outputs.

The ELBO needs :math:`\mathbb E_{q(f)}[\log p(y \mid f, \dots)]` for every site whose
density depends on an svgp output :math:`f`. :func:`plan_model` runs the model once with
the outputs left out (a zero placeholder; nothing of size ``(N, M)`` is formed), traces
the same run again as a function of the outputs, and reads from that jaxpr how each
site's log density depends on them (:mod:`numpyro_svgp._dependence`). Each site then
gets, in this order of preference:

- **closed form**: a ``Normal`` whose ``loc`` is one output moved by shape-only
  operations plus an offset that does not depend on it (a mean function, ``f + a[g]``,
  ``f[:, None]``, a dtype cast), and whose scale does not depend on any output:
  :math:`\mathbb E[\log \mathcal N(y \mid f + c, s^2)] = \log \mathcal N(y \mid \mu + c, s^2)
  - \sigma^2 / (2 s^2)`. With ``loc`` of shape ``(N,)`` this is the data-term engine
  of :mod:`numpyro_svgp._gaussian` (matrix or per-point form, whole or in blocks);
- **Gauss–Hermite quadrature**: a log density that is a sum of terms each depending on
  one point of each output (any NumPyro likelihood of ``f`` at each point; two outputs,
  as in ``Normal(f, exp(g))``, by a product rule over both), exact for the Gaussian
  marginals :math:`q(f_n) = \mathcal N(\mu_n, \sigma^2_n)` up to the rule's error;
- **Monte Carlo**: one draw of the outputs from :math:`q` per particle, where none of
  the above can be established (with the reason).

The choice is structural, made while tracing; :func:`~numpyro_svgp.integration_report`
shows it.
"""

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import jaxpr_as_fun
from numpy.polynomial.hermite_e import hermegauss
from numpyro.distributions import (
    Delta,
    ExpandedDistribution,
    Independent,
    LowRankMultivariateNormal,
    MaskedDistribution,
    MultivariateNormal,
    Normal,
)
from numpyro.handlers import replay, seed, substitute, trace

from numpyro_svgp._checks import check_observed_site
from numpyro_svgp._conditional import predictive_moments
from numpyro_svgp._dependence import CONST, analyse, pointwise, prune
from numpyro_svgp._gaussian import gaussian_expected_log_likelihood
from numpyro_svgp._linalg import after_both_ways, safe_sqrt
from numpyro_svgp._svgp import draw_with_key, output_values, svgp_site

__all__ = [
    "Integration",
    "ModelPlan",
    "check_quadrature_points",
    "hermite_grid",
    "plan_model",
    "site_log_prob",
]

MAX_QUADRATURE_OUTPUTS = 2
"""Most svgp outputs one site may depend on for quadrature (a product rule of K^d nodes)."""


class Integration(NamedTuple):
    """How one site's expected log density is computed."""

    method: str
    """``"closed form"``, ``"quadrature"``, ``"Monte Carlo"`` or ``"exact"`` (the site
    does not depend on any svgp output)."""
    outputs: tuple = ()
    """The svgp outputs the site depends on."""
    points: int = 0
    """Quadrature points per output."""
    reason: str = ""
    """Why Monte Carlo, or what else is estimated by sampling (a non-Gaussian q(v))."""

    def describe(self) -> str:
        if self.method == "quadrature":
            return f"quadrature ({' x '.join([str(self.points)] * len(self.outputs))} points)"
        return self.method


def site_log_prob(site) -> jax.Array:
    """``sum(scale * log p(value))`` of a sample site."""
    log_prob = site["fn"].log_prob(site["value"])
    if site["scale"] is not None:
        log_prob = site["scale"] * log_prob
    return jnp.sum(log_prob)


def _peel(fn):
    wrappers = []
    while isinstance(fn, (Independent, ExpandedDistribution, MaskedDistribution)):
        wrappers.append(fn)
        fn = fn.base_dist
    return wrappers, fn


def _rewrap(wrappers, base):
    for wrapper in reversed(wrappers):
        if isinstance(wrapper, Independent):
            base = Independent(base, wrapper.reinterpreted_batch_ndims)
        elif isinstance(wrapper, MaskedDistribution):
            base = MaskedDistribution(base, wrapper._mask)
        else:
            base = ExpandedDistribution(base, wrapper.batch_shape)
    return base


class _ExpectedNormal(Normal):
    r""":math:`\mathbb E_{f \sim \mathcal N(\mu, \sigma^2)} \log \mathcal N(y \mid f, s^2)` as a
    ``log_prob``, so that the site's own wrappers (plates, masks, ``to_event``) apply."""

    def __init__(self, loc, scale, spread):
        self.spread = spread
        super().__init__(loc, scale)

    def log_prob(self, value):
        return super().log_prob(value) - 0.5 * self.spread / jnp.square(self.scale)


class _Options(NamedTuple):
    quadrature_points: int = 20
    gaussian_form: str = "auto"
    block_rows: "int | str | None" = "auto"
    strict: bool = False


class ModelPlan:
    """The model run with svgp outputs integrated out: its trace, how each site
    depending on an output is integrated, and the terms themselves
    (:meth:`log_density`). Built by :func:`plan_model`."""

    def __init__(self, model_trace, integrations, evaluate):
        self.model_trace = model_trace
        self.integrations = integrations
        self._evaluate = evaluate

    def moments(self, output: str) -> tuple[jax.Array, jax.Array]:
        """Mean and variance of an svgp output under the guide's :math:`q`."""
        return self._evaluate.moments(output)

    def log_density(self, name: str) -> jax.Array:
        r"""The site's :math:`\mathbb E_{q(f)}[\sum \text{scale} \cdot \log p]` (its plain
        log density where it does not depend on any svgp output)."""
        integration = self.integrations.get(name)
        if integration is None or integration.method == "exact":
            return site_log_prob(self.model_trace[name])
        return self._evaluate(name, integration)


def _run(model, model_key, guide_trace, param_map, args, kwargs, handler):
    conditioned = substitute(replay(seed(model, model_key), guide_trace), data=param_map)
    return trace(handler(conditioned)).get_trace(*args, **kwargs)


def plan_model(model, model_key, guide_trace, param_map, args, kwargs, options: _Options):
    """Run ``model`` against ``guide_trace`` and decide how each site depending on an
    svgp output is integrated (see the module docstring)."""
    placeholders = output_values(placeholder=True)
    model_trace = _run(model, model_key, guide_trace, param_map, args, kwargs, placeholders)
    outputs = placeholders.outputs  # name -> (conditional, v), in model order
    sites = [
        name
        for name, site in model_trace.items()
        if site["type"] == "sample" and svgp_site(site) is None
    ]
    for name in sites:
        if model_trace[name]["is_observed"]:
            check_observed_site(name, model_trace[name])
    if not outputs:
        return ModelPlan(model_trace, {}, None)
    names = list(outputs)
    zeros = tuple(jnp.zeros(c.output_shape, c.dtype) for c, _ in outputs.values())

    def rerun(*values):
        handler = output_values(values=dict(zip(names, values, strict=True)))
        tr = _run(model, model_key, guide_trace, param_map, args, kwargs, handler)
        terms, normals = {}, {}
        for name in sites:
            site = tr[name]
            if site["is_observed"]:
                check_observed_site(name, site)  # its NaN check stays with the value used
            terms[name] = site_log_prob(site)
            wrappers, base = _peel(site["fn"])
            if site["is_observed"] and type(base) is Normal:
                masks = [w._mask for w in wrappers if isinstance(w, MaskedDistribution)]
                normals[name] = (base.loc, (base.scale, site["value"], site["scale"], masks))
        inputs = {
            o: [
                leaf
                for leaf in jax.tree.leaves((c.kernel, c.inducing, c.inputs))
                if eqx.is_array(leaf)
            ]
            for o, (c, _) in handler.outputs.items()
        }
        return terms, normals, inputs

    closed, shapes = jax.make_jaxpr(rerun, return_shape=True)(*zeros)
    index = jax.tree.unflatten(jax.tree.structure(shapes), range(len(jax.tree.leaves(shapes))))
    tags = {}
    for position, name in enumerate(names):
        in_tags = [CONST] * len(names)
        in_tags[position] = pointwise(range(zeros[position].ndim), shifted=True)
        tags[name] = analyse(closed.jaxpr, in_tags)

    def tags_of(indices):
        """output name -> tags of the jaxpr outputs at ``indices``."""
        return {o: [tags[o][i] for i in jax.tree.leaves(indices)] for o in names}

    # An svgp whose inputs are computed from another output (a deep GP) needs that
    # output's values, not its marginals: then every site is estimated by Monte Carlo.
    for target, indices in index[2].items():
        feeding = [o for o, ts in tags_of(indices).items() if any(t.kind != "const" for t in ts)]
        if feeding:
            reason = f"svgp '{target}' takes its inputs from svgp output '{feeding[0]}'"
            return _monte_carlo_plan(
                model, model_key, guide_trace, param_map, args, kwargs, sites, reason, options
            )

    integrations = {}
    for name in sites:
        term = tags_of(index[0][name])
        deps = tuple(o for o in names if term[o][0].kind != "const")
        if not deps:
            integrations[name] = Integration("exact")
            continue
        lost = [(o, term[o][0]) for o in deps if term[o][0].kind == "any"]
        if lost:
            o, tag = lost[0]
            reason = (
                f"its log density couples several values of svgp output '{o}' in one term "
                f"(through `{tag.reason}`): the outputs at one point, as a softmax over a "
                "family of GPs does, or several points, as a joint density does"
            )
            integrations[name] = _monte_carlo(name, deps, reason, options)
        elif (
            len(deps) == 1
            and name in index[1]
            and _is_shifted_normal(tags_of(index[1][name]), deps[0])
        ):
            integrations[name] = Integration("closed form", deps)
        elif len(deps) <= MAX_QUADRATURE_OUTPUTS:
            integrations[name] = Integration("quadrature", deps, options.quadrature_points)
        else:
            reason = (
                f"it depends on {len(deps)} svgp outputs ({', '.join(deps)}); quadrature "
                f"covers at most {MAX_QUADRATURE_OUTPUTS}"
            )
            integrations[name] = _monte_carlo(name, deps, reason, options)

    for output in names:
        q, why = whitened_q(output, outputs, model_trace, guide_trace)
        if q is not None:
            continue
        # f given v is still integrated exactly; v itself is one draw from q
        reason = f"{why}: exact over f given v, at one draw of v"
        for name, integration in integrations.items():
            if (
                integration.method in ("closed form", "quadrature")
                and output in integration.outputs
            ):
                if options.strict:
                    raise ValueError(
                        f"SVGP_ELBO(strict=True): site '{name}' cannot be integrated exactly: "
                        f"{reason}. Use a Gaussian guide for it (AutoSVGP gives a full-rank "
                        "MultivariateNormal), or strict=False to accept the estimate."
                    )
                note = reason if not integration.reason else f"{integration.reason}; {reason}"
                integrations[name] = integration._replace(reason=note)

    evaluate = _Evaluator(
        closed, index, tags, names, zeros, outputs, guide_trace, model_trace, model_key, options
    )
    return ModelPlan(model_trace, integrations, evaluate)


def _is_shifted_normal(normal_tags, output) -> bool:
    loc, *rest = normal_tags[output]
    others = [t for o, ts in normal_tags.items() if o != output for t in ts]
    return loc.kind == "pointwise" and loc.shifted and all(t.kind == "const" for t in rest + others)


def _monte_carlo(name, deps, reason, options) -> Integration:
    if options.strict:
        raise ValueError(
            f"SVGP_ELBO(strict=True): site '{name}' cannot be integrated exactly: {reason}. "
            "Make the site's density a function of the svgp output at each point (e.g. "
            "Normal(f, s), Bernoulli(logits=f)), or use strict=False to accept a "
            "Monte-Carlo estimate for it."
        )
    return Integration("Monte Carlo", deps, reason=reason)


def _monte_carlo_plan(
    model, model_key, guide_trace, param_map, args, kwargs, sites, reason, options
):
    if options.strict:
        raise ValueError(
            f"SVGP_ELBO(strict=True): the model cannot be integrated exactly: {reason}. "
            "Use strict=False to accept a Monte-Carlo estimate."
        )
    model_trace = _run(model, model_key, guide_trace, param_map, args, kwargs, lambda fn: fn)
    integrations = {}
    for name in sites:
        if model_trace[name]["is_observed"]:
            check_observed_site(name, model_trace[name])
        integrations[name] = Integration("Monte Carlo", reason=reason)

    def evaluate(name, integration):
        return site_log_prob(model_trace[name])

    return ModelPlan(model_trace, integrations, evaluate)


def gaussian_q(q):
    r"""``(loc, scale_tril)`` of a guide distribution :math:`q(v)` that is Gaussian, else ``None``.

    Full-rank and low-rank ``MultivariateNormal`` and a diagonal
    ``Normal(...).to_event(1)`` give their mean and a Cholesky factor of their covariance.
    """
    if isinstance(q, (MultivariateNormal, LowRankMultivariateNormal)):
        return q.loc, q.scale_tril
    if (
        isinstance(q, Independent)
        and type(q.base_dist) is Normal
        and q.reinterpreted_batch_ndims == 1
        and len(q.event_shape) == 1
    ):
        shape = q.batch_shape + q.event_shape
        loc, scale = (jnp.broadcast_to(a, shape) for a in (q.base_dist.loc, q.base_dist.scale))
        return loc, scale[..., None] * jnp.eye(shape[-1], dtype=scale.dtype)
    return None


def whitened_q(output, outputs, model_trace, guide_trace):
    r"""The guide's :math:`q(v)` for an svgp output, as ``((loc, scale_tril), "")`` when
    the expectation over it can be taken exactly, else ``(None, why)``.

    A point mass (``AutoDelta``, or a whitened site the guide does not cover) gives the
    point and a zero factor. A ``Delta`` computed from the guide's own auxiliary sites
    (``AutoMultivariateNormal`` and the other ``AutoContinuous`` guides unpack one joint
    draw that way) is a draw, not a point mass: its q(v) is not known site by site.
    """
    conditional, v = outputs[output]
    M = conditional.num_inducing
    for name, site in model_trace.items():
        prior = svgp_site(site)
        if prior is None or prior.output != output:
            continue
        if name not in guide_trace:
            return (v, jnp.zeros(jnp.shape(v) + (M,), conditional.dtype)), ""
        q = guide_trace[name]["fn"]
        gaussian = gaussian_q(q)
        if gaussian is not None:
            return gaussian, ""
        point = q.base_dist if isinstance(q, Independent) else q
        if isinstance(point, Delta):
            auxiliary = [
                n
                for n, s in guide_trace.items()
                if s["type"] == "sample" and not s["is_observed"] and n not in model_trace
            ]
            if not auxiliary:
                return (
                    jnp.broadcast_to(point.v, q.shape()),
                    jnp.zeros(tuple(q.shape()) + (M,), conditional.dtype),
                ), ""
            return None, (
                f"v of svgp output '{output}' is drawn through the guide's site '{auxiliary[0]}'"
            )
        return None, f"q(v) of svgp output '{output}' is a {type(q).__name__}, not Gaussian"
    return (v, jnp.zeros(jnp.shape(v) + (M,), conditional.dtype)), ""


class _Evaluator:
    """Computes the integrated terms of one plan, sharing each output's marginals."""

    def __init__(
        self,
        closed,
        index,
        tags,
        names,
        zeros,
        outputs,
        guide_trace,
        model_trace,
        model_key,
        options,
    ):
        self.closed, self.index, self.tags, self.names, self.zeros = (
            closed,
            index,
            tags,
            names,
            zeros,
        )
        self.outputs, self.guide_trace, self.model_trace = outputs, guide_trace, model_trace
        self.model_key, self.options = model_key, options
        self._moments, self._draws = {}, {}
        # what the next output's computation waits for (see _ordered)
        self._last = tuple(c.cholesky for c, _ in outputs.values())

    def _ordered(self, compute, *inputs):
        """``compute(*inputs)``, run after the computation of the output before it and,
        in the gradient, transposed before that one's transpose.

        Each output's solves read only its own factor, and on XLA:CPU two batched LAPACK
        calls at once can deadlock (see :func:`~numpyro_svgp._linalg.after`); the
        factors themselves are ordered as the model makes them (``svgp``). With one
        output nothing is added.
        """
        if len(self.names) < 2:
            return compute(*inputs)
        result = compute(*after_both_ways(inputs, self._last))
        self._last = result
        return result

    def _q(self, output):
        """(loc, scale_tril) of q(v) for an output; the drawn v (S = 0) if q is not known."""
        q, _ = whitened_q(output, self.outputs, self.model_trace, self.guide_trace)
        if q is None:
            conditional, v = self.outputs[output]
            return v, jnp.zeros(jnp.shape(v) + (conditional.num_inducing,), conditional.dtype)
        return q

    def moments(self, output):
        if output not in self._moments:
            conditional, _ = self.outputs[output]
            self._moments[output] = self._ordered(predictive_moments, conditional, *self._q(output))
        return self._moments[output]

    def draw(self, output):
        """One draw of the output from q: A v + sqrt(diag(K - A A^T)) eps, v from the guide."""
        if output not in self._draws:
            conditional, v = self.outputs[output]
            key = jax.random.fold_in(self.model_key, self.names.index(output))
            self._draws[output] = self._ordered(draw_with_key, conditional, v, key)
        return self._draws[output]

    def function(self, indices):
        """The jaxpr's outputs at ``indices`` as a function of the svgp outputs."""
        return jaxpr_as_fun(prune(self.closed, list(indices)))

    def _with(self, replacements):
        return tuple(replacements.get(o, z) for o, z in zip(self.names, self.zeros, strict=True))

    def __call__(self, name, integration):
        if integration.method == "Monte Carlo":
            term = self.function([self.index[0][name]])
            values = self._with({o: self.draw(o) for o in integration.outputs})
            return term(*values)[0]
        if integration.method == "closed form":
            return self._closed_form(name, integration.outputs[0])
        return self._quadrature(name, integration)

    def _closed_form(self, name, output):
        site = self.model_trace[name]
        wrappers, base = _peel(site["fn"])
        loc_fn = self.function([self.index[1][name][0]])
        conditional, _ = self.outputs[output]
        N = conditional.num_points
        value, weight = site["value"], site["scale"]
        fast = (
            not conditional.family.shape
            and jnp.shape(base.loc) == (N,)
            and jnp.shape(value) == (N,)
            and tuple(site["fn"].batch_shape) + tuple(site["fn"].event_shape) == (N,)
            and not any(isinstance(w, MaskedDistribution) for w in wrappers)
            and jnp.shape(base.scale) in ((), (1,), (N,))
            and (weight is None or jnp.shape(weight) in ((), (N,)))
            and self._identity(name, output)
        )
        if fast:
            offset = loc_fn(*self.zeros)[0]
            loc, scale_tril = self._q(output)

            def term(conditional, loc, scale_tril):
                return gaussian_expected_log_likelihood(
                    conditional,
                    loc,
                    scale_tril,
                    (value - offset).astype(conditional.dtype),
                    jnp.square(base.scale),
                    weight,
                    form=self.options.gaussian_form,
                    block_rows=self.options.block_rows,
                )

            return self._ordered(term, conditional, loc, scale_tril)
        mean, variance = self.moments(output)
        position = self.names.index(output)

        def loc_of(f):
            values = list(self.zeros)
            values[position] = f
            return loc_fn(*values)[0]

        loc, spread = jax.jvp(loc_of, (mean,), (variance,))
        expected = _rewrap(wrappers, _ExpectedNormal(loc, base.scale, spread))
        log_prob = expected.log_prob(value)
        return jnp.sum(log_prob if weight is None else weight * log_prob)

    def _identity(self, name, output) -> bool:
        """Whether the site's loc is the output itself along its one axis (plus an offset)."""
        return self.tags[output][self.index[1][name][0]] == pointwise((0,), shifted=True)

    def _quadrature(self, name, integration):
        term = self.function([self.index[0][name]])
        moments = {output: self.moments(output) for output in integration.outputs}
        nodes, log_weights = hermite_grid(moments, integration.points)

        def at(node_values):
            return term(*self._with(node_values))[0]

        return jnp.sum(jnp.exp(log_weights) * jax.vmap(at)(nodes))


def check_quadrature_points(points) -> int:
    """``points`` if it is a valid number of Gauss–Hermite points per output."""
    if isinstance(points, bool) or not isinstance(points, int) or not 1 <= points <= 100:
        raise ValueError(f"quadrature_points must be an int in [1, 100], got {points!r}.")
    return points


def hermite_grid(moments: dict, points: int):
    r"""Gauss–Hermite product nodes for outputs with Gaussian marginals.

    :param dict moments: output name to ``(mean, variance)``, all of one dtype.
    :param int points: :math:`K`, nodes per output.
    :return: ``(nodes, log_weights)``: output name to its values at the :math:`K^d` nodes,
        shape ``(K^d,) +`` the output's shape, and the log weights ``(K^d,)`` (they sum to 1).
    """
    dtype = next(iter(moments.values()))[0].dtype
    nodes_1d, weights_1d = hermegauss(points)
    x = jnp.asarray(nodes_1d, dtype)
    log_w = jnp.asarray(np.log(weights_1d / np.sum(weights_1d)), dtype)
    grids = [
        g.reshape(-1) for g in jnp.meshgrid(*[jnp.arange(points)] * len(moments), indexing="ij")
    ]
    nodes = {
        output: mean + safe_sqrt(variance) * x[g].reshape((-1,) + (1,) * jnp.ndim(mean))
        for (output, (mean, variance)), g in zip(moments.items(), grids, strict=True)
    }
    return nodes, jnp.sum(jnp.stack([log_w[g] for g in grids]), axis=0)
