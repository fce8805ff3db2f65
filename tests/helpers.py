"""Shared model builders for the tests (the library's public API only)."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from jax import random
from numpyro.infer import SVI

import numpyro_svgp as ns


def toy_data(n=60, seed=0, noise=0.15):
    rng = np.random.default_rng(seed)
    X = np.sort(rng.uniform(-3, 3, size=(n, 1)), axis=0)
    y = np.sin(2 * X[:, 0]) + 0.3 * np.cos(5 * X[:, 0]) + noise * rng.normal(size=n)
    return X, y


def gaussian_model(Z_init, variance=1.0, lengthscale=0.6, noise_var=0.0225, jitter=None):
    """The golden-path model with hyperparameters as numpyro.params."""

    def model(X, y=None):
        kernel = ns.kernels.RBF(
            variance=numpyro.param("variance", variance, constraint=dist.constraints.positive),
            lengthscale=numpyro.param(
                "lengthscale", lengthscale, constraint=dist.constraints.positive
            ),
        )
        Z = numpyro.param("Z", jnp.asarray(Z_init))
        f = ns.svgp("f", kernel, X, Z, jitter=jitter)
        s2 = numpyro.param("noise_var", noise_var, constraint=dist.constraints.positive)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f, jnp.sqrt(s2)), obs=y)

    return model


def initial_params(model, guide, *args, elbo=None, **kwargs):
    """Constrained params of a freshly initialised SVI (runs the guide's prototype)."""
    svi = SVI(model, guide, optax.adam(1e-2), elbo or ns.SVGP_ELBO())
    state = svi.init(random.PRNGKey(0), *args, **kwargs)
    return svi.get_params(state)


def compiled_loss(model, guide, *args, elbo=None, **kwargs):
    """``elbo.loss`` (default :class:`~numpyro_svgp.SVGP_ELBO`) of ``model`` and ``guide``
    on ``args`` and ``kwargs``, compiled as one program of ``(params, rng_key)``.

    Run eagerly, each operation of the loss, and of its gradient, compiles on its own:
    several seconds per call. Compiled, the loss is the program that ``svi.update``
    runs; ``jax.grad`` of it differentiates that program. The guide's prototype must
    exist (``initial_params`` sets it up). Checks of bad input call ``loss`` directly."""
    elbo = elbo or ns.SVGP_ELBO()
    return jax.jit(
        lambda params, rng_key: elbo.loss(rng_key, params, model, guide, *args, **kwargs)
    )
