"""ns.predict_y and ns.predict_log_density against closed forms, scipy.integrate.quad
and dense NumPy marginals of q(f)."""

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from scipy import integrate, special, stats
from scipy.special import expit

import numpyro_svgp as ns

from . import reference as ref
from .helpers import initial_params

VAR, LS, JITTER = 1.3, 0.8, 1e-8
Z = np.linspace(-2.5, 2.5, 6)[:, None]
X_TEST = np.linspace(-3, 3, 9)[:, None]


def _model(likelihood, noise=None):
    def model(X, y=None, num_data=None):
        kernel = ns.kernels.RBF(numpyro.param("variance", VAR), numpyro.param("lengthscale", LS))
        f = ns.svgp("f", kernel, X, jnp.asarray(Z), jitter=JITTER)
        if likelihood == "gaussian":
            s = noise if noise is not None else numpyro.sample("noise", dist.LogNormal(-1.5, 0.3))
        size = X.shape[0]
        # the README's mini-batch form: it runs on new inputs without num_data
        with numpyro.plate("data", num_data or size, subsample_size=size):
            if likelihood == "gaussian":
                numpyro.sample("y", dist.Normal(f + 0.5, s), obs=y)
            elif likelihood == "bernoulli":
                numpyro.sample("y", dist.Bernoulli(logits=f), obs=y)
            else:
                numpyro.sample("y", dist.Poisson(jnp.exp(f)), obs=y)

    return model


def _with_q(model, X, y):
    """The model's guide with a known q(v) = N(m, S S^T), and the dense marginals of q(f)
    at X_TEST."""
    guide = ns.AutoSVGP(model)
    params = initial_params(model, guide, X, y, num_data=len(X))
    rng = np.random.default_rng(5)
    m = rng.normal(size=len(Z))
    S = np.tril(0.3 * rng.normal(size=(len(Z), len(Z)))) + 0.5 * np.eye(len(Z))
    params = dict(
        params, f_whitened_auto_loc=jnp.asarray(m), f_whitened_auto_scale_tril=jnp.asarray(S)
    )
    mean, var, _, _ = ref.whitened_svgp_marginals(X_TEST, Z, VAR, LS, m, S, JITTER)
    return guide, params, mean, var


def _train_data(likelihood):
    rng = np.random.default_rng(0)
    X = np.sort(rng.uniform(-3, 3, size=(30, 1)), axis=0)
    f = np.sin(2 * X[:, 0])
    y = {
        "gaussian": f + 0.2 * rng.normal(size=30),
        "bernoulli": (rng.uniform(size=30) < expit(2 * f)).astype(np.float64),
        "poisson": rng.poisson(np.exp(f)).astype(np.float64),
    }[likelihood]
    return X, y


def test_gaussian_is_exact():
    noise = 0.3
    model = _model("gaussian", noise)
    guide, params, mean, var = _with_q(model, *_train_data("gaussian"))
    levels = (0.05, 0.5, 0.9)
    pred = ns.predict_y(model, guide, params, X_TEST, quantiles=levels)
    np.testing.assert_allclose(pred.mean, mean + 0.5, rtol=1e-10)
    np.testing.assert_allclose(pred.variance, var + noise**2, rtol=1e-10)
    want = [stats.norm.ppf(q, mean + 0.5, np.sqrt(var + noise**2)) for q in levels]
    np.testing.assert_allclose(pred.quantiles, want, rtol=1e-9, atol=1e-12)
    y_test = np.linspace(-1, 2, len(X_TEST))
    log_p = ns.predict_log_density(model, guide, params, X_TEST, y_test)
    np.testing.assert_allclose(
        log_p, stats.norm.logpdf(y_test, mean + 0.5, np.sqrt(var + noise**2)), rtol=1e-10
    )


