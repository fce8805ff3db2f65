"""The SVGP as a submodel: priors on hyperparameters, a Bernoulli likelihood, random intercepts."""

import os

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from jax import random
from numpyro.infer import SVI, Predictive

import numpyro_svgp as ns

from .helpers import toy_data

DATA = os.path.join(os.path.dirname(__file__), "data")


def _fit(model, steps, lr, *args):
    guide = ns.AutoSVGP(model)
    svi = SVI(model, guide, optax.adam(lr), ns.SVGP_ELBO())
    result = svi.run(random.PRNGKey(0), steps, *args, progress_bar=False)
    assert np.all(np.isfinite(result.losses))
    return guide, result


@pytest.mark.slow
def test_hyperparameters_as_latent_sites_with_priors():
    X, y = toy_data(200, seed=3)
    Z_init = jnp.linspace(-3, 3, 15)[:, None]

    def model(X, y=None):
        variance = numpyro.sample("variance", dist.LogNormal(0.0, 1.0))
        lengthscale = numpyro.sample("lengthscale", dist.LogNormal(0.0, 1.0))
        noise = numpyro.sample("noise", dist.HalfNormal(1.0))
        f = ns.svgp("f", ns.kernels.RBF(variance, lengthscale), X, numpyro.param("Z", Z_init))
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f, noise), obs=y)

    guide, result = _fit(model, 1500, 2e-2, X, y)
    params = result.params
    for site in ("variance", "lengthscale", "noise"):
        assert f"{site}_auto_loc" in params and f"{site}_auto_scale" in params
    median = guide.median(params)
    # the data were made with noise std 0.15 and wiggles on a ~0.5 scale
    assert 0.12 < median["noise"] < 0.2
    assert 0.25 < median["lengthscale"] < 1.0
    mean, _ = ns.predict_f(model, guide, params, X)
    truth = np.sin(2 * X[:, 0]) + 0.3 * np.cos(5 * X[:, 0])
    assert np.sqrt(np.mean((mean - truth) ** 2)) < 0.1
    samples = Predictive(model, guide=guide, params=params, num_samples=50)(
        random.PRNGKey(1), X[:7]
    )
    assert samples["y"].shape == (50, 7) and samples["f"].shape == (50, 7)


@pytest.mark.slow
def test_banana_bernoulli_classification():
    X = np.loadtxt(os.path.join(DATA, "banana_X_train"), delimiter=",")
    y = np.loadtxt(os.path.join(DATA, "banana_Y_train"))
    assert X.shape == (400, 2) and set(np.unique(y)) == {0.0, 1.0}
    Z_init = jnp.asarray(X[::20])  # 20 training points

    def model(X, y=None):
        kernel = ns.kernels.RBF(
            variance=numpyro.param("variance", 1.0, constraint=dist.constraints.positive),
            lengthscale=numpyro.param(
                "lengthscale", jnp.ones(2), constraint=dist.constraints.positive
            ),
        )
        f = ns.svgp("f", kernel, X, numpyro.param("Z", Z_init))
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Bernoulli(logits=f), obs=y)

    guide, result = _fit(model, 1500, 3e-2, X, y)
    mean, _ = ns.predict_f(model, guide, result.params, X)
    accuracy = np.mean((np.asarray(mean) > 0) == (y == 1))
    assert accuracy >= 0.9, accuracy
    probs = Predictive(model, guide=guide, params=result.params, num_samples=200)(
        random.PRNGKey(2), X
    )["y"].mean(0)
    assert np.mean((np.asarray(probs) > 0.5) == (y == 1)) >= 0.9


@pytest.mark.slow
def test_svgp_with_group_random_intercepts():
    rng = np.random.default_rng(4)
    num_groups, n = 6, 300
    X = rng.uniform(-3, 3, size=(n, 1))
    group = rng.integers(0, num_groups, size=n)
    intercepts = np.array([-1.5, -0.8, 0.0, 0.5, 1.0, 2.0])
    y = np.sin(2 * X[:, 0]) + intercepts[group] + 0.1 * rng.normal(size=n)
    Z_init = jnp.linspace(-3, 3, 15)[:, None]

    def model(X, group, y=None):
        tau = numpyro.sample("tau", dist.HalfNormal(2.0))
        with numpyro.plate("groups", num_groups):
            a = numpyro.sample("a", dist.Normal(0.0, tau))
        kernel = ns.kernels.RBF(
            variance=numpyro.param("variance", 1.0, constraint=dist.constraints.positive),
            lengthscale=numpyro.param("lengthscale", 0.7, constraint=dist.constraints.positive),
        )
        f = ns.svgp("f", kernel, X, numpyro.param("Z", Z_init))
        noise = numpyro.param("noise", 0.3, constraint=dist.constraints.positive)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f + a[group], noise), obs=y)

    guide, result = _fit(model, 2000, 2e-2, X, group, y)
    a_hat = np.asarray(guide.median(result.params)["a"])
    # the overall level is shared with f, so compare centred intercepts
    np.testing.assert_allclose(a_hat - a_hat.mean(), intercepts - intercepts.mean(), atol=0.15)
    assert 0.07 < float(result.params["noise"]) < 0.15
