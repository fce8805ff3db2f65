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

The draw is made only when the output is asked for. ``svgp`` sends a nameless
``"svgp_output"`` message through NumPyro's effect stack (as ``numpyro.prng_key``
does); its default action is the draw above, and :class:`output_values` (which
:class:`~numpyro_svgp.SVGP_ELBO` installs) answers it instead with values of its
own: a placeholder, quadrature nodes, or a draw of its own making. Then no
``(N, M)`` array is formed unless the output is sampled (``Predictive``,
``TraceMeanField_ELBO``).
"""

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jaxtyping import Array, Float
from numpyro.handlers import block, seed, substitute, trace
from numpyro.primitives import Messenger, apply_stack

from numpyro_svgp._conditional import (
    Conditional,
    compiled,
    conditional_variance,
    projection,
    whitened_conditional,
)
from numpyro_svgp._features import InducingFeatures  # noqa: F401 (annotation)
from numpyro_svgp._linalg import MAX_JITTER_ESCALATIONS, safe_sqrt
from numpyro_svgp.kernels import Kernel

__all__ = ["WhitenedPrior", "draw_output", "output_values", "svgp", "svgp_site"]


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

    def __init__(self, conditional: Conditional, output: str):
        num_inducing, dtype = conditional.num_inducing, conditional.dtype
        super().__init__(
            jnp.zeros(num_inducing, dtype), scale_tril=jnp.eye(num_inducing, dtype=dtype)
        )
        self.conditional = conditional
        self.output = output


def fitted_model_trace(model, guide, params, args, kwargs, rng_seed: int = 0):
    """Trace ``model(*args, **kwargs)`` at the fitted params, with every other latent
    site at the guide's median (``guide=None``: params only)."""
    values = dict(params)
    if guide is not None:
        values.update(guide.median(params))
    with block():
        return trace(seed(substitute(model, data=values), rng_seed)).get_trace(*args, **kwargs)


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

    :param name: name of the output site; the whitened site is ``f"{name}_whitened"``.
    :param kernel: a :class:`~numpyro_svgp.kernels.Kernel`.
    :param X: inputs, shape ``(N, D)``.
    :param Z: inducing inputs, shape ``(M, D)``, or inducing features such as
        :class:`~numpyro_svgp.SphericalHarmonicFeatures` (same model, guide and ELBO).
    :param jitter: added to the diagonal of :math:`K_{zz}`; defaults to
        :func:`~numpyro_svgp.default_jitter` of the dtype.
    :param max_jitter_escalations: if :math:`K_{zz}` + jitter cannot be factorised,
        the jitter is raised tenfold up to this many times inside ``jit``; the jitter
        used is reported by :func:`~numpyro_svgp.svgp_diagnostics`. 0 disables it.
    :return: :math:`f(X)`, shape ``(N,)``.

    **References**: Titsias (2009); Hensman, Fusi & Lawrence (2013);
    Hensman, Matthews & Ghahramani (2015).
    """
    if not isinstance(kernel, Kernel):
        raise TypeError(
            f"svgp('{name}', ...) needs a numpyro_svgp.kernels.Kernel, got {type(kernel).__name__}."
        )
    conditional = whitened_conditional(
        kernel, X, Z, jitter=jitter, max_jitter_escalations=max_jitter_escalations
    )
    num_inducing = conditional.num_inducing
    v = numpyro.sample(f"{name}_whitened", WhitenedPrior(conditional, name))
    if jnp.shape(v) != (num_inducing,):
        raise ValueError(
            f"svgp('{name}', ...) drew inducing values of shape {jnp.shape(v)}, expected "
            f"({num_inducing},): it was called inside a plate. The inducing values are "
            "shared by all data points, so call svgp outside `numpyro.plate` and put "
            "only the likelihood inside it."
        )
    msg = apply_stack({
        "type": "svgp_output",
        "output": name,
        "fn": draw_output,
        "args": (conditional, v),
        "kwargs": {},
        "value": None,
        "cond_indep_stack": [],
    })
    return numpyro.deterministic(name, msg["value"])


def draw_output(conditional: Conditional, v: Float[Array, " M"]) -> Float[Array, " N"]:
    r""":math:`A v + \sqrt{\operatorname{diag}(K_{xx} - A A^\top)}\,\varepsilon`, with
    :math:`\varepsilon` from ``numpyro.prng_key()`` (left out when there is no key)."""
    key = numpyro.prng_key()
    if key is not None and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        # one compiled draw for numpyro's typed and raw keys alike
        key = jax.random.key_data(key)
    return _draw(conditional, v, key)


@compiled
def _draw(conditional, v, key):
    A = projection(conditional)
    f = A @ v.astype(A.dtype)  # numpyro's MVN draws may come in the default float dtype
    if key is not None:
        variance = conditional_variance(conditional, A)
        # safe_sqrt keeps d sqrt(var) finite where var == 0 (e.g. X = Z)
        f = f + safe_sqrt(variance) * jax.random.normal(key, variance.shape, variance.dtype)
    return f


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
        if msg["type"] != "svgp_output":
            return
        name = msg["output"]
        conditional, v = msg["args"]
        self.outputs[name] = (conditional, v)
        if name in self.values:
            msg["value"] = self.values[name]
        elif self.placeholder:
            msg["value"] = jnp.zeros(conditional.num_points, conditional.dtype)
