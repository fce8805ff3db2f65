r"""Joint posterior function draws of svgp outputs by pathwise conditioning.

By default an svgp output is drawn as :math:`A v + \sqrt{\operatorname{diag}(K_{xx} - A
A^\top)}\,\varepsilon` (see :mod:`numpyro_svgp._svgp`): right marginals, but independent
noise at every input, so the draws are not functions. Under :class:`pathwise` each
output is instead drawn from the whole conditional

.. math:: f(X) \mid v \sim \mathcal N\big(A v,\ K_{xx} - A A^\top\big),
    \qquad A = K_{xz} L^{-\top}, \quad L L^\top = K_{zz} + \epsilon I,

so that with :math:`v \sim q(v)` (a guide) the draws have the joint SVGP posterior
:math:`\mathcal N(A m, K_{xx} - A A^\top + A S S^\top A^\top)`.

**Pathwise conditioning** (Wilson et al. 2020) writes the conditional as an update of
a prior draw. The inducing values are :math:`u = L v`, whose prior is
:math:`\mathcal N(0, K_{zz} + \epsilon I)`: the jitter is part of the model, as noise on
:math:`f(Z)`. With a prior function draw :math:`g \sim \mathcal{GP}(0, k)` and
:math:`\varepsilon_z \sim \mathcal N(0, I_M)`, the pair
:math:`(g(X),\ \hat g_z = g(Z) + \sqrt\epsilon\,\varepsilon_z)` has the prior joint law
of :math:`(f(X), u)`, and Matheron's rule gives

.. math::

    f(X) = g(X) + K_{xz} (K_{zz} + \epsilon I)^{-1} (u - \hat g_z)
         = g(X) + A\big(v - L^{-1} \hat g_z\big)
         = g(X) + K_{xz}\, L^{-\top}\big(v - L^{-1} \hat g_z\big).

Its mean given :math:`v` is :math:`A v`; its covariance is, with
:math:`L^{-1} K_{zx} = A^\top`,
:math:`K_{xx} - 2 A A^\top + A L^{-1} (K_{zz} + \epsilon I) L^{-\top} A^\top
= K_{xx} - A A^\top`. The last form costs O(N M) beyond the prior draw: no
``(N, M)`` projection is formed.

**Random Fourier features** (Rahimi & Recht 2007) give the prior draw as a function:
for a stationary kernel :math:`k(x, x') = \sigma^2 \kappa(x - x')` with spectral
density :math:`p(\omega)`,

.. math:: g(x) = \sqrt{\sigma^2 / R}\ \sum_{r=1}^{R}
    \big(w_r \cos(\omega_r^\top x) + w'_r \sin(\omega_r^\top x)\big),
    \qquad \omega_r \sim p, \quad w_r, w'_r \sim \mathcal N(0, 1),

``num_features`` :math:`= 2R` basis functions. For :class:`~numpyro_svgp.kernels.RBF`
:math:`\omega = z / \ell` with :math:`z \sim \mathcal N(0, I_D)`; for the Matérn kernel
of smoothness :math:`\nu` (:class:`~numpyro_svgp.kernels.Matern12`, ``32``, ``52``),
:math:`z` is a multivariate Student-t with :math:`2\nu` degrees of freedom,
:math:`z = n / \sqrt{\gamma / \nu}`, :math:`n \sim \mathcal N(0, I_D)`,
:math:`\gamma \sim \operatorname{Gamma}(\nu, 1)` (Rasmussen & Williams 2006, eq. 4.15;
:math:`\ell` per input dimension for ARD). The inputs are centred on the mean of
:math:`Z` first (the kernel is shift-invariant; the phases stay small).

Given the frequencies, :math:`g` is a Gaussian process with the random-feature kernel
:math:`\tilde k(x, x') = \frac{\sigma^2}{R} \sum_r \cos\big(\omega_r^\top (x - x')\big)`,
whose mean over the frequencies is :math:`k` and whose error is
:math:`O(\sigma^2 / \sqrt R)` per entry (exact on the diagonal). The frequencies are
drawn afresh for every draw, so across draws the covariance is exact and the
random features only add spread: the draws are Gaussian given the frequencies, not
marginally, with an excess fourth moment that falls as :math:`1/R`. The update term
involves no approximation; the features' error enters through :math:`g` alone.

Other kernels, and inducing features other than inducing points, have no such
expansion here: then :math:`f(X)` is drawn exactly, :math:`A v + C^{1/2}\varepsilon`
with :math:`C^{1/2}` the Cholesky factor of :math:`K_{xx} - A A^\top` (plus a jitter of
:func:`~numpyro_svgp.default_jitter` relative to the mean prior variance), which costs
O(N³) and is limited to :data:`MAX_EXACT_POINTS` inputs. Such a draw is joint at the
inputs of one model run only: it is not a function that can be evaluated elsewhere.

**References**

1. Wilson, Borovitskiy, Terenin, Mostowsky & Deisenroth (2020), *Efficiently sampling
   functions from Gaussian process posteriors*, ICML.
2. Rahimi & Recht (2007), *Random features for large-scale kernel machines*, NeurIPS.
"""