def test_bernoulli_against_quad():
    model = _model("bernoulli")
    guide, params, mean, var = _with_q(model, *_train_data("bernoulli"))
    pred = ns.predict_y(model, guide, params, X_TEST, quantiles=(0.3, 0.7))
    sd = np.sqrt(var)
    prob = np.array(
        [
            integrate.quad(
                lambda t, m=m, s=s: expit(t) * stats.norm.pdf(t, m, s),
                m - 12 * s,
                m + 12 * s,
                epsabs=1e-14,
            )[0]
            for m, s in zip(mean, sd, strict=True)
        ]
    )
    np.testing.assert_allclose(pred.mean, prob, rtol=1e-8)
    np.testing.assert_allclose(pred.variance, prob * (1 - prob), rtol=1e-8)
    # a Bernoulli quantile is 0 while the level is at most P(y = 0), else 1
    np.testing.assert_array_equal(
        pred.quantiles, [(q > 1 - prob).astype(float) for q in (0.3, 0.7)]
    )
    y_test = (np.arange(len(X_TEST)) % 2).astype(np.float64)
    log_p = ns.predict_log_density(model, guide, params, X_TEST, y_test)
    np.testing.assert_allclose(log_p, np.log(np.where(y_test == 1, prob, 1 - prob)), rtol=1e-8)


@pytest.mark.slow
def test_poisson_moments_are_the_lognormal_ones():
    model = _model("poisson")
    guide, params, mean, var = _with_q(model, *_train_data("poisson"))
    levels = (0.1, 0.5, 0.95)
    pred = ns.predict_y(model, guide, params, X_TEST, quantiles=levels, quadrature_points=40)
    rate = np.exp(mean + var / 2)  # E[exp f]
    np.testing.assert_allclose(pred.mean, rate, rtol=1e-9)
    np.testing.assert_allclose(pred.variance, rate + (np.exp(var) - 1) * rate**2, rtol=1e-8)

    # quantiles against the mixture's CDF, each probability by quad of
    # Poisson(k | e^t) N(t | m, s^2), written out (scipy.stats' per-call cost made this
    # test take 20 s)
    def integrand(t, k, m, s):
        log_pmf = k * t - np.exp(t) - special.gammaln(k + 1)
        return np.exp(log_pmf - 0.5 * ((t - m) / s) ** 2) / (s * np.sqrt(2 * np.pi))

    for n, (m, s) in enumerate(zip(mean, np.sqrt(var), strict=True)):
        pmf = [
            integrate.quad(integrand, m - 12 * s, m + 12 * s, args=(k, m, s))[0] for k in range(60)
        ]
        cdf = np.concatenate([[0.0], np.cumsum(pmf)])  # cdf[k + 1] = P(y <= k)
        for q, got in zip(levels, np.asarray(pred.quantiles[:, n]), strict=True):
            # the smallest k with P(y <= k) >= q, up to the quadrature's error in the CDF
            k = int(got)
            assert got == k and cdf[k + 1] >= q - 1e-4 and cdf[k] < q + 1e-4, (n, q, k, cdf)


