r"""``AutoSVGP``: the automatic guide for models that contain ``svgp`` sites.

For every whitened site ``f"{name}_whitened"`` placed by :func:`~numpyro_svgp.svgp`
it supplies a full-rank Gaussian :math:`q(v) = \mathcal N(m, S S^\top)` with lower
triangular :math:`S`, so :math:`\log\det(S S^\top) = 2\sum_i \log |S_{ii}|` and the KL
to the :math:`\mathcal N(0, I)` prior is analytic.

:math:`S` is parametrised as in GPflow's SVGP: its lower triangle is free, the
diagonal included, and starts at the prior, :math:`S = I`. The diagonal is not
pushed through ``exp``/``softplus``: that reparametrisation slows the early shrinking
of :math:`q(v)`, and while :math:`q` lags, the kernel hyperparameters move to fit the
wide :math:`q` (the kernel variance is driven down) rather than the data. A diagonal
entry may change sign; that leaves :math:`S S^\top` unchanged, and the guide hands
numpyro the equivalent factor with positive diagonal,
:math:`S\,\operatorname{diag}(\operatorname{sign} S_{ii})`.

``AutoSVGP`` is numpyro's :class:`~numpyro.infer.autoguide.AutoNormal` with the
whitened sites taken out of its prototype and guided here: every other continuous
latent site gets AutoNormal's mean-field Normal in unconstrained space, with its
handling of plates and of local latent sites under subsampled plates. Its prototype
comes from one run of the model with every latent site at ``init_loc_fn``'s value
(the whitened ones at 0) and nothing drawn for the svgp outputs.

A fresh guide set up on a prediction call with loaded params (a new process: rebuild the
model, ``ns.AutoSVGP(model)``, then ``predict_f``/``predict_y``/``Predictive`` with the
saved params) meets the observed sites as latent ones, since ``y`` is not passed. It
leaves unguided each latent site whose ``loc`` param the fitted params lack while they
hold those of :math:`q(v)`: such a site was observed in the fit, and the model draws it
from its likelihood, as it would with a guide set up on a training call.
"""

import inspect
import traceback
from collections import OrderedDict
from contextlib import ExitStack, contextmanager

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions.transforms import biject_to
from numpyro.distributions.util import periodic_repeat
from numpyro.handlers import block, seed, substitute, trace
from numpyro.infer.autoguide import AutoNormal
from numpyro.infer.initialization import init_to_median
from numpyro.infer.util import helpful_support_errors
from numpyro.primitives import _PYRO_STACK

from numpyro_svgp._checks import check_observed_site, is_traced
from numpyro_svgp._svgp import output_values, svgp_site

__all__ = ["AutoSVGP", "whitened_scale_tril"]


def _call_signature(args, kwargs):
    """What fixes the sizes of the model's plates in a call: the structure of the
    arguments, the shapes of the arrays and the other values."""
    leaves, treedef = jax.tree.flatten((args, kwargs))
    return treedef, [
        ("array", jnp.shape(x)) if isinstance(x, (jax.Array, np.ndarray)) else ("value", x)
        for x in leaves
    ]


def _same_signature(a, b) -> bool:
    if a is None or b is None or a[0] != b[0] or len(a[1]) != len(b[1]):
        return False
    for (kind_a, x), (kind_b, y) in zip(a[1], b[1], strict=True):
        if kind_a != kind_b:
            return False
        if x is y:
            continue
        try:
            if not bool(x == y):
                return False
        except Exception:  # values without a plain equality: assume they differ
            return False
    return True