import functools
import operator
import os
import sys
import warnings
from types import FrameType
from typing import cast

import jax
import jax.numpy as jnp
import numpyro
from jax import lax
from jaxtyping import Array, Float
from numpyro.primitives import Messenger

from numpyro_svgp._checks import failed_check_action
from numpyro_svgp._conditional import Conditional, compiled, mix, projection
from numpyro_svgp._family import family_map
from numpyro_svgp._features import InducingPoints
from numpyro_svgp._linalg import MAX_JITTER_ESCALATIONS, cholesky_with_jitter, default_jitter
from numpyro_svgp._svgp import seeded_key
from numpyro_svgp.kernels import RBF, Kernel, Matern12, Matern32, Matern52, Stationary

__all__ = ["MAX_EXACT_POINTS", "pathwise"]

MAX_EXACT_POINTS = 4000
"""The most inputs at which :class:`pathwise` draws exactly (an ``(N, N)`` Cholesky
factor per GP) where the kernel has no random-feature expansion."""


class pathwise(Messenger):
    r"""Draw svgp outputs as joint posterior functions, by pathwise conditioning.

    Under this handler each :func:`~numpyro_svgp.svgp` output is drawn from the full
    conditional :math:`f(X) \mid v \sim \mathcal N(A v, K_{xx} - A A^\top)` instead of with
    independent noise per input, as

    .. math:: f(X) = g(X) + A\big(v - L^{-1}(g(Z) + \sqrt\epsilon\,\varepsilon_z)\big),

    :math:`g` a prior function draw from random Fourier features and
    :math:`\varepsilon_z \sim \mathcal N(0, I_M)` (see :mod:`numpyro_svgp._pathwise`).
    With :math:`v` from the guide, every ``Predictive`` sample is one function from the
    SVGP posterior, so sample paths are smooth and
    :math:`\operatorname{Cov}(f(x_1), f(x_2))` is the posterior's::

        f = Predictive(ns.pathwise(model, num_features=2048), guide=guide, params=params,
                       num_samples=200)(key, X_test)["f"]               # (200, N)

    The random numbers come from ``numpyro.prng_key()`` at the output, so the same key
    gives the same function: a run at ``X1`` and a run at ``X1`` and ``X2`` together
    agree at ``X1``.

    Random features are used for :class:`~numpyro_svgp.kernels.RBF`,
    :class:`~numpyro_svgp.kernels.Matern12`, :class:`~numpyro_svgp.kernels.Matern32` and
    :class:`~numpyro_svgp.kernels.Matern52` with inducing points. Any other kernel (or
    inducing features) is drawn exactly from the Cholesky factor of
    :math:`K_{xx} - A A^\top`, with a ``UserWarning``: O(N³), at most
    :data:`MAX_EXACT_POINTS` inputs per GP, and joint only at the inputs of that run.

    A family of GPs (svgp inside plates) draws one function per GP; mixed outputs
    (``mixing=W``) mix the latent functions, :math:`f = W g`. The ragged form
    (``group_index``) is refused.

    :param fn: the model (or use it as a context manager / decorator).
    :param int num_features: basis functions of the prior draw, :math:`2R` (``R``
        frequencies, each with a cosine and a sine); even and at least 2. The prior
        draw's covariance has error :math:`O(\sigma^2/\sqrt R)` per entry for one draw.
    :raises ValueError: for an odd or too small ``num_features``; for an exact draw at
        more than :data:`MAX_EXACT_POINTS` inputs.
    :raises NotImplementedError: for an svgp with ``group_index``.
    :raises RuntimeError: when run without a random key (no ``seed`` handler).

    **References**: Wilson, Borovitskiy, Terenin, Mostowsky & Deisenroth (2020),
    *Efficiently sampling functions from Gaussian process posteriors*, ICML;
    Rahimi & Recht (2007), *Random features for large-scale kernel machines*.
    """

    def __init__(self, fn=None, *, num_features: int = 1024):
        try:
            valid = not isinstance(num_features, bool) and operator.index(num_features) >= 2
        except TypeError:
            valid = False
        if not valid or num_features % 2:
            raise ValueError(
                f"pathwise: num_features must be an even integer >= 2 (cosine and sine "
                f"pairs, num_features / 2 frequencies), got {num_features!r}."
            )
        self.num_features = operator.index(num_features)
        super().__init__(fn)

    def process_message(self, msg):
        name = msg.get("svgp_output")
        if name is None or msg["type"] != "deterministic" or msg["value"] is not None:
            return
        conditional, v = msg["args"]
        if conditional.group_index is not None:
            raise NotImplementedError(
                f"ns.pathwise cannot draw the svgp output '{name}': it has group_index= "
                "(ragged groups), whose rows each come from their own GP, and joint draws "
                "of that form are not implemented. Give X one set of rows per group, shape "
                "(G, N, D) (padded), or draw without ns.pathwise (marginals only)."
            )
        # the draw replaces the default action, so that a value given by an outer handler
        # (substitute, the ELBO's) still wins and nothing is drawn then
        msg["fn"] = functools.partial(self._draw, name)

    def _draw(self, name, conditional, v):
        key = seeded_key()
        if key is None:
            raise RuntimeError(
                f"ns.pathwise draws the svgp output '{name}' from a random key, and none was "
                "given: run the model under numpyro.handlers.seed, or through Predictive."
            )
        if _has_random_features(conditional):
            return _draw_pathwise(conditional, v, key, self.num_features)
        kernel = type(conditional.kernel).__name__
        inducing = type(conditional.inducing).__name__
        reason = (
            f"kernel {kernel}"
            if not _is_spectral(conditional.kernel)
            else f"inducing variables {inducing}"
        )
        if conditional.num_points > MAX_EXACT_POINTS:
            raise ValueError(
                f"ns.pathwise: the svgp output '{name}' has a {reason} without random "
                "features, so it is drawn exactly from the N x N conditional covariance; "
                f"N = {conditional.num_points} inputs is more than MAX_EXACT_POINTS = "
                f"{MAX_EXACT_POINTS} (O(N^2) memory, O(N^3) time). Evaluate the model at "
                "fewer inputs (draws are joint within one run only), or use an RBF or "
                "Matern kernel with inducing points, whose random-feature draws have no limit."
            )
        warnings.warn(
            f"ns.pathwise: the svgp output '{name}' has a {reason}, which has no "
            "random-feature expansion here (RBF, Matern12/32/52 with inducing points do), "
            "so it is drawn exactly from the Cholesky factor of K_xx - A A^T: O(N^3), "
            f"at most {MAX_EXACT_POINTS} inputs, and a joint draw at this run's inputs "
            "only, not a function to evaluate elsewhere.",
            UserWarning,
            stacklevel=_user_stack_level(),
        )
        return _draw_exact(conditional, v, key, failed_check_action())