def test_other_latents_are_integrated_with_the_guides_draws():
    """The noise is latent: p(y_n) = int N(y_n | mu_n + 0.5, sigma_n^2 + s^2) q(s) ds, with
    q(s) the guide's LogNormal, by quad; the library averages over draws of s."""
    model = _model("gaussian")
    X, y = _train_data("gaussian")
    guide, params, mean, var = _with_q(model, X, y)
    params = dict(params, noise_auto_loc=jnp.asarray(-1.2), noise_auto_scale=jnp.asarray(0.25))
    q_s = stats.lognorm(s=0.25, scale=np.exp(-1.2))
    y_test = np.linspace(-1, 2, len(X_TEST))
    want = np.log(
        [
            integrate.quad(
                lambda s, n=n: (
                    stats.norm.pdf(y_test[n], mean[n] + 0.5, np.sqrt(var[n] + s**2)) * q_s.pdf(s)
                ),
                0,
                5,
            )[0]
            for n in range(len(X_TEST))
        ]
    )
    K = 4000
    log_p = ns.predict_log_density(model, guide, params, X_TEST, y_test, num_samples=K)
    # the log of a mean of K densities p(y_n | s_k), s_k ~ q(s): its standard error is the
    # densities' coefficient of variation over sqrt(K), estimated from 10^5 draws of q(s)
    s = q_s.rvs(size=100_000, random_state=np.random.default_rng(0))
    dens = stats.norm.pdf(y_test[:, None], (mean + 0.5)[:, None], np.sqrt(var[:, None] + s**2))
    se = dens.std(axis=1) / dens.mean(axis=1) / np.sqrt(K)
    assert np.all(np.abs(log_p - want) < 5 * se), (log_p - want) / se
    pred = ns.predict_y(model, guide, params, X_TEST, num_samples=K)
    np.testing.assert_allclose(pred.mean, mean + 0.5, rtol=1e-10)
    # var + E[s^2] with E[s^2] a mean of K draws: standard error sqrt(Var(s^2) / K)
    se_var = np.sqrt((q_s.moment(4) - q_s.moment(2) ** 2) / K)
    assert np.all(np.abs(pred.variance - (var + q_s.moment(2))) < 5 * se_var)
    # each draw's variance is sigma_n^2 + s^2: the stated error is the spread of s^2 over
    # sqrt(K), within the spread's own error (a few per cent); the mean has none
    error = pred.standard_error
    assert error.num_draws == K
    np.testing.assert_array_less(np.abs(pred.variance - var - q_s.moment(2)), 4 * error.variance)
    sd = np.sqrt(q_s.moment(4) - q_s.moment(2) ** 2)
    np.testing.assert_allclose(error.variance, sd / np.sqrt(K), rtol=0.1)
    np.testing.assert_array_less(error.mean, 1e-12)


def test_bad_requests_are_refused():
    model = _model("gaussian", 0.3)
    guide, params, _, _ = _with_q(model, *_train_data("gaussian"))
    with pytest.raises(ValueError, match="quantiles must be levels in"):
        ns.predict_y(model, guide, params, X_TEST, quantiles=(0.5, 1.0))
    with pytest.raises(ValueError, match="no sample site 'z'"):
        ns.predict_y(model, guide, params, X_TEST, site="z")
    with pytest.raises(ValueError, match="needs the observations"):
        ns.predict_log_density(model, guide, params, X_TEST)
    with pytest.raises(ValueError, match="quadrature_points"):
        ns.predict_y(model, guide, params, X_TEST, quadrature_points=0)

    def joint(X, y=None):
        f = ns.svgp("f", ns.kernels.RBF(1.0, 1.0), X, jnp.asarray(Z))
        numpyro.sample("y", dist.MultivariateNormal(f, jnp.eye(X.shape[0])), obs=y)

    X, y = _train_data("gaussian")
    joint_guide = ns.AutoSVGP(joint)
    joint_params = initial_params(joint, joint_guide, X, y)
    with pytest.raises(ValueError, match="cannot be integrated over q\\(f\\) exactly"):
        ns.predict_log_density(joint, joint_guide, joint_params, X_TEST, np.zeros(len(X_TEST)))


