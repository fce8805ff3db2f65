"""``train_epochs`` (shuffled host epochs, early stopping) and ``held_out_log_likelihood``."""

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from jax import random
from numpyro.infer import SVI, Trace_ELBO
from scipy.stats import norm

import numpyro_svgp as ns

from .helpers import toy_data

Z0 = np.linspace(-3, 3, 9)[:, None]


def host_model(X, y=None, num_data=None):
    kernel = ns.kernels.RBF(
        numpyro.param("variance", 0.8, constraint=dist.constraints.positive),
        numpyro.param("lengthscale", 0.7, constraint=dist.constraints.positive),
    )
    f = ns.svgp("f", kernel, X, numpyro.param("Z", jnp.asarray(Z0)))
    noise_var = numpyro.param("noise_var", 0.05, constraint=dist.constraints.positive)
    with numpyro.plate("data", num_data or X.shape[0], subsample_size=X.shape[0]):
        numpyro.sample("y", dist.Normal(f, jnp.sqrt(noise_var)), obs=y)


def _svi(lr=2e-2):
    return SVI(host_model, ns.AutoSVGP(host_model), optax.adam(lr), ns.SVGP_ELBO())


def test_every_row_is_visited_once_per_epoch_in_a_new_order():
    # loss = -sum(w[batch]) under SGD(1): after training, w_i counts the visits of row i
    num_data, batch = 10, 3

    def model(idx):
        w = numpyro.param("w", jnp.zeros(num_data))
        numpyro.factor("visit", jnp.sum(w[idx]))

    def guide(idx):
        pass

    svi = SVI(model, guide, optax.sgd(1.0), Trace_ELBO())
    rows = np.arange(num_data)
    one = ns.train_epochs(svi, random.PRNGKey(0), 1, rows, batch_size=batch, progress_bar=False)
    counts = np.asarray(one.params["w"])
    assert sorted(counts.tolist()) == [0.0] + [1.0] * 9  # drop_last leaves one row out
    assert len(one.losses) == 3
    five = ns.train_epochs(svi, random.PRNGKey(0), 5, rows, batch_size=batch, progress_bar=False)
    counts5 = np.asarray(five.params["w"])
    assert counts5.sum() == 45 and counts5.max() <= 5
    assert counts5.min() < 5 and np.sum(counts5 < 5) > 1  # a different row is left out each epoch
    full = ns.train_epochs(
        svi, random.PRNGKey(0), 2, rows, batch_size=batch, drop_last=False, progress_bar=False
    )
    np.testing.assert_array_equal(full.params["w"], np.full(num_data, 2.0))
    assert len(full.losses) == 8


@pytest.mark.slow
def test_epochs_on_host_batches_reach_the_collapsed_bound():
    X, y = toy_data(400, seed=41)
    svi = SVI(
        host_model,
        ns.AutoSVGP(host_model),
        optax.adam(optax.cosine_decay_schedule(2e-2, 1500)),
        ns.SVGP_ELBO(),
    )
    result = ns.train_epochs(
        svi, random.PRNGKey(1), 75, X, y, batch_size=20, num_data=len(X), progress_bar=False
    )
    assert result.losses.shape == (75 * 20,) and result.num_skipped == 0
    p = result.params
    kernel = ns.kernels.RBF(p["variance"], p["lengthscale"])
    bound = float(ns.titsias_bound(kernel, X, y, p["Z"], p["noise_var"]))
    full = -float(ns.SVGP_ELBO().loss(random.PRNGKey(0), p, host_model, svi.guide, X, y))
    assert bound - 1.0 < full <= bound + 1e-6


@pytest.mark.slow
def test_held_out_log_likelihood_matches_the_gaussian_predictive_density():
    X, y = toy_data(120, seed=42)
    X_test, y_test = toy_data(50, seed=43)
    svi = _svi()
    result = ns.train(svi, random.PRNGKey(0), 300, X, y, progress_bar=False)
    mean, var = ns.predict_f(host_model, svi.guide, result.params, X_test)
    sd = np.sqrt(np.asarray(var) + float(result.params["noise_var"]))
    exact = np.mean(norm.logpdf(y_test, np.asarray(mean), sd))
    estimate = float(
        ns.held_out_log_likelihood(
            host_model,
            svi.guide,
            result.params,
            X_test,
            y_test,
            rng_key=random.PRNGKey(3),
            num_samples=4000,
        )
    )
    # each point's log of a mean of S = 4000 densities N(y_n | f_n, noise), f_n ~ q(f_n):
    # its standard error is the densities' coefficient of variation r_n over sqrt(S),
    # estimated from 10^5 NumPy draws of q(f_n); the draws are shared by the points, so the
    # mean over points has standard error at most mean(r_n) / sqrt(S)
    f = np.asarray(mean)[:, None] + np.sqrt(np.asarray(var))[:, None] * np.random.default_rng(
        0
    ).normal(size=(1, 100_000))
    dens = norm.pdf(y_test[:, None], f, np.sqrt(float(result.params["noise_var"])))
    se = np.mean(dens.std(axis=1) / dens.mean(axis=1)) / np.sqrt(4000)
    assert abs(estimate - exact) < 5 * se, (estimate - exact, se)


@pytest.mark.slow
def test_early_stopping_returns_the_best_epoch():
    # held-out targets of opposite sign: the better the fit, the worse the held-out score
    X, y = toy_data(200, seed=44)
    svi = _svi(5e-2)
    kwargs = dict(batch_size=50, num_data=len(X), progress_bar=False)
    result = ns.train_epochs(
        svi,
        random.PRNGKey(2),
        30,
        X,
        y,
        held_out=(X, -y),
        patience=2,
        num_eval_samples=50,
        **kwargs,
    )
    assert result.stopped_early
    epochs, scores = result.held_out.T
    best = int(epochs[np.argmax(scores)])
    assert result.best_epoch == best and len(epochs) == best + 2
    # the returned params are those after `best` epochs of the same run
    again = ns.train_epochs(svi, random.PRNGKey(2), best, X, y, **kwargs)
    for name in again.params:
        np.testing.assert_array_equal(result.params[name], again.params[name])


def test_bad_arguments_are_named():
    X, y = toy_data(30, seed=45)
    svi = _svi()
    with pytest.raises(ValueError, match="leading length"):
        ns.train_epochs(svi, random.PRNGKey(0), 1, X, y[:-1], batch_size=5)
    with pytest.raises(ValueError, match="batch_size"):
        ns.train_epochs(svi, random.PRNGKey(0), 1, X, y, batch_size=31)
    with pytest.raises(ValueError, match="patience needs held_out"):
        ns.train_epochs(svi, random.PRNGKey(0), 1, X, y, batch_size=5, patience=2)