def _user_stack_level() -> int:
    """The ``stacklevel`` of the first caller outside numpyro_svgp, numpyro and jax (the
    model's ``svgp`` call), counted from the function that calls this one."""
    skip = tuple(os.path.dirname(str(m.__file__)) for m in (sys.modules[__package__], numpyro, jax))
    frame: FrameType | None = sys._getframe(2)
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


def _smoothness(kernel: Kernel) -> float | None:
    r""":math:`\nu` of a Matérn kernel; ``None`` for the RBF kernel (:math:`\nu = \infty`)."""
    smoothness: dict[type, float] = {Matern12: 0.5, Matern32: 1.5, Matern52: 2.5}
    return smoothness.get(type(kernel))


def _is_spectral(kernel: Kernel) -> bool:
    # the exact classes: a subclass may change the profile, and with it the spectrum
    return type(kernel) in (RBF, Matern12, Matern32, Matern52)


def _has_random_features(conditional: Conditional) -> bool:
    return _is_spectral(conditional.kernel) and isinstance(conditional.inducing, InducingPoints)


def _over_family(draw_one, conditional, v, key, *static):
    """``draw_one`` for one GP or mapped over a family (one key each), then mixed."""
    family = conditional.family
    if family.shape:
        key = jax.random.split(key, family.size)
    f = family_map(
        lambda c, v_, k: draw_one(c, v_, k, *static),
        family,
        conditional,
        v,
        key,
        event_ndims=(1, 1),
    )
    if conditional.mixing is not None:
        # the latent GPs are drawn first; outputs sharing one share its function
        f = mix(conditional.mixing.astype(f.dtype), f)
    return f