def test_two_outputs_heteroscedastic_moments():
    """y = Normal(f, exp(g)): E[y] = mu_f, Var[y] = sigma_f^2 + E[exp(2 g)], a lognormal
    moment; the product rule over both outputs gives them."""
    rng = np.random.default_rng(2)
    X = np.sort(rng.uniform(-3, 3, size=(25, 1)), axis=0)
    y = np.sin(X[:, 0]) + 0.3 * rng.normal(size=25)

    def model(X, y=None):
        kernel = ns.kernels.RBF(VAR, LS)
        f = ns.svgp("f", kernel, X, jnp.asarray(Z), jitter=JITTER)
        g = ns.svgp("g", kernel, X, jnp.asarray(Z), jitter=JITTER)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f, jnp.exp(g - 1.0)), obs=y)

    guide = ns.AutoSVGP(model)
    params = initial_params(model, guide, X, y)
    moments = {}
    for name, seed_ in (("f", 1), ("g", 2)):
        r = np.random.default_rng(seed_)
        m = r.normal(size=len(Z))
        S = np.tril(0.2 * r.normal(size=(len(Z), len(Z)))) + 0.4 * np.eye(len(Z))
        params[f"{name}_whitened_auto_loc"] = jnp.asarray(m)
        params[f"{name}_whitened_auto_scale_tril"] = jnp.asarray(S)
        moments[name] = ref.whitened_svgp_marginals(X_TEST, Z, VAR, LS, m, S, JITTER)[:2]
    (mf, vf), (mg, vg) = moments["f"], moments["g"]
    pred = ns.predict_y(model, guide, params, X_TEST, quadrature_points=30)
    np.testing.assert_allclose(pred.mean, mf, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(pred.variance, vf + np.exp(2 * (mg - 1.0) + 2 * vg), rtol=1e-8)


def test_positive_support_quantiles_and_event_dims():
    """A Gamma likelihood (CDF NaN below 0): quantiles of the mixture by brentq on its CDF
    by quad. A to_event site scores point by point, as the plated one does."""
    from scipy.optimize import brentq

    def model(X, y=None, event=False, num_data=None):
        kernel = ns.kernels.RBF(numpyro.param("variance", VAR), numpyro.param("lengthscale", LS))
        f = ns.svgp("f", kernel, X, jnp.asarray(Z), jitter=JITTER)
        fn = dist.Gamma(2.0, jnp.exp(-f))
        if event:
            numpyro.sample("y", fn.to_event(1), obs=y)
        else:
            with numpyro.plate("data", X.shape[0]):
                numpyro.sample("y", fn, obs=y)

    X, _ = _train_data("gaussian")
    guide, params, mean, var = _with_q(model, X, np.ones(len(X)))
    levels = (0.05, 0.5, 0.95)
    pred = ns.predict_y(model, guide, params, X_TEST, quantiles=levels, quadrature_points=40)
    for n in (0, 4, 8):  # the ends and the middle (each quantile is a root of a quad)
        m, s = mean[n], np.sqrt(var[n])

        def cdf(y, m=m, s=s):
            return integrate.quad(
                lambda t: stats.gamma.cdf(y, 2.0, scale=np.exp(t)) * stats.norm.pdf(t, m, s),
                m - 12 * s,
                m + 12 * s,
            )[0]

        for q, got in zip(levels, np.asarray(pred.quantiles[:, n]), strict=True):
            want = brentq(lambda y, q=q: cdf(y) - q, 1e-12, 1e4, xtol=1e-12)
            np.testing.assert_allclose(got, want, rtol=1e-5)
    y_test = np.linspace(0.5, 3.0, len(X_TEST))
    plated = ns.predict_log_density(model, guide, params, X_TEST, y_test)
    event = ns.predict_log_density(model, guide, params, X_TEST, y_test, event=True)
    assert event.shape == plated.shape == (len(X_TEST),)
    np.testing.assert_allclose(event, plated, rtol=1e-12)


def test_a_guide_whose_q_of_v_is_not_gaussian_is_refused():
    from numpyro.infer.autoguide import AutoMultivariateNormal

    model = _model("gaussian", 0.3)
    X, y = _train_data("gaussian")
    guide = AutoMultivariateNormal(model)
    params = initial_params(model, guide, X, y)
    with pytest.raises(ValueError, match="cannot be integrated exactly: v of svgp output 'f'"):
        ns.predict_y(model, guide, params, X_TEST)


def _softmax_model(classes):
    def model(X, y=None):
        with numpyro.plate("class", classes, dim=-2):
            f = ns.svgp("f", ns.kernels.RBF(VAR, LS), X, jnp.asarray(Z), jitter=JITTER)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Categorical(logits=f.T), obs=y)

    return model