def _param_given(name: str) -> bool:
    """Whether a param ``name`` called here would take its value from a handler around
    the call, such as ``substitute(guide, data=params)`` (as ``Predictive`` and the
    prediction functions run the guide), rather than its initial value.

    The message goes through the handlers' ``process_message`` only, as numpyro's
    ``apply_stack`` would send it, so nothing is recorded (``trace`` records in
    ``postprocess_message``) and no key is drawn (``seed`` ignores params).
    """
    msg = {
        "type": "param",
        "name": name,
        "fn": lambda value, *args, **kwargs: value,
        "args": (None,),
        "kwargs": {},
        "value": None,
        "scale": None,
        "cond_indep_stack": [],
        "infer": {},
    }
    for handler in reversed(_PYRO_STACK):
        handler.process_message(msg)
        if msg["type"] != "param":  # lifted to a sample site: not a fitted value
            return False
        if msg.get("stop"):  # handlers further out (a block) do not see it
            break
    return msg["value"] is not None


def _describe_empty_arguments(model, args, kwargs) -> list[str]:
    """The model's array arguments with no entries, named as in its signature."""
    try:
        named = inspect.signature(model).bind_partial(*args, **kwargs).arguments
        items = list(named.items())
    except (TypeError, ValueError):  # no signature to read (a wrapped callable)
        items = [(f"argument {i}", x) for i, x in enumerate(args)] + list(kwargs.items())
    return [
        f"{name} (shape {jnp.shape(leaf)})"
        for name, value in items
        for leaf in jax.tree.leaves(value)
        if isinstance(leaf, (jax.Array, np.ndarray)) and 0 in jnp.shape(leaf)
    ]


def _failed_plate(error: BaseException) -> tuple[str, object] | None:
    """The name and size of the ``numpyro.plate`` whose construction raised ``error``."""
    for frame, _ in traceback.walk_tb(error.__traceback__):
        local = frame.f_locals
        if (
            frame.f_code.co_name == "__init__"
            and isinstance(local.get("self"), numpyro.plate)
            and "name" in local
        ):
            return local["name"], local.get("size")
    return None


@contextmanager
def _explained_model_errors(tracer, model, args, kwargs):
    """Turn numpyro's bare errors from a run of the model into ones naming the cause:
    a plate of size 0 (an empty argument), and the broadcasting error that a group
    plate at numpyro's default ``dim=-1`` around an svgp gives at the data plate."""
    try:
        yield
    except AssertionError as error:
        plate = _failed_plate(error)
        if plate is None:
            raise
        empty = _describe_empty_arguments(model, args, kwargs)
        cause = (
            f": the model's argument{'s' if len(empty) > 1 else ''} {', '.join(empty)} "
            f"{'are' if len(empty) > 1 else 'is'} empty"
            if empty
            else ""
        )
        raise ValueError(
            f"the model's plate '{plate[0]}' has size {plate[1]}{cause}. numpyro needs a "
            "positive plate size: pass at least one data point."
        ) from error
    except ValueError as error:
        if "broadcast" not in str(error).lower():
            raise
        partial = tracer.trace
        for site in partial.values():
            info = svgp_site(site) if site["type"] == "sample" else None
            frames = [f for f in site.get("cond_indep_stack", []) if f.dim == -1]
            if info is None or not frames:
                continue
            output = partial.get(info.output, {}).get("value")
            shape = f" of shape {jnp.shape(output)}" if output is not None else ""
            frame = frames[0]
            raise ValueError(
                f"svgp('{info.output}', ...) is inside the plate '{frame.name}' (size "
                f"{frame.size}) at dim=-1 (numpyro's default), so a data plate nested in it "
                f"takes dim=-2, which does not fit the GP outputs{shape} (one row per "
                f"member of '{frame.name}', then the data points). Put the group plate at "
                f"dim=-2: numpyro.plate('{frame.name}', {frame.size}, dim=-2)."
            ) from error
        raise


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


