"""Input validation shared by the kernels, the conditional and the ELBO.

Shape problems are raised as :class:`ValueError` while tracing. Value problems
(NaN, inf, non-positive hyperparameters) are raised at once when the value is
concrete, and otherwise attached to the traced value with
:func:`equinox.error_if`, which raises when the compiled program runs.

Under :class:`nan_on_failed_checks` (which :func:`~numpyro_svgp.sgpmc` installs) a
traced check that fails makes the value NaN instead: an MCMC proposal outside the
model's range (a lengthscale that overflows, a factor that cannot be found) then has a
NaN log density, which NUTS and HMC record as a divergence, rather than stopping the run.
"""

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.primitives import _PYRO_STACK, Messenger, apply_stack

from numpyro_svgp._linalg import fail_if as nan_or_error

__all__ = []

_RAISE, _NAN = "raise", "nan"


class nan_on_failed_checks(Messenger):
    """Within ``fn``, traced value checks that fail give NaN rather than an error
    (see the module docstring). Put it innermost around the model, inside any
    ``block``, so that its answer reaches every check."""

    def process_message(self, msg):
        if msg["type"] == "svgp_failed_check":
            msg["value"] = _NAN


def failed_check_action() -> str:
    """``"nan"`` under :class:`nan_on_failed_checks`, else ``"raise"``. It is read while
    tracing, so a compiled function that checks values takes it as a static argument."""
    if not _PYRO_STACK:
        return _RAISE
    msg = apply_stack(
        {
            "type": "svgp_failed_check",
            "fn": lambda: _RAISE,
            "args": (),
            "kwargs": {},
            "value": None,
            "cond_indep_stack": [],
        }
    )
    return msg["value"]


def fail_if(x: jax.Array, failed: jax.Array, message: str) -> jax.Array:
    """``x`` with a traced check: an error when the compiled program runs if ``failed``
    holds, or, under :class:`nan_on_failed_checks`, NaN in place of a floating ``x``
    (an integer cannot hold NaN: it keeps the error)."""
    nan = jnp.issubdtype(x.dtype, jnp.floating) and failed_check_action() == _NAN
    return nan_or_error(x, failed, None if nan else message)


def is_traced(x) -> bool:
    """Whether ``x`` is an abstract value inside ``jit``/``grad``/``vmap``."""
    return isinstance(x, jax.core.Tracer)


def as_float_array(name: str, x) -> jax.Array:
    """``x`` as a floating JAX array; integer and boolean inputs are promoted
    to the default float dtype (float64 under ``jax_enable_x64``)."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        if not (jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_):
            raise TypeError(f"{name} must be a real array, got dtype {x.dtype}.")
        x = x.astype(jnp.result_type(float))
    elif x.dtype not in (jnp.float32, jnp.float64):
        raise TypeError(
            f"{name} has dtype {x.dtype}; numpyro_svgp computes in float32 or float64 "
            f"(cast with {name}.astype('float32'))."
        )
    return x


def raise_when_run(x: jax.Array, failed: jax.Array, message: str) -> jax.Array:
    """``x``, with an error raised when the compiled program runs if ``failed`` holds.

    The check rides on a scalar added to ``x`` rather than on ``x`` itself: what passes
    through ``error_if`` is replicated on every device, and data arrays may be sharded
    along N (see :mod:`numpyro_svgp._sharding`).
    """
    return x + fail_if(jnp.zeros((), x.dtype), failed, message)


def check_finite(name: str, x: jax.Array) -> jax.Array:
    """Return ``x``, raising if it holds NaN or inf."""
    if is_traced(x):
        return raise_when_run(x, ~jnp.all(jnp.isfinite(x)), f"{name} contains NaN or inf.")
    bad = ~np.isfinite(np.asarray(x))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name} contains NaN or inf ({int(bad.sum())} of {bad.size} entries, "
            f"first at index {where})."
        )
    return x


def check_positive(name: str, x) -> jax.Array:
    """Return ``x`` as a float array, raising unless every entry is finite and > 0."""
    x = as_float_array(name, x)
    if is_traced(x):
        return fail_if(
            x, ~jnp.all(jnp.isfinite(x) & (x > 0)), f"{name} must be positive and finite."
        )
    values = np.asarray(x)
    if not np.all(np.isfinite(values) & (values > 0)):
        raise ValueError(f"{name} must be positive and finite, got {values}.")
    return x


def check_matrix(name: str, x: jax.Array) -> None:
    """Raise unless ``x`` is a 2-D ``(rows, features)`` array."""
    if x.ndim != 2:
        hint = f" (reshape a 1-D array with {name}[:, None])" if x.ndim == 1 else ""
        raise ValueError(
            f"{name} must be a 2-D array of shape (num_points, num_features), "
            f"got shape {x.shape}{hint}."
        )
    if x.shape[1] == 0:
        raise ValueError(f"{name} has no features (shape {x.shape}).")


def check_observed_site(name: str, site: dict) -> None:
    """Check an observed trace site: one value per entry of its distribution
    (at trace time) and no NaN/inf (at once if concrete, else when run).

    numpyro would otherwise broadcast a length-1 ``y`` silently, fail with a bare
    broadcasting error for a wrong length, and turn NaN into a NaN loss. The
    checked value replaces ``site["value"]`` so a traced check stays in the graph.
    """
    value_shape = jnp.shape(site["value"])
    expected = site["fn"].shape()
    try:
        # y of shape (N, 1) against f of shape (N,) has the right size but
        # would broadcast to (N, N)
        fits = np.broadcast_shapes(value_shape, expected) == expected
    except ValueError:
        fits = False
    if not fits or int(np.prod(value_shape)) != int(np.prod(expected)):
        raise ValueError(
            f"observed site '{name}' has shape {value_shape} but its distribution has "
            f"shape {expected}: pass one observation per point at which the model's "
            "function is evaluated (e.g. y with len(y) == len(X))."
        )
    if jnp.issubdtype(jnp.result_type(site["value"]), jnp.inexact):
        site["value"] = check_finite(f"observed site '{name}'", site["value"])