def test_class_probabilities_of_a_softmax_over_three_gps_with_their_standard_error():
    """A softmax over a family of 3 class GPs couples them at each point: predict_y
    estimates E[softmax(f_n)] from draws and states its standard error. Reference: the
    dense marginals of each class's q(f), independent across classes, and 4e5 NumPy
    draws per point."""
    classes, S = 3, 2000
    model = _softmax_model(classes)
    X, _ = _train_data("gaussian")
    labels = np.arange(len(X)) % classes
    guide = ns.AutoSVGP(model)
    params = initial_params(model, guide, X, labels)
    rng = np.random.default_rng(7)
    m = rng.normal(size=(classes, len(Z)))
    tril = np.tril(0.3 * rng.normal(size=(classes, len(Z), len(Z)))) + 0.5 * np.eye(len(Z))
    params = dict(
        params,
        f_whitened_auto_loc=jnp.asarray(m[:, None]),
        f_whitened_auto_scale_tril=jnp.asarray(tril[:, None]),
    )
    marginals = [
        ref.whitened_svgp_marginals(X_TEST, Z, VAR, LS, m[c], tril[c], JITTER)[:2]
        for c in range(classes)
    ]
    mean = np.stack([mu for mu, _ in marginals], axis=-1)  # (N, C)
    sd = np.sqrt(np.stack([v for _, v in marginals], axis=-1))
    R = 400_000
    logits = mean + sd * rng.standard_normal((R,) + mean.shape)
    softmax = special.softmax(logits, axis=-1)
    want, want_sd = softmax.mean(axis=0), softmax.std(axis=0)

    report = ns.integration_report(model, guide, params, X, labels)["y"]
    assert report["integration"] == "Monte Carlo"
    assert "couples several values of svgp output 'f' in one term" in report["reason"]
    assert "the outputs at one point, as a softmax" in report["reason"]

    pred = ns.predict_y(model, guide, params, X_TEST, num_samples=S)
    # the result still unpacks as (mean, variance, quantiles); the rest are attributes
    mean, variance, quantiles = pred
    assert mean is pred.mean and variance is pred.variance and quantiles is None
    error = pred.standard_error
    assert pred.probabilities.shape == error.probabilities.shape == (len(X_TEST), classes)
    assert error.num_draws == S
    np.testing.assert_allclose(np.sum(pred.probabilities, axis=-1), 1.0, rtol=1e-12)
    # within 4 standard errors of the estimate and of the reference's own
    bound = 4 * np.sqrt(np.square(error.probabilities) + np.square(want_sd) / R)
    np.testing.assert_array_less(np.abs(pred.probabilities - want), bound)
    # the stated error is the draws' spread over sqrt(S): the spread's own relative error
    # is about 1 / sqrt(2 S) = 1.6 %
    np.testing.assert_allclose(error.probabilities, want_sd / np.sqrt(S), rtol=0.1)
    with pytest.raises(ValueError, match=r"cannot be integrated over q\(f\) exactly"):
        ns.predict_log_density(model, guide, params, X_TEST, np.zeros(len(X_TEST), int))


def test_class_probabilities_of_two_outputs_by_quadrature_are_exact():
    """Categorical(logits=[f, g]) depends on one value of each output at each point:
    quadrature, nothing drawn. P(y = 1) = E[sigmoid(g - f)], g - f Gaussian, by quad."""

    def model(X, y=None):
        f = ns.svgp("f", ns.kernels.RBF(VAR, LS), X, jnp.asarray(Z), jitter=JITTER)
        g = ns.svgp("g", ns.kernels.RBF(VAR, LS), X, jnp.asarray(Z), jitter=JITTER)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Categorical(logits=jnp.stack([f, g], -1)), obs=y)

    X, _ = _train_data("gaussian")
    guide = ns.AutoSVGP(model)
    params = initial_params(model, guide, X, np.arange(len(X)) % 2)
    moments = {}
    for name, seed_ in (("f", 3), ("g", 4)):
        r = np.random.default_rng(seed_)
        m = r.normal(size=len(Z))
        S = np.tril(0.2 * r.normal(size=(len(Z), len(Z)))) + 0.4 * np.eye(len(Z))
        params[f"{name}_whitened_auto_loc"] = jnp.asarray(m)
        params[f"{name}_whitened_auto_scale_tril"] = jnp.asarray(S)
        moments[name] = ref.whitened_svgp_marginals(X_TEST, Z, VAR, LS, m, S, JITTER)[:2]
    (mf, vf), (mg, vg) = moments["f"], moments["g"]
    want = [
        integrate.quad(
            lambda t, mu=mu, s=s: expit(t) * stats.norm.pdf(t, mu, s),
            mu - 12 * s,
            mu + 12 * s,
            epsabs=1e-14,
            epsrel=1e-13,
        )[0]
        for mu, s in zip(mg - mf, np.sqrt(vf + vg), strict=True)
    ]
    pred = ns.predict_y(model, guide, params, X_TEST, quadrature_points=40)
    assert pred.standard_error is None
    np.testing.assert_allclose(pred.probabilities[:, 1], want, rtol=1e-8)
    np.testing.assert_allclose(pred.probabilities[:, 0], 1 - np.asarray(want), rtol=1e-8)


