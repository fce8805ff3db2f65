r"""The ``svgp`` primitive: a sparse variational GP as a NumPyro submodel.

It places one latent site, the whitened inducing values
:math:`v \sim \mathcal N(0, I_M)` named ``f"{name}_whitened"``, and one
deterministic site ``name`` holding

.. math:: f = A v + \sqrt{\operatorname{diag}(K_{xx} - A A^\top)}\ \varepsilon,
    \qquad \varepsilon \sim \mathcal N(0, I_N),

a draw of :math:`f(X)` whose marginals under :math:`q(v)` are exactly those of the
SVGP posterior (see :mod:`numpyro_svgp._conditional`). The whitened site's
prior, a :class:`WhitenedPrior`, carries the conditional, which is what lets
:class:`~numpyro_svgp.SVGP_ELBO` and :class:`~numpyro_svgp.AutoSVGP` find it.

The draw is made only when the output is asked for. The output is a ``deterministic``
message whose value is left empty (marked ``"svgp_output"``); its default action is the
draw above, taken only if no handler answers first: ``substitute`` with a value for
``name`` (``Predictive`` samples, ``log_likelihood``), or :class:`output_values` (which
:class:`~numpyro_svgp.SVGP_ELBO` installs) with values of its own: a placeholder,
quadrature nodes, or a draw of its own making. Then no ``(N, M)`` array is formed unless
the output is sampled (``Predictive``, ``TraceMeanField_ELBO``).

The draw needs a random key for :math:`\varepsilon` from a ``seed`` handler. Run
without one (the potential of NUTS or HMC, to which numpyro gives a fixed default key),
the output has no honest value: leaving :math:`\varepsilon` out, or fixing
it, biases the log density. That run raises an error naming :func:`~numpyro_svgp.sgpmc`,
which integrates :math:`\varepsilon` out.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jaxtyping import Array, Float
from numpyro.handlers import block, seed, substitute, trace
from numpyro.primitives import _PYRO_STACK, Messenger, apply_stack

from numpyro_svgp._conditional import (
    Conditional,
    compiled,
    conditional_variance,
    mix,
    projection,
    ragged_rows,
    whitened_conditional,
)
from numpyro_svgp._family import family_map, plate_batch_shape
from numpyro_svgp._features import InducingFeatures  # noqa: F401 (annotation)
from numpyro_svgp._linalg import MAX_JITTER_ESCALATIONS, after_both_ways, safe_sqrt
from numpyro_svgp.kernels import Kernel

__all__ = [
    "WhitenedPrior",
    "draw_output",
    "draw_with_key",
    "output_values",
    "seeded_key",
    "svgp",
    "svgp_site",
]


class WhitenedPrior(dist.MultivariateNormal):
    r"""The :math:`\mathcal N(0, I_M)` prior of whitened inducing values.

    A :class:`~numpyro.distributions.MultivariateNormal` with identity
    ``scale_tril`` (so numpyro's analytic MVN-MVN KL applies) that also carries the
    whitened conditional of the svgp output it induces. It lives on the site's
    ``fn``, which ``replay`` keeps (``replay`` replaces a site's ``infer``).

    :param conditional: the :class:`~numpyro_svgp.Conditional` at the model's inputs.
    :param output: name of the deterministic site holding :math:`f(X)`.
    """

    pytree_data_fields = ("conditional",)
    pytree_aux_fields = ("output",)

    def __init__(self, conditional: Conditional, output: str, batch_shape: tuple = ()):
        num_inducing, dtype = conditional.num_inducing, conditional.dtype
        super().__init__(
            jnp.zeros(tuple(batch_shape) + (num_inducing,), dtype),
            scale_tril=jnp.broadcast_to(
                jnp.eye(num_inducing, dtype=dtype),
                tuple(batch_shape) + (num_inducing, num_inducing),
            ),
        )
        self.conditional = conditional
        self.output = output


def fitted_model_trace(model, guide, params, args, kwargs, rng_seed: int = 0):
    """Trace ``model(*args, **kwargs)`` at the fitted params, with every other latent
    site at the guide's median (``guide=None``: params only), for the conditionals of
    its svgp sites: the svgp outputs hold zeros, not draws."""
    values = dict(params)
    if guide is not None:
        values.update(guide.median(params))
    with block():
        return trace(
            seed(substitute(output_values(model, placeholder=True), data=values), rng_seed)
        ).get_trace(*args, **kwargs)


def svgp_site(site: dict) -> WhitenedPrior | None:
    """The :class:`WhitenedPrior` of a trace entry if it is an svgp whitened site, else ``None``."""
    if site["type"] == "sample" and isinstance(site["fn"], WhitenedPrior):
        return site["fn"]
    return None


def svgp(
    name: str,
    kernel: Kernel,
    X: Float[Array, "N D"],
    Z: "Float[Array, 'M D'] | InducingFeatures",
    *,
    jitter: float | None = None,
    max_jitter_escalations: int = MAX_JITTER_ESCALATIONS,
    group_index=None,
    mixing=None,
) -> Float[Array, " N"]:
    r"""Sparse variational GP prior on :math:`f(X)` with inducing inputs :math:`Z`.

    Samples whitened inducing values ``f"{name}_whitened"`` from
    ``MultivariateNormal(0, scale_tril=I_M)`` and returns :math:`f(X)` (also
    recorded as the deterministic site ``name``), including the conditional
    variance :math:`\operatorname{diag}(K_{xx} - Q_{xx})`. Use it as any other
    latent function inside a NumPyro model; the likelihood can be anything::

        f = ns.svgp("f", kernel, X, Z)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f, noise), obs=y)

    Call it outside the data plate: the inducing values are shared by all data
    points. ``X`` may differ between fitting and prediction; ``Z`` and the kernel
    are typically ``numpyro.param``/``numpyro.sample`` values.

    **A GP per group.** Inside other plates, ``svgp`` places one independent GP per
    plate member (a family; see :mod:`numpyro_svgp._family`). Put the group plate at
    ``dim=-2`` so that the data plate keeps ``dim=-1``::

        with numpyro.plate("group", G, dim=-2):
            lengthscale = numpyro.sample("lengthscale", dist.LogNormal(mu, tau))  # (G, 1)
            f = ns.svgp("f", ns.kernels.RBF(1.0, lengthscale), X, Z)              # (G, N)
            with numpyro.plate("data", N, dim=-1):
                numpyro.sample("y", dist.Normal(f, noise), obs=Y)                 # (G, N)

    Kernel hyperparameters carry the plates' axes first (one value per GP) or none
    (shared); ``X`` is ``(N, D)`` or ``(G, N, D)``, ``Z`` is ``(M, D)`` or ``(G, M, D)``.
    The whitened site then has batch shape ``(G, 1)`` and event shape ``(M,)``, and
    :math:`f` has shape ``(G, N)``. Nested plates work the same way.

    **Ragged groups.** When groups have different rows, pass all rows at once, ``X`` of
    shape ``(N, D)``, with ``group_index`` (integers in ``[0, G)``, shape ``(N,)``): row
    :math:`n` takes its value from GP :math:`g(n)`, and :math:`f` has shape ``(N,)``.
    Each row is computed against its own GP only, O(N M²) in all::

        with numpyro.plate("group", G):
            lengthscale = numpyro.sample("lengthscale", dist.LogNormal(mu, tau))  # (G,)
            f = ns.svgp("f", ns.kernels.RBF(1.0, lengthscale), X, Z, group_index=g)
        with numpyro.plate("data", N):
            numpyro.sample("y", dist.Normal(f, noise), obs=y)

    **Several outputs from shared latent GPs** (a linear model of coregionalisation).
    With ``mixing`` :math:`W` of shape ``(P, L)``, a param or a latent, ``svgp`` inside a
    plate of ``L`` latent GPs returns :math:`f = W g`, shape ``(P, N)``. Under
    :math:`q` each :math:`f_{pn}` is Gaussian with mean :math:`\sum_l W_{pl} \mu_{ln}` and
    variance :math:`\sum_l W_{pl}^2 \sigma^2_{ln}`, so a Gaussian likelihood keeps its
    closed form and any other is integrated by quadrature::

        with numpyro.plate("latent", L, dim=-2):
            g_lengthscale = numpyro.param("lengthscale", jnp.ones((L, 1)), constraint=positive)
            f = ns.svgp("f", ns.kernels.RBF(1.0, g_lengthscale), X, Z, mixing=W)  # (P, N)
        with numpyro.plate("output", P, dim=-2), numpyro.plate("data", N, dim=-1):
            numpyro.sample("y", dist.Normal(f, noise), obs=Y)                    # (P, N)

    :param name: name of the output site; the whitened site is ``f"{name}_whitened"``.
    :param kernel: a :class:`~numpyro_svgp.kernels.Kernel`.
    :param X: inputs, shape ``(N, D)`` (or one set per GP of a family).
    :param Z: inducing inputs, shape ``(M, D)`` (or one set per GP), or inducing features such as
        :class:`~numpyro_svgp.SphericalHarmonicFeatures` (same model, guide and ELBO).
    :param jitter: added to the diagonal of :math:`K_{zz}`; defaults to
        :func:`~numpyro_svgp.default_jitter` of the dtype.
    :param max_jitter_escalations: if :math:`K_{zz}` + jitter cannot be factorised,
        the jitter is raised tenfold up to this many times inside ``jit``; the jitter
        used is reported by :func:`~numpyro_svgp.svgp_diagnostics`. 0 disables it.
    :param group_index: inside a group plate, the GP of each row of ``X`` (ragged groups).
    :param mixing: inside a plate of ``L`` latent GPs, :math:`W` of shape ``(P, L)``: the
        output is :math:`f = W g` (a linear model of coregionalisation).
    :return: :math:`f(X)`, shape ``(N,)`` (a family's shape first, inside plates).

    **References**: Titsias (2009); Hensman, Fusi & Lawrence (2013);
    Hensman, Matthews & Ghahramani (2015).
    """
    if not isinstance(kernel, Kernel):
        raise TypeError(
            f"svgp('{name}', ...) needs a numpyro_svgp.kernels.Kernel, got {type(kernel).__name__}."
        )
    batch_shape, plates = plate_batch_shape()
    if group_index is None:
        _refuse_data_plate(name, X, plates)
    kernel, Z = _after_earlier_outputs(kernel, Z)
    conditional = whitened_conditional(
        kernel,
        X,
        Z,
        jitter=jitter,
        max_jitter_escalations=max_jitter_escalations,
        batch_shape=batch_shape,
        group_index=group_index,
        mixing=mixing,
        where=f"svgp('{name}', ...)",
    )
    num_inducing = conditional.num_inducing
    v = numpyro.sample(f"{name}_whitened", WhitenedPrior(conditional, name, batch_shape))
    if jnp.shape(v) != batch_shape + (num_inducing,):
        raise ValueError(
            f"svgp('{name}', ...) drew inducing values of shape {jnp.shape(v)}, expected "
            f"{batch_shape + (num_inducing,)} (the plates' batch shape, then M)."
        )
    msg = apply_stack(
        {
            "type": "deterministic",
            "name": name,
            "svgp_output": name,
            "fn": draw_output,
            "args": (conditional, v),
            "kwargs": {},
            "value": None,
            "cond_indep_stack": [],
        }
    )
    return msg["value"]


def _after_earlier_outputs(kernel, Z):
    """``(kernel, Z)`` unchanged, ordered after the factor of the output before this one
    when an :class:`output_values` handler (the ELBO's) has seen one.

    Two outputs' factorisations and solves read nothing of each other, and on XLA:CPU two
    batched LAPACK calls at once can deadlock (see :func:`~numpyro_svgp._linalg.after`):
    each factor waits for the one before it, and in the gradient the reverse. Only
    traced arrays are ordered, so that the checks of constant inputs are not moved into
    the program; a model with one output is left as it is.
    """
    for handler in reversed(_PYRO_STACK):
        if isinstance(handler, output_values) and handler.outputs:
            previous = list(handler.outputs.values())[-1][0].cholesky
            ordered, fixed = eqx.partition((kernel, Z), _is_traced_array)
            return eqx.combine(after_both_ways(ordered, previous), fixed)
    return kernel, Z


def _is_traced_array(leaf) -> bool:
    return isinstance(leaf, jax.core.Tracer) and eqx.is_inexact_array(leaf)


def _refuse_data_plate(name, X, plates) -> None:
    """svgp inside the data plate is the common mistake a family would hide: a plate at
    dim -1 as large as the number of inputs would make one GP per data point."""
    num_points = jnp.shape(X)[-2] if jnp.ndim(X) >= 2 else None
    for p in plates:
        if p.dim == -1 and num_points is not None and p.size == num_points:
            raise ValueError(
                f"svgp('{name}', ...) was called inside a plate ('{p.name}', size "
                f"{p.size}, dim=-1) as large as X: the inducing values are shared by all "
                "data points, so call svgp outside the data plate and put only the "
                "likelihood inside it. For one GP per member of a group plate, put that "
                "plate at dim=-2 (numpyro.plate('group', G, dim=-2))."
            )


def draw_output(conditional: Conditional, v: Float[Array, " M"]) -> Float[Array, " N"]:
    r""":math:`A v + \sqrt{\operatorname{diag}(K_{xx} - A A^\top)}\,\varepsilon`, with
    :math:`\varepsilon` from ``numpyro.prng_key()``; without a key, an error (see the
    module docstring)."""
    key = seeded_key()
    if key is None:
        raise _keyless_error()
    return _draw(conditional, v, key)


def seeded_key() -> "jax.Array | None":
    """A raw random key from a ``seed`` handler on the stack, else ``None``.

    numpyro's potential (MCMC, ``log_density`` under ``initialize_model``) hands a model
    a fixed default key when nothing seeds it: a draw with that key would be frozen
    noise in the log density, so a draw needs a ``seed`` handler."""
    key = numpyro.prng_key()
    if key is None or not any(isinstance(h, seed) for h in _PYRO_STACK):
        return None
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        # one compiled draw for numpyro's typed and raw keys alike
        key = jax.random.key_data(key)
    return key


def _keyless_error() -> RuntimeError:
    return RuntimeError(
        "an svgp output was evaluated without a random seed, as the potential of MCMC "
        "(NUTS, HMC) and numpyro.infer.util.log_density evaluate a model. Its value "
        "A v + sqrt(diag(K_xx - Q_xx)) * eps needs a draw of eps, and leaving eps out "
        "or fixing it (numpyro's default key) would bias the log density. For MCMC, "
        "run the model through ns.sgpmc: MCMC(NUTS(ns.sgpmc(model)), ...), whose log "
        "density integrates eps out (Hensman et al. 2015). To evaluate the model at "
        "given outputs, substitute them (numpyro.handlers.substitute(model, {'f': f}), "
        "or posterior samples that hold 'f' from Predictive); to draw them, seed the "
        "model (numpyro.handlers.seed). For pointwise log likelihoods of posterior draws "
        "(az.loo), use ns.pointwise_log_likelihood."
    )


def draw_with_key(conditional: Conditional, v, key) -> jax.Array:
    """:func:`draw_output` with an explicit key (``None``: the mean :math:`A v`)."""
    return _draw(conditional, v, key)


@compiled
def _draw(conditional, v, key):
    if conditional.group_index is not None:
        f, variance, _ = ragged_rows(conditional, v, None)
    else:
        f, variance = family_map(
            _mean_and_variance, conditional.family, conditional, v, event_ndims=(1,)
        )
    if key is not None:
        # safe_sqrt keeps d sqrt(var) finite where var == 0 (e.g. X = Z)
        f = f + safe_sqrt(variance) * jax.random.normal(key, variance.shape, variance.dtype)
    if conditional.mixing is not None:
        # mixed after the draw: outputs sharing a latent GP share its noise
        f = mix(conditional.mixing.astype(f.dtype), f)
    return f


def _mean_and_variance(conditional, v):
    r""":math:`A v` and :math:`\operatorname{diag}(K_{xx} - A A^\top)` of one GP."""
    A = projection(conditional)
    # numpyro's MVN draws may come in the default float dtype
    return A @ v.astype(A.dtype), conditional_variance(conditional, A)


class output_values(Messenger):
    """Answers the svgp output messages of a model run, instead of drawing.

    :param fn: the model.
    :param dict values: output name to the value to return for it.
    :param bool placeholder: return zeros for every output not in ``values``
        (for a run whose outputs are only integrated, never evaluated).

    After the run, :attr:`outputs` maps each output name to its ``(conditional, v)``.
    """

    def __init__(self, fn=None, values=None, placeholder=False):
        self.values = dict(values or {})
        self.placeholder = placeholder
        self.outputs = {}
        super().__init__(fn)

    def process_message(self, msg):
        name = msg.get("svgp_output")
        if name is None or msg["type"] != "deterministic":
            return
        conditional, v = msg["args"]
        self.outputs[name] = (conditional, v)
        if name in self.values:
            msg["value"] = self.values[name]
        elif self.placeholder:
            msg["value"] = jnp.zeros(conditional.output_shape, conditional.dtype)
