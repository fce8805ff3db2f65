"""Mini-batch SVGP_ELBO: unbiased for the full-batch ELBO, and exact when B = N.

Two ways to write it (both in the README):

- in the model: create ``numpyro.plate("data", N, subsample_size=B)`` once (its
  indices are drawn when it is created), call ``svgp`` on ``X[idx]`` outside it,
  then enter the same plate for the likelihood;
- on the host: pass a batch ``(X_b, y_b)`` and the data size ``N``; the plate
  ``numpyro.plate("data", N, subsample_size=len(X_b))`` scales the likelihood by N/B.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax import random

import numpyro_svgp as ns

from .helpers import initial_params, toy_data

N, B = 200, 20
X, Y = (jnp.asarray(a) for a in toy_data(N, seed=31))  # traced indices need JAX arrays
Z0 = np.linspace(-3, 3, 7)[:, None]


def _kernel_and_noise():
    kernel = ns.kernels.RBF(
        numpyro.param("variance", 0.8, constraint=dist.constraints.positive),
        numpyro.param("lengthscale", 0.7, constraint=dist.constraints.positive),
    )
    return kernel, numpyro.param("noise_var", 0.05, constraint=dist.constraints.positive)


def in_model(X, y=None, batch_size=None):
    kernel, noise_var = _kernel_and_noise()
    data = numpyro.plate("data", X.shape[0], subsample_size=batch_size)
    with data as idx:
        pass
    f = ns.svgp("f", kernel, X[idx], numpyro.param("Z", jnp.asarray(Z0)))
    with data:
        numpyro.sample("y", dist.Normal(f, jnp.sqrt(noise_var)), obs=None if y is None else y[idx])


def host_batches(X, y=None, num_data=None):
    kernel, noise_var = _kernel_and_noise()
    f = ns.svgp("f", kernel, X, numpyro.param("Z", jnp.asarray(Z0)))
    with numpyro.plate("data", num_data or X.shape[0], subsample_size=X.shape[0]):
        numpyro.sample("y", dist.Normal(f, jnp.sqrt(noise_var)), obs=y)


def _params(model, guide, *args, **kwargs):
    params = initial_params(model, guide, *args, **kwargs)
    rng = np.random.default_rng(5)
    M = len(Z0)
    S = np.tril(0.2 * rng.normal(size=(M, M)), -1) + np.diag(rng.uniform(0.2, 0.8, size=M))
    return dict(
        params,
        f_whitened_auto_loc=jnp.asarray(rng.normal(size=M)),
        f_whitened_auto_scale_tril=jnp.asarray(S),
    )


def _check_unbiased(batch_losses, full):
    draws = np.asarray(batch_losses)
    se = draws.std(ddof=1) / np.sqrt(len(draws))
    assert se > 0
    assert abs(draws.mean() - full) < 4 * se, (draws.mean(), full, se)


# (N, B, draws): the cheap form runs in the quick suite, the module's sizes are slow. At
# N = 40, B = 8 and 2000 draws, a scale 10 % off N/B moves the batches' mean by about 11
# standard errors, and no scale (B/B) by about 400.
SIZES = [(40, 8, 2000), pytest.param(N, B, 3000, marks=pytest.mark.slow)]


@pytest.mark.parametrize("n, b, draws", SIZES)
def test_in_model_subsampling_is_unbiased_and_exact_at_full_batch(n, b, draws):
    X_, Y_ = (jnp.asarray(a) for a in toy_data(n, seed=31))
    guide = ns.AutoSVGP(in_model)
    params = _params(in_model, guide, X_, Y_, batch_size=b)
    elbo = ns.SVGP_ELBO()
    full = float(elbo.loss(random.PRNGKey(0), params, in_model, guide, X_, Y_))
    assert (
        float(elbo.loss(random.PRNGKey(1), params, in_model, guide, X_, Y_, batch_size=n)) == full
    )
    losses = jax.jit(
        jax.vmap(lambda k: elbo.loss(k, params, in_model, guide, X_, Y_, batch_size=b))
    )(random.split(random.PRNGKey(2), draws))
    _check_unbiased(losses, full)


@pytest.mark.parametrize("n, b, draws", SIZES)
def test_host_side_batches_are_unbiased_and_exact_at_full_batch(n, b, draws):
    X_, Y_ = (jnp.asarray(a) for a in toy_data(n, seed=31))
    guide = ns.AutoSVGP(host_batches)
    params = _params(host_batches, guide, X_[:b], Y_[:b], num_data=n)
    elbo = ns.SVGP_ELBO()
    full = float(elbo.loss(random.PRNGKey(0), params, host_batches, guide, X_, Y_))
    assert (
        float(elbo.loss(random.PRNGKey(0), params, host_batches, guide, X_, Y_, num_data=n)) == full
    )
    loss = jax.jit(
        lambda Xb, yb: elbo.loss(random.PRNGKey(0), params, host_batches, guide, Xb, yb, num_data=n)
    )
    rng = np.random.default_rng(6)
    idx = jnp.asarray(np.stack([rng.choice(n, b, replace=False) for _ in range(draws)]))
    # one compiled program over all batches (vmap), not one call per batch
    _check_unbiased(jax.vmap(loss)(X_[idx], Y_[idx]), full)


@pytest.mark.parametrize(
    "model, kwargs", [(in_model, {"batch_size": B}), (host_batches, {"num_data": N})]
)
@pytest.mark.slow
def test_minibatch_training_reaches_the_full_batch_fit(model, kwargs):
    import optax
    from numpyro.infer import SVI

    guide = ns.AutoSVGP(model)
    # a decaying step size lets the mini-batch noise settle
    svi = SVI(
        model, guide, optax.adam(optax.cosine_decay_schedule(2e-2, 3000, 0.05)), ns.SVGP_ELBO()
    )
    if model is in_model:
        result = svi.run(random.PRNGKey(0), 3000, X, Y, progress_bar=False, **kwargs)
    else:
        state = svi.init(random.PRNGKey(0), X[:B], Y[:B], **kwargs)
        update = jax.jit(svi.update, static_argnames=("num_data",))
        rng = np.random.default_rng(7)
        for _ in range(3000):
            i = jnp.asarray(rng.choice(N, B, replace=False))
            state, _ = update(state, X[i], Y[i], **kwargs)
        result = type("R", (), {"params": svi.get_params(state)})
    full_loss = float(ns.SVGP_ELBO().loss(random.PRNGKey(0), result.params, model, guide, X, Y))
    bound = float(
        ns.titsias_bound(
            ns.kernels.RBF(result.params["variance"], result.params["lengthscale"]),
            X,
            Y,
            result.params["Z"],
            result.params["noise_var"],
        )
    )
    # trained on batches, its full-data ELBO is within 1 nat of the best for its hyperparameters
    assert -full_loss <= bound + 1e-6
    assert bound + full_loss < 1.0