def test_a_joint_density_is_predicted_by_monte_carlo_with_its_standard_errors():
    """y ~ MultivariateNormal(f, I) couples all points: E[y_n] = mu_n and
    Var[y_n] = sigma_n^2 + 1 estimated from draws, within 4 of the stated standard
    errors, which are sigma_n / sqrt(S) and sqrt(2) sigma_n^2 / sqrt(S) (the spread of
    f_n and of (f_n - mu_n)^2 under q)."""

    def joint(X, y=None, num_data=None):
        f = ns.svgp("f", ns.kernels.RBF(VAR, LS), X, jnp.asarray(Z), jitter=JITTER)
        numpyro.sample("y", dist.MultivariateNormal(f, jnp.eye(X.shape[0])), obs=y)

    S = 4000
    guide, params, mean, var = _with_q(joint, *_train_data("gaussian"))
    pred = ns.predict_y(joint, guide, params, X_TEST, num_samples=S)
    error = pred.standard_error
    assert error.num_draws == S and pred.probabilities is None and error.probabilities is None
    np.testing.assert_array_less(np.abs(pred.mean - mean), 4 * error.mean)
    np.testing.assert_array_less(np.abs(pred.variance - (var + 1)), 4 * error.variance)
    np.testing.assert_allclose(error.mean, np.sqrt(var / S), rtol=0.1)
    np.testing.assert_allclose(error.variance, np.sqrt(2) * var / np.sqrt(S), rtol=0.1)
    # one draw has no spread to measure its error by: NaN, not None (which means exact)
    one = ns.predict_y(joint, guide, params, X_TEST, num_samples=1).standard_error
    assert one.num_draws == 1 and np.all(np.isnan(one.mean)) and np.all(np.isnan(one.variance))


FLOAT32_SOFTMAX = """
import jax, jax.numpy as jnp, numpy as np, numpyro, numpyro.distributions as dist, optax
from jax import random
from numpyro.infer import SVI
import numpyro_svgp as ns
assert not jax.config.jax_enable_x64
rng = np.random.default_rng(0)
y = rng.integers(0, 3, size=60)
X = (2.0 * y - 3.0 + 1.4 * rng.uniform(size=60)).astype(np.float32)[:, None]
def model(X, y=None):
    with numpyro.plate("class", 3, dim=-2):
        Z = jnp.linspace(-3, 3, 6, dtype=jnp.float32)[:, None]
        f = ns.svgp("f", ns.kernels.RBF(1.0, 1.0), X, Z)
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Categorical(logits=f.T), obs=y)
guide = ns.AutoSVGP(model)
params = SVI(model, guide, optax.adam(0.05), ns.SVGP_ELBO()).run(
    random.PRNGKey(0), 200, X, y, progress_bar=False).params
pred = ns.predict_y(model, guide, params, X, num_samples=500)
p, se = pred.probabilities, pred.standard_error.probabilities
assert p.dtype == se.dtype == jnp.float32 and p.shape == (60, 3), (p.dtype, se.dtype, p.shape)
assert np.allclose(np.sum(p, axis=-1), 1.0, atol=1e-5) and np.all(np.isfinite(se))
accuracy = float(np.mean(np.argmax(p, axis=-1) == y))
assert accuracy > 0.9, accuracy
print("float32 softmax ok", accuracy)
"""


@pytest.mark.slow
def test_float32_class_probabilities_smoke():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    run = subprocess.run(
        [sys.executable, "-c", FLOAT32_SOFTMAX],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "float32 softmax ok" in run.stdout