@compiled
def _draw_pathwise(conditional, v, key, num_features):
    return _over_family(_pathwise_one, conditional, v, key, num_features)


@compiled
def _draw_exact(conditional, v, key, on_failure):
    return _over_family(_exact_one, conditional, v, key, on_failure)


def _pathwise_one(
    conditional: Conditional, v: Float[Array, " M"], key, num_features: int
) -> Float[Array, " N"]:
    r"""One GP's draw, :math:`g(X) + K_{xz} L^{-\top}(v - L^{-1}(g(Z) +
    \sqrt\epsilon\,\varepsilon_z))`."""
    kernel, L, inducing = conditional.kernel, conditional.cholesky, conditional.inducing
    # _has_random_features chose this path for these types only
    kernel, inducing = cast(Stationary, kernel), cast(InducingPoints, inducing)
    dtype = L.dtype
    X = conditional.inputs.astype(dtype)
    Z = inducing.Z.astype(dtype)
    R, D = num_features // 2, X.shape[-1]
    frequency_key, gamma_key, weight_key, noise_key = jax.random.split(key, 4)
    z = jax.random.normal(frequency_key, (R, D), dtype)
    nu = _smoothness(kernel)
    if nu is not None:
        # multivariate Student-t with 2 nu degrees of freedom: one scale per frequency
        z = z * jnp.sqrt(nu / jax.random.gamma(gamma_key, nu, (R, 1), dtype))
    omega = z / jnp.asarray(kernel.lengthscale, dtype)
    weights = jax.random.normal(weight_key, (2, R), dtype)
    amplitude = jnp.sqrt(jnp.asarray(kernel.variance, dtype) / R)
    centre = jnp.mean(Z, axis=0)

    def prior(P):
        phase = (P - centre) @ omega.T
        return amplitude * (jnp.cos(phase) @ weights[0] + jnp.sin(phase) @ weights[1])

    noise = jax.random.normal(noise_key, Z.shape[:1], dtype)
    g_z = prior(Z) + jnp.sqrt(conditional.jitter.astype(dtype)) * noise
    whitened = lax.linalg.triangular_solve(L, g_z[:, None], left_side=True, lower=True)[:, 0]
    residual = v.astype(dtype) - whitened
    alpha = lax.linalg.triangular_solve(
        L, residual[:, None], left_side=True, lower=True, transpose_a=True
    )[:, 0]
    return prior(X) + conditional.inducing.cross_covariance(kernel, X) @ alpha


def _exact_one(
    conditional: Conditional, v: Float[Array, " M"], key, on_failure: str
) -> Float[Array, " N"]:
    r""":math:`A v + C^{1/2} \varepsilon` with :math:`C^{1/2} C^{1/2\top} = K_{xx} - A A^\top`
    (+ a relative jitter) of one GP."""
    A = projection(conditional)
    X = conditional.inputs
    C = conditional.kernel(X, X) - A @ A.T
    # the jitter relative to the prior's scale: C / s is factorised, s its mean variance
    scale = jnp.maximum(jnp.mean(conditional.kernel.diag(X)), jnp.finfo(C.dtype).tiny)
    root, _ = cholesky_with_jitter(
        0.5 * (C + C.T) / scale,
        default_jitter(C.dtype),
        name="K_xx - A A^T",
        max_escalations=MAX_JITTER_ESCALATIONS,
        on_failure=on_failure,
    )
    noise = jax.random.normal(key, (X.shape[0],), C.dtype)
    return A @ v.astype(C.dtype) + jnp.sqrt(scale) * (root @ noise)
