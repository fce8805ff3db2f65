"""Pointwise log likelihoods per posterior draw (dense NumPy, quad), and az.loo on them
against a 10-fold cross-validation computed here."""

import arviz as az
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from jax import random
from numpyro.infer import SVI
from scipy import integrate, stats
from scipy.special import log_expit

import numpyro_svgp as ns
from numpyro_svgp._arviz import arviz_major

from . import reference as ref

JITTER = 1e-8
Z = np.linspace(-2.5, 2.5, 6)[:, None]


def _dense_conditional(X, variance, lengthscale, v):
    L = np.linalg.cholesky(ref.rbf(Z, Z, variance, lengthscale) + JITTER * np.eye(len(Z)))
    A = np.linalg.solve(L, ref.rbf(Z, X, variance, lengthscale)).T
    return A @ v, variance - np.sum(A**2, axis=1)


def test_pointwise_log_likelihood_against_dense_and_quad():
    rng = np.random.default_rng(0)
    X = np.sort(rng.uniform(-3, 3, size=(12, 1)), axis=0)
    y = np.sin(2 * X[:, 0]) + 0.2 * rng.normal(size=12)
    labels = (y > 0).astype(np.float64)

    def model(X, y, labels):
        variance = numpyro.sample("variance", dist.LogNormal(0.0, 1.0))
        f = ns.svgp(
            "f",
            ns.kernels.RBF(variance, numpyro.param("lengthscale", 0.9)),
            X,
            jnp.asarray(Z),
            jitter=JITTER,
        )
        noise = numpyro.sample("noise", dist.LogNormal(-1.0, 1.0))
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f, noise), obs=y)
            numpyro.sample("label", dist.Bernoulli(logits=f), obs=labels)
        numpyro.sample("other", dist.Normal(noise, 1.0), obs=0.3)

    samples = {
        "variance": jnp.array([0.8, 1.5]),
        "noise": jnp.array([0.2, 0.4]),
        "f_whitened": jnp.asarray(rng.normal(size=(2, len(Z)))),
    }
    got = ns.pointwise_log_likelihood(
        model, samples, X, y, labels, params={"lengthscale": 0.9}, quadrature_points=40
    )
    assert set(got) == {"y", "label", "other"}
    for s in range(2):
        mean, cond_var = _dense_conditional(
            X, float(samples["variance"][s]), 0.9, np.asarray(samples["f_whitened"][s])
        )
        noise = float(samples["noise"][s])
        np.testing.assert_allclose(
            got["y"][s], stats.norm.logpdf(y, mean, np.sqrt(noise**2 + cond_var)), rtol=1e-10
        )
        want = [
            np.log(
                integrate.quad(
                    lambda t, m=m, sd=sd, c=2 * lab - 1: (
                        np.exp(log_expit(c * t)) * stats.norm.pdf(t, m, sd)
                    ),
                    m - 12 * sd,
                    m + 12 * sd,
                    epsabs=1e-14,
                )[0]
            )
            for m, sd, lab in zip(mean, np.sqrt(cond_var), labels, strict=True)
        ]
        np.testing.assert_allclose(got["label"][s], want, rtol=1e-10)
        np.testing.assert_allclose(got["other"][s], stats.norm.logpdf(0.3, noise, 1.0), rtol=1e-12)


@pytest.mark.slow
def test_loo_elpd_agrees_with_ten_fold_cross_validation():
    rng = np.random.default_rng(3)
    N = 100
    X = rng.uniform(-3, 3, size=(N, 1))
    y = np.sin(2 * X[:, 0]) + 0.2 * rng.normal(size=N)

    def model(X, y=None):
        kernel = ns.kernels.RBF(
            numpyro.param("variance", 1.0, constraint=dist.constraints.positive),
            numpyro.param("lengthscale", 0.7, constraint=dist.constraints.positive),
        )
        f = ns.svgp("f", kernel, X, numpyro.param("Z", jnp.linspace(-3, 3, 12)[:, None]))
        noise = numpyro.param("noise", 0.3, constraint=dist.constraints.positive)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f, noise), obs=y)

    guide = ns.AutoSVGP(model)
    svi = SVI(model, guide, optax.adam(3e-2), ns.SVGP_ELBO())

    def fit(X_fit, y_fit):
        return ns.train(svi, random.PRNGKey(0), 1500, X_fit, y_fit, progress_bar=False).params

    folds = np.array_split(rng.permutation(N), 10)
    cv_i = np.zeros(N)  # each point's log predictive density from the fit without its fold
    for held_out in folds:
        kept = np.setdiff1d(np.arange(N), held_out)
        params = fit(X[kept], y[kept])
        cv_i[held_out] = ns.predict_log_density(model, guide, params, X[held_out], y[held_out])
    elpd_cv = cv_i.sum()
    params = fit(X, y)
    draws = guide.sample_posterior(random.PRNGKey(1), params, sample_shape=(2000,))
    idata = ns.to_inference_data(
        draws, model=model, model_args=(X, y), log_likelihood=True, params=params
    )
    loo = az.loo(idata, pointwise=True)
    # arviz 1.x names the estimate elpd and its terms elpd_i, 0.x elpd_loo and loo_i
    elpd_loo = loo.elpd if arviz_major() >= 1 else loo.elpd_loo
    loo_i = np.asarray(loo.elpd_i if arviz_major() >= 1 else loo.loo_i)
    # paired, point by point: the sum of the differences within 5 of its standard errors
    # (sqrt(N) times their standard deviation), far tighter than the between-point SE of
    # elpd itself, which a biased pointwise log-likelihood would pass
    diff = loo_i - cv_i
    se = np.sqrt(N) * diff.std(ddof=1)
    assert abs(elpd_loo - elpd_cv) < 5 * se, (elpd_loo, elpd_cv, se, loo.se)


def test_pointwise_log_likelihood_refuses_missing_draws_and_params():
    rng = np.random.default_rng(1)
    X = rng.uniform(-3, 3, size=(10, 1))
    y = np.sin(X[:, 0])

    def model(X, y):
        variance = numpyro.sample("variance", dist.LogNormal(0.0, 1.0))
        f = ns.svgp(
            "f", ns.kernels.RBF(variance, numpyro.param("lengthscale", 0.9)), X, jnp.asarray(Z)
        )
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f, 0.2), obs=y)

    samples = {"variance": jnp.ones(3), "f_whitened": jnp.zeros((3, len(Z)))}
    with pytest.raises(ValueError, match=r"no draws of the latent sites \['variance'\]"):
        ns.pointwise_log_likelihood(
            model, {"f_whitened": samples["f_whitened"]}, X, y, params={"lengthscale": 0.9}
        )
    with pytest.raises(ValueError, match=r"params \['lengthscale'\] are not in params"):
        ns.pointwise_log_likelihood(model, samples, X, y)
    # observations among the samples (Predictive's "y") do not replace the data
    with_y = dict(samples, y=jnp.zeros((3, 10)))
    np.testing.assert_array_equal(
        ns.pointwise_log_likelihood(model, with_y, X, y, params={"lengthscale": 0.9})["y"],
        ns.pointwise_log_likelihood(model, samples, X, y, params={"lengthscale": 0.9})["y"],
    )