class AutoSVGP(AutoNormal):
    r"""Automatic guide for models built with :func:`~numpyro_svgp.svgp`.

    Usage::

        guide = ns.AutoSVGP(model)
        svi = SVI(model, guide, optax.adam(5e-2), ns.SVGP_ELBO())

    Parameters it creates, following numpyro's naming:

    - ``{site}_{prefix}_loc`` (``(M,)``, init 0) and ``{site}_{prefix}_scale_tril``
      (``(M, M)``, init ``init_whitened_scale * I``; its lower triangle is
      :math:`S`, see :func:`whitened_scale_tril`) for each whitened svgp site (with the
      batch shape of any plate the site is in);
    - ``{site}_{prefix}_loc`` and ``{site}_{prefix}_scale`` for every other
      continuous latent site, exactly as :class:`~numpyro.infer.autoguide.AutoNormal`.

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
        self._init_whitened_scale = init_whitened_scale
        self._whitened = OrderedDict()
        self._plates_of_call = None
        self._checked_call = None
        super().__init__(
            model,
            prefix=prefix,
            init_loc_fn=init_loc_fn,
            init_scale=init_scale,
            create_plates=create_plates,
        )

    def _initial_value(self, site):
        # q(v) starts at the prior, so v's value is 0 and nothing need be drawn for it
        prior = svgp_site(site)
        if prior is not None:
            return np.zeros(prior.batch_shape + prior.event_shape, prior.conditional.dtype)
        return self.init_loc_fn(site)

    def _setup_prototype(self, *args, **kwargs):
        # One run of the model, outside jit, with every latent site at its initial value
        # and the svgp outputs as placeholders. numpyro's own set-up (initialize_model)
        # runs it twice more and differentiates its log density, primitive by primitive:
        # each primitive of a new shape is compiled on its own, which would dominate
        # the time to a first fit. The log density at the start is checked by the first
        # SVI step instead (ns.train skips and counts non-finite steps).
        tracer = trace(
            substitute(
                seed(output_values(self.model, placeholder=True), numpyro.prng_key()),
                substitute_fn=self._initial_value,
            )
        )
        with block(), _explained_model_errors(tracer, self.model, args, kwargs):
            prototype = tracer.get_trace(*args, **kwargs)
        whitened, self._init_locs = OrderedDict(), {}
        self._prototype_frames = {}
        # With the fitted params given (a fresh guide on a prediction call), a latent
        # site that has no params in them was observed in the fit (AutoNormal makes
        # params for every latent site): the model draws it, as it does for a guide set
        # up on a training call. Without q(v)'s params (SVI's set-up) nothing is dropped.
        fitted = any(
            _param_given(self._param_name(name, "loc"))
            for name, site in prototype.items()
            if site["type"] == "sample" and svgp_site(site) is not None
        )
        observed_in_fit = set()
        for name, site in prototype.items():
            if site["type"] == "plate":
                self._prototype_frame_full_sizes[name] = site["args"][0]
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                # numpyro's initialisation evaluates log densities, where a wrongly
                # sized or non-finite observation fails with a vague message
                check_observed_site(name, site)
                continue
            if (
                fitted
                and svgp_site(site) is None
                and not _param_given(self._param_name(name, "loc"))
            ):
                observed_in_fit.add(name)
                continue
            if site["fn"].support.is_discrete:
                raise ValueError(
                    f"AutoSVGP handles continuous latent sites only; site '{name}' is "
                    "discrete. Marginalise it out (numpyro's enumeration) or use another guide."
                )
            if isinstance(site["fn"], dist.Delta):
                raise ValueError(
                    f"Sample site '{name}' has a Delta distribution; record the value with "
                    "numpyro.deterministic instead."
                )
            for frame in site["cond_indep_stack"]:
                known = self._prototype_frames.setdefault(frame.name, frame)
                if known != frame:
                    raise ValueError(
                        f"the plate '{frame.name}' has inconsistent dim or size across sites."
                    )
            prior = svgp_site(site)
            if prior is not None:
                # one q(v) per member of a plate around the svgp (a family), at the
                # plate's full size when it is subsampled
                shape = list(jnp.shape(site["value"]))
                for frame in site["cond_indep_stack"]:
                    shape[frame.dim - 1] = self._prototype_frame_full_sizes[frame.name]
                # NumPy zeros: a guide first called inside jit (Predictive maps the guide
                # over keys) keeps a concrete value, not a tracer of that trace
                whitened[name] = (site, np.zeros(tuple(shape), prior.conditional.dtype))
                continue
            with helpful_support_errors(site):
                init_loc = biject_to(site["fn"].support).inv(site["value"])
            # inside jit the value is abstract; the fitted params replace it there
            if not is_traced(init_loc) and not np.all(np.isfinite(np.asarray(init_loc))):
                raise ValueError(
                    f"AutoSVGP: the initial value of site '{name}' is not finite in "
                    "unconstrained space; give init_loc_fn (e.g. init_to_value) a value "
                    "inside the site's support."
                )
            # AutoNormal's handling: event dims, and a local site under a subsampled
            # plate starts from its prototype values repeated to the plate's full size
            event_dim = site["fn"].event_dim + jnp.ndim(init_loc) - jnp.ndim(site["value"])
            self._event_dims[name] = event_dim
            for frame in site["cond_indep_stack"]:
                full_size = self._prototype_frame_full_sizes[frame.name]
                if full_size != frame.size:
                    init_loc = periodic_repeat(init_loc, full_size, frame.dim - event_dim)
            self._init_locs[name] = init_loc
        self._whitened = whitened
        # AutoNormal guides what is left (deterministic sites, such as the svgp
        # outputs, are no guide's business: AutoGuideList refuses them); a site observed
        # in the fit is marked observed, which AutoNormal leaves to the model
        self.prototype_trace = OrderedDict(
            (name, {**site, "is_observed": True} if name in observed_in_fit else site)
            for name, site in prototype.items()
            if name not in whitened and site["type"] != "deterministic"
        )

    def _param_name(self, site_name, what):
        return f"{site_name}_{self.prefix}_{what}"

    def whitened_param_names(self) -> list[tuple[str, str]]:
        """The ``(loc, scale_tril)`` parameter names of each whitened site's :math:`q(v)`
        (after the guide has seen the model)."""
        self._check_setup()
        return [
            (self._param_name(n, "loc"), self._param_name(n, "scale_tril")) for n in self._whitened
        ]

    @staticmethod
    def scale_tril(raw: jax.Array) -> jax.Array:
        """The Cholesky factor :math:`S` of :math:`q(v)` from the ``scale_tril`` param
        (:func:`whitened_scale_tril`)."""
        return whitened_scale_tril(raw)

    def __call__(self, *args, **kwargs):
        signature = _call_signature(args, kwargs)
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        elif not _same_signature(signature, self._checked_call):
            self._check_plate_sizes(args, kwargs)
        self._checked_call = signature
        # one set of plates for AutoNormal's sites and these (a subsampled plate made
        # twice would draw its indices twice)
        plates = self._plates_of_call = self._create_plates(*args, **kwargs)
        try:
            result = super().__call__(*args, **kwargs)
        finally:
            self._plates_of_call = None
        for name, (site, _) in self._whitened.items():
            with ExitStack() as stack:
                for frame in site["cond_indep_stack"]:
                    stack.enter_context(plates[frame.name])
                loc, scale_tril = self._whitened_params(name)
                result[name] = numpyro.sample(
                    name, dist.MultivariateNormal(loc, scale_tril=scale_tril)
                )
        return result

    def _check_plate_sizes(self, args, kwargs):
        """Refuse a call whose plates over guided latent sites differ in size from the
        fitted ones: the params hold one value per member of the fitted plate, and
        indexing past them would silently hand a new member another's value."""
        tracer = trace(seed(output_values(self.model, placeholder=True), 0))
        with block(), _explained_model_errors(tracer, self.model, args, kwargs):
            model_trace = tracer.get_trace(*args, **kwargs)
        for name, site in model_trace.items():
            if site["type"] != "plate" or name not in self._prototype_frames:
                continue
            size, fitted = site["args"][0], self._prototype_frame_full_sizes[name]
            if size != fitted:
                raise ValueError(
                    f"AutoSVGP: the model's plate '{name}' has size {size} in this call, "
                    f"but the guide was fitted with size {fitted}: its params hold one "
                    f"value per member of the fitted plate. Keep '{name}' at size "
                    f"{fitted} and draw the latents of new members in a separate plate "
                    "and site that the guide does not hold (Predictive then samples them "
                    "from their prior), e.g. a_new = numpyro.sample('a_new', ...) "
                    "under numpyro.plate('new_group', num_new)."
                )

    def _create_plates(self, *args, **kwargs):
        if self._plates_of_call is not None:
            return self._plates_of_call
        return super()._create_plates(*args, **kwargs)

    def _whitened_params(self, name):
        init_loc = self._whitened[name][1]
        num_inducing = init_loc.shape[-1]
        loc = numpyro.param(self._param_name(name, "loc"), init_loc, event_dim=1)
        eye = jnp.eye(num_inducing, dtype=init_loc.dtype)
        raw = numpyro.param(
            self._param_name(name, "scale_tril"),
            jnp.broadcast_to(self._init_whitened_scale * eye, init_loc.shape + (num_inducing,)),
            event_dim=2,
        )
        return loc, whitened_scale_tril(raw)

    def _constrain(self, values):
        """Map unconstrained latent values (with any leading sample dims) to the model's
        supports."""
        return {
            name: value
            if name in self._whitened
            else biject_to(self._latent_site(name)["fn"].support)(value)
            for name, value in values.items()
        }

    def _latent_site(self, name):
        return self._whitened[name][0] if name in self._whitened else self.prototype_trace[name]

    def _check_setup(self):
        if self.prototype_trace is None:
            raise RuntimeError(
                "AutoSVGP has not seen the model yet: run SVI, a prediction with the "
                "params (ns.predict_f, Predictive), or pass the model's arguments to "
                "sample_posterior (guide.sample_posterior(key, params, X)) before asking "
                "for posterior summaries."
            )

    def _whitened_q(self, params, name):
        loc = params[self._param_name(name, "loc")]
        tril = whitened_scale_tril(params[self._param_name(name, "scale_tril")])
        return loc, tril

    def sample_posterior(self, rng_key, params, *args, sample_shape=(), **kwargs):
        """Draw latent values from the fitted guide.

        :param rng_key: a JAX random key.
        :param dict params: the SVI params (``svi_result.params``).
        :param args: the model's arguments, needed only by a guide that has not seen
            the model yet (loaded params in a new process): it is set up on them with
            ``params``, as a prediction would set it up.
        :param tuple sample_shape: leading shape of the draws.
        :return: a dict from latent site name to constrained draws of shape
            ``sample_shape + site_shape``.
        """
        if self.prototype_trace is None and (args or kwargs):
            with block():
                seed(substitute(self, data=params), 0)(*args, **kwargs)
        self._check_setup()
        key, *keys = jax.random.split(rng_key, len(self._whitened) + 1)
        draws = (
            super().sample_posterior(key, params, sample_shape=sample_shape)
            if self._init_locs
            else {}
        )
        for key, name in zip(keys, self._whitened, strict=True):
            loc, tril = self._whitened_q(params, name)
            draws[name] = dist.MultivariateNormal(loc, scale_tril=tril).sample(key, sample_shape)
        return draws

    def median(self, params):
        """Posterior median of each latent site (the Gaussian's mean, mapped to the support)."""
        self._check_setup()
        medians = super().median(params) if self._init_locs else {}
        medians.update({name: params[self._param_name(name, "loc")] for name in self._whitened})
        return medians

    def quantiles(self, params, quantiles):
        """Marginal posterior quantiles of each latent site.

        :param dict params: the SVI params.
        :param list quantiles: values in (0, 1).
        :return: a dict from site name to an array of shape ``(len(quantiles),) + site_shape``.
        """
        self._check_setup()
        result = super().quantiles(params, quantiles) if self._init_locs else {}
        quantiles = jnp.asarray(quantiles)
        for name in self._whitened:
            loc, tril = self._whitened_q(params, name)
            scale = jnp.sqrt(jnp.sum(jnp.square(tril), axis=-1))
            q = quantiles.reshape((-1,) + (1,) * jnp.ndim(loc))
            result[name] = dist.Normal(loc, scale).icdf(q)
        return result
