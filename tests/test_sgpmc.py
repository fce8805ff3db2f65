"""ns.sgpmc: the SGPMC log density (Hensman et al. 2015) for MCMC, against dense NumPy,
scipy.integrate.quad and NUTS on the exact GP; plain MCMC on an svgp model is refused."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax import random
from numpyro.diagnostics import effective_sample_size
from numpyro.handlers import seed
from numpyro.infer import HMC, MCMC, NUTS, Predictive, init_to_value, log_likelihood
from numpyro.infer.util import log_density
from scipy import integrate, stats
from scipy.special import log_expit

import numpyro_svgp as ns
from tests import reference

JITTER = 1e-8


def _data(n=30, seed_=0):
    rng = np.random.default_rng(seed_)
    X = np.sort(rng.uniform(-3, 3, size=(n, 1)), axis=0)
    f = np.sin(2 * X[:, 0])
    return X, f, rng


def _model(Z, likelihood="gaussian"):
    def model(X, y=None):
        variance = numpyro.sample("variance", dist.LogNormal(0.0, 1.0))
        lengthscale = numpyro.sample("lengthscale", dist.LogNormal(0.0, 1.0))
        f = ns.svgp("f", ns.kernels.RBF(variance, lengthscale), X, Z, jitter=JITTER)
        if likelihood == "gaussian":
            noise = numpyro.sample("noise", dist.LogNormal(-1.0, 1.0))
            with numpyro.plate("data", X.shape[0]):
                numpyro.sample("y", dist.Normal(f, noise), obs=y)
        else:
            with numpyro.plate("data", X.shape[0]):
                numpyro.sample("y", dist.Bernoulli(logits=f), obs=y)

    return model


def _shifted_model(Z):
    """An RBF(1.1, 0.9) svgp plus a latent shift, y ~ Normal(f + shift, 0.2)."""

    def model(X, y):
        f = ns.svgp("f", ns.kernels.RBF(1.1, 0.9), X, jnp.asarray(Z), jitter=JITTER)
        shift = numpyro.sample("shift", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f + shift, 0.2), obs=y)

    return model


def _conditional(X, Z, variance, lengthscale):
    """Dense p(f | v) = N(A v, diag(K_xx - A A^T)), A = K_xz L^-T, L L^T = K_zz + jitter I."""
    L = np.linalg.cholesky(reference.rbf(Z, Z, variance, lengthscale) + JITTER * np.eye(len(Z)))
    A = np.linalg.solve(L, reference.rbf(Z, X, variance, lengthscale)).T
    return A, variance - np.sum(A**2, axis=1)


def _log_prior(values, v):
    lognormal = stats.lognorm(s=1.0, scale=1.0)
    log_p = lognormal.logpdf(values["variance"]) + lognormal.logpdf(values["lengthscale"])
    if "noise" in values:
        log_p += stats.lognorm(s=1.0, scale=np.exp(-1.0)).logpdf(values["noise"])
    return log_p + np.sum(stats.norm.logpdf(v))


def test_gaussian_log_density_is_the_sgpmc_formula_and_draws_nothing():
    X, f, rng = _data()
    y = f + 0.2 * rng.normal(size=len(X))
    Z = np.linspace(-2.5, 2.5, 7)[:, None]
    v = rng.normal(size=7)
    values = {"variance": 1.3, "lengthscale": 0.7, "noise": 0.25, "f_whitened": jnp.asarray(v)}
    A, cond_var = _conditional(X, Z, 1.3, 0.7)
    s2 = 0.25**2
    expected = _log_prior(values, v) + np.sum(
        stats.norm.logpdf(y, A @ v, 0.25) - cond_var / (2 * s2)
    )
    model = ns.sgpmc(_model(jnp.asarray(Z)))
    got = [float(log_density(seed(model, k), (X, y), {}, values)[0]) for k in (0, 1)]
    np.testing.assert_allclose(got[0], expected, rtol=1e-10)
    assert got[0] == got[1]  # no hidden draw: the same value under any seed
    # numpyro's potential hands a model no seed at all (a fixed default key)
    assert float(log_density(model, (X, y), {}, values)[0]) == got[0]


def test_bernoulli_log_density_against_quad():
    X, f, rng = _data(seed_=1)
    y = (rng.uniform(size=len(X)) < 1 / (1 + np.exp(-2 * f))).astype(np.float64)
    Z = np.linspace(-2.5, 2.5, 6)[:, None]
    v = rng.normal(size=6)
    values = {"variance": 2.0, "lengthscale": 0.8, "f_whitened": jnp.asarray(v)}
    A, cond_var = _conditional(X, Z, 2.0, 0.8)
    expected = _log_prior(values, v)
    for mean, sd, label in zip(A @ v, np.sqrt(cond_var), y, strict=True):
        sign = 2 * label - 1
        expected += integrate.quad(
            lambda t, m=mean, s=sd, c=sign: log_expit(c * t) * stats.norm.pdf(t, m, s),
            mean - 12 * sd,
            mean + 12 * sd,
            epsabs=1e-14,
            epsrel=1e-13,
        )[0]
    model = ns.sgpmc(_model(jnp.asarray(Z), "bernoulli"), quadrature_points=40)
    got = [float(log_density(seed(model, k), (X, y), {}, values)[0]) for k in (0, 3)]
    np.testing.assert_allclose(got[0], expected, rtol=1e-10)
    assert got[0] == got[1]


def _draws(values_list):
    return {k: jnp.asarray(np.stack([v[k] for v in values_list])) for k in values_list[0]}


def test_log_likelihood_of_the_sgpmc_model_is_pointwise_and_sums_to_its_density():
    """numpyro's log_likelihood (what az.from_numpyro reads) of an sgpmc model gives each
    observation's E[log p(y_n | f_n)] under the dense p(f_n | v, theta): in closed form
    for a Gaussian, by quad for a Bernoulli. The values are unscaled; the density is
    the prior plus their sum, times a scale handler's weight."""
    X, f, rng = _data()
    y = f + 0.2 * rng.normal(size=len(X))
    Z = np.linspace(-2.5, 2.5, 7)[:, None]
    draws = [
        {"variance": 1.3, "lengthscale": 0.7, "noise": 0.25, "f_whitened": rng.normal(size=7)},
        {"variance": 0.6, "lengthscale": 1.4, "noise": 0.4, "f_whitened": rng.normal(size=7)},
    ]
    weight = 3.0
    model = ns.sgpmc(numpyro.handlers.scale(_model(jnp.asarray(Z)), weight))
    got = np.asarray(log_likelihood(model, _draws(draws), X, y)["y_sgpmc"])
    assert got.shape == (2, len(X))
    for values, row in zip(draws, got, strict=True):
        A, cond_var = _conditional(X, Z, values["variance"], values["lengthscale"])
        s2 = values["noise"] ** 2
        want = stats.norm.logpdf(y, A @ values["f_whitened"], values["noise"]) - cond_var / (2 * s2)
        np.testing.assert_allclose(row, want, rtol=1e-10, atol=1e-12)
        total = float(log_density(model, (X, y), {}, values)[0])
        # the handler weights every site of the model, the prior's too
        np.testing.assert_allclose(
            total, weight * (_log_prior(values, values["f_whitened"]) + np.sum(want)), rtol=1e-10
        )

    labels = (rng.uniform(size=len(X)) < 1 / (1 + np.exp(-2 * f))).astype(np.float64)
    values = {"variance": 2.0, "lengthscale": 0.8, "f_whitened": rng.normal(size=7)}
    model = ns.sgpmc(_model(jnp.asarray(Z), "bernoulli"), quadrature_points=40)
    got = np.asarray(log_likelihood(model, _draws([values]), X, labels)["y_sgpmc"])[0]
    A, cond_var = _conditional(X, Z, 2.0, 0.8)
    want = [
        integrate.quad(
            lambda t, m=m, s=s, c=2 * label - 1: log_expit(c * t) * stats.norm.pdf(t, m, s),
            m - 12 * s,
            m + 12 * s,
            epsabs=1e-14,
            epsrel=1e-13,
        )[0]
        for m, s, label in zip(A @ values["f_whitened"], np.sqrt(cond_var), labels, strict=True)
    ]
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)


def test_at_z_equal_x_the_pointwise_values_are_pointwise_log_likelihood():
    """With Z = X, f given v has no variance (up to the jitter), so E[log p(y_n | f_n)] is
    log p(y_n | v, theta), which ns.pointwise_log_likelihood gives."""
    X, f, rng = _data(n=12, seed_=2)
    y = f + 0.2 * rng.normal(size=len(X))
    model = _model(jnp.asarray(X))
    samples = _draws(
        [
            {"variance": a, "lengthscale": b, "noise": c, "f_whitened": rng.normal(size=12)}
            for a, b, c in ((1.3, 0.7, 0.25), (0.8, 1.1, 0.3), (2.0, 0.5, 0.2))
        ]
    )
    got = np.asarray(log_likelihood(ns.sgpmc(model), samples, X, y)["y_sgpmc"])
    want = np.asarray(ns.pointwise_log_likelihood(model, samples, X, y)["y"])
    assert got.shape == want.shape == (3, 12)
    for n in range(3):
        a, b, s = (float(samples[k][n]) for k in ("variance", "lengthscale", "noise"))
        A, _ = _conditional(X, X, a, b)
        r2 = (y - A @ np.asarray(samples["f_whitened"][n])) ** 2 / s**2
        # the conditional variance at Z = X is at most the jitter j, and the two differ by
        # sigma^2 (y - mu)^2 / (2 s^4) + O(sigma^4): within j (1 + r^2) / s^2
        np.testing.assert_array_less(np.abs(got[n] - want[n]), JITTER * (1 + r2) / s**2)


@pytest.mark.filterwarnings("ignore:Estimated shape parameter of Pareto")
def test_az_loo_on_from_numpyro_of_an_sgpmc_run_scores_every_observation():
    az = pytest.importorskip("arviz")
    X, f, rng = _data(n=12, seed_=4)
    y = f + 0.2 * rng.normal(size=len(X))
    model = _model(jnp.linspace(-2, 2, 4)[:, None])
    mcmc = MCMC(NUTS(ns.sgpmc(model)), num_warmup=30, num_samples=40, progress_bar=False)
    mcmc.run(random.PRNGKey(0), X, y)
    idata = az.from_numpyro(mcmc, log_likelihood=True)
    pointwise = np.asarray(idata.log_likelihood["y_sgpmc"])
    assert pointwise.shape == (1, 40, 12)
    want = log_likelihood(ns.sgpmc(model), mcmc.get_samples(), X, y)["y_sgpmc"]
    np.testing.assert_allclose(pointwise[0], np.asarray(want), rtol=1e-12)
    assert az.loo(idata).n_data_points == 12


def test_plain_mcmc_on_an_svgp_model_is_refused_naming_sgpmc():
    X, f, rng = _data(n=10)
    y = f + 0.2 * rng.normal(size=len(X))
    model = _model(jnp.linspace(-2, 2, 4)[:, None])
    with pytest.raises(RuntimeError, match=r"ns\.sgpmc"):
        MCMC(NUTS(model), num_warmup=2, num_samples=2, progress_bar=False).run(
            random.PRNGKey(0), X, y
        )
    values = {"variance": 1.0, "lengthscale": 1.0, "noise": 0.2, "f_whitened": jnp.zeros(4)}
    with pytest.raises(RuntimeError, match=r"without a random seed.*ns\.sgpmc"):
        log_density(model, (X, y), {}, values)


def test_log_likelihood_with_drawn_outputs_still_works():
    """The guard stops only a draw without a seed: posterior samples that hold f
    (Predictive's) are substituted and nothing is drawn."""
    X, f, rng = _data(n=12)
    y = f + 0.2 * rng.normal(size=len(X))
    model = _model(jnp.linspace(-2, 2, 4)[:, None])
    prior = Predictive(model, num_samples=3)(random.PRNGKey(0), X)
    samples = {k: prior[k] for k in ("variance", "lengthscale", "noise", "f_whitened", "f")}
    got = log_likelihood(model, samples, X, y)["y"]
    expected = stats.norm.logpdf(y, np.asarray(samples["f"]), np.asarray(samples["noise"])[:, None])
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-12)


def test_an_impossible_proposal_is_a_divergence_not_a_crash():
    X, f, rng = _data(n=15)
    y = f + 0.2 * rng.normal(size=len(X))
    model = ns.sgpmc(_model(jnp.linspace(-2, 2, 5)[:, None]))
    # a lengthscale that overflows: the value check gives NaN under sgpmc, not an error
    values = {"variance": 1.0, "lengthscale": jnp.inf, "noise": 0.2, "f_whitened": jnp.zeros(5)}
    value = jax.jit(lambda p: log_density(model, (X, y), {}, p)[0])(values)
    assert np.isnan(float(value))
    # steps so long that log-lengthscale leaves float64's range: divergences, and it finishes
    kernel = NUTS(model, step_size=3e3, adapt_step_size=False, max_tree_depth=3)
    mcmc = MCMC(kernel, num_warmup=0, num_samples=20, progress_bar=False)
    mcmc.run(random.PRNGKey(1), X, y, extra_fields=("diverging",))
    assert np.asarray(mcmc.get_extra_fields()["diverging"]).all()


@pytest.mark.slow
def test_warm_start_from_the_guide_median():
    X, f, rng = _data(n=20)
    y = f + 0.2 * rng.normal(size=len(X))
    model = _model(jnp.linspace(-2, 2, 5)[:, None])
    guide = ns.AutoSVGP(model)
    result = ns.train(
        numpyro.infer.SVI(model, guide, __import__("optax").adam(2e-2), ns.SVGP_ELBO()),
        random.PRNGKey(0),
        50,
        X,
        y,
        progress_bar=False,
    )
    median = guide.median(result.params)
    assert set(median) == {"variance", "lengthscale", "noise", "f_whitened"}
    kernel = NUTS(ns.sgpmc(model), init_strategy=init_to_value(values=median))
    state = kernel.init(random.PRNGKey(1), 0, None, (X, y), {})
    start = kernel.postprocess_fn((X, y), {})(state.z)
    for name, value in median.items():
        np.testing.assert_allclose(np.asarray(start[name]), np.asarray(value), rtol=1e-10)


def test_sites_sgpmc_cannot_integrate_are_refused():
    X, f, rng = _data(n=10)
    Z = jnp.linspace(-2, 2, 4)[:, None]
    values = {"variance": 1.0, "lengthscale": 1.0, "noise": 0.2, "f_whitened": jnp.zeros(4)}
    with pytest.raises(ValueError, match="latent site 'y' depends on svgp output 'f'"):
        log_density(ns.sgpmc(_model(Z)), (X,), {}, {**values, "y": jnp.zeros(10)})

    def joint(X, y):
        f = ns.svgp("f", ns.kernels.RBF(1.0, 1.0), X, Z)
        numpyro.sample("y", dist.MultivariateNormal(f, jnp.eye(X.shape[0])), obs=y)

    with pytest.raises(ValueError, match="site 'y' cannot be integrated exactly"):
        log_density(ns.sgpmc(joint), (X, f), {}, {"f_whitened": jnp.zeros(4)})

    def no_gp(y):
        numpyro.sample("y", dist.Normal(numpyro.sample("m", dist.Normal()), 1.0), obs=y)

    with pytest.raises(ValueError, match="no ns.svgp site"):
        log_density(ns.sgpmc(no_gp), (f,), {}, {"m": 0.0})
    with pytest.raises(ValueError, match="quadrature_points"):
        ns.sgpmc(joint, quadrature_points=0)


@pytest.mark.slow
def test_hmc_runs_sgpmc_and_predictive_draws_from_its_samples():
    X, f, rng = _data(n=15)
    y = f + 0.2 * rng.normal(size=len(X))
    model = _model(jnp.linspace(-2, 2, 5)[:, None])
    mcmc = MCMC(
        HMC(ns.sgpmc(model), num_steps=5, trajectory_length=None),
        num_warmup=20,
        num_samples=10,
        progress_bar=False,
    )
    mcmc.run(random.PRNGKey(0), X, y)
    samples = mcmc.get_samples()
    assert set(samples) == {"variance", "lengthscale", "noise", "f_whitened"}
    draws = Predictive(model, samples)(random.PRNGKey(1), X)
    assert draws["f"].shape == (10, 15) and np.all(np.isfinite(draws["f"]))


@pytest.mark.slow
def test_nuts_at_z_equal_x_matches_nuts_on_the_exact_gp():
    """With Z = X the conditional variance is (up to the jitter) zero, so the SGPMC
    density is the exact GP's in whitened coordinates: the hyperparameter posteriors
    of NUTS on both agree within Monte-Carlo error."""
    X, f, rng = _data(n=16, seed_=3)
    y = f + 0.2 * rng.normal(size=len(X))
    names = ("variance", "lengthscale", "noise")

    def priors():
        return (
            numpyro.sample("variance", dist.LogNormal(0.0, 0.5)),
            numpyro.sample("lengthscale", dist.LogNormal(0.0, 0.5)),
            numpyro.sample("noise", dist.LogNormal(-1.5, 0.5)),
        )

    def sparse(X, y):
        variance, lengthscale, noise = priors()
        f = ns.svgp("f", ns.kernels.RBF(variance, lengthscale), X, X, jitter=JITTER)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f, noise), obs=y)

    def exact(X, y):
        variance, lengthscale, noise = priors()
        K = ns.kernels.RBF(variance, lengthscale)(X, X)
        cov = K + (noise**2 + JITTER) * jnp.eye(X.shape[0])
        numpyro.sample("y", dist.MultivariateNormal(jnp.zeros(X.shape[0]), cov), obs=y)

    def run(model, key):
        mcmc = MCMC(
            NUTS(model), num_warmup=1000, num_samples=3000, num_chains=1, progress_bar=False
        )
        mcmc.run(key, X, y)
        return mcmc.get_samples(group_by_chain=True)

    got, want = run(ns.sgpmc(sparse), random.PRNGKey(0)), run(exact, random.PRNGKey(1))
    for name in names:
        a, b = np.asarray(got[name]), np.asarray(want[name])
        se = [np.std(s) / np.sqrt(effective_sample_size(s)) for s in (a, b)]
        assert abs(a.mean() - b.mean()) < 4 * np.hypot(*se), (name, a.mean(), b.mean(), se)


FLOAT32 = """
import jax, jax.numpy as jnp, numpy as np, numpyro, numpyro.distributions as dist
from jax import random
from numpyro.infer import MCMC, NUTS
import numpyro_svgp as ns
assert not jax.config.jax_enable_x64
rng = np.random.default_rng(0)
X = np.sort(rng.uniform(-3, 3, size=(40, 1)), axis=0).astype(np.float32)
y = (np.sin(2 * X[:, 0]) + 0.2 * rng.normal(size=40)).astype(np.float32)
def model(X, y):
    k = ns.kernels.RBF(numpyro.sample("variance", dist.LogNormal(0.0, 1.0)),
                       numpyro.sample("lengthscale", dist.LogNormal(0.0, 1.0)))
    f = ns.svgp("f", k, X, jnp.linspace(-3, 3, 8, dtype=jnp.float32)[:, None])
    noise = numpyro.sample("noise", dist.LogNormal(-1.0, 1.0))
    with numpyro.plate("data", 40):
        numpyro.sample("y", dist.Normal(f, noise), obs=y)
mcmc = MCMC(NUTS(ns.sgpmc(model)), num_warmup=300, num_samples=300, progress_bar=False)
mcmc.run(random.PRNGKey(0), X, y, extra_fields=("diverging",))
s = mcmc.get_samples()
assert all(v.dtype == jnp.float32 for v in s.values()), {k: v.dtype for k, v in s.items()}
assert int(mcmc.get_extra_fields()["diverging"].sum()) < 15
noise = float(s["noise"].mean())
assert 0.12 < noise < 0.3, noise
pointwise = numpyro.infer.log_likelihood(ns.sgpmc(model), s, X, y)["y_sgpmc"]
assert pointwise.shape == (300, 40) and pointwise.dtype == jnp.float32, pointwise.dtype
print("float32 sgpmc ok", noise)
"""


@pytest.mark.slow
def test_float32_sgpmc_smoke():
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if k != "JAX_ENABLE_X64"}
    run = subprocess.run(
        [sys.executable, "-c", FLOAT32], capture_output=True, text=True, timeout=600, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "float32 sgpmc ok" in run.stdout


@pytest.mark.slow
def test_hmcgibbs_and_nuts_match_the_dense_gaussian_posterior():
    """With the kernel fixed, the SGPMC density of (v, shift) for y ~ Normal(f + shift, s) is
    Gaussian: y_n ~ N(a_n v + shift, s^2) (the conditional variance c_n only adds
    -c_n / (2 s^2)), with N(0, 1) priors, whose posterior is computed densely here.
    HMCGibbs (NUTS on v, shift drawn exactly from its Gaussian conditional) and NUTS on
    both reach its means within Monte-Carlo error."""
    from numpyro.infer import HMCGibbs

    X, f, rng = _data(n=25)
    y = f + 0.4 + 0.2 * rng.normal(size=len(X))
    Z = np.linspace(-2.5, 2.5, 5)[:, None]

    model = _shifted_model(Z)

    A, _ = _conditional(X, Z, 1.1, 0.9)
    design = np.hstack([A, np.ones((len(X), 1))])
    precision = np.eye(6) + design.T @ design / 0.04
    exact = np.linalg.solve(precision, design.T @ y / 0.04)  # (v, shift)
    shift_precision = 1.0 + len(X) / 0.04

    def gibbs_fn(rng_key, gibbs_sites, hmc_sites):
        residual = jnp.asarray(y) - jnp.asarray(A) @ hmc_sites["f_whitened"]
        mean = jnp.sum(residual) / 0.04 / shift_precision
        return {"shift": mean + random.normal(rng_key) / jnp.sqrt(shift_precision)}

    for kernel, key in (
        (HMCGibbs(NUTS(ns.sgpmc(model)), gibbs_fn=gibbs_fn, gibbs_sites=["shift"]), 0),
        (NUTS(ns.sgpmc(model)), 1),
    ):
        mcmc = MCMC(kernel, num_warmup=500, num_samples=2000, progress_bar=False)
        mcmc.run(random.PRNGKey(key), X, y)
        samples = mcmc.get_samples()
        draws = np.concatenate(
            [np.asarray(samples["f_whitened"]), np.asarray(samples["shift"])[:, None]], axis=1
        )
        se = np.std(draws, axis=0) / np.sqrt(effective_sample_size(draws[None]))
        assert np.all(np.abs(draws.mean(0) - exact) < 4 * se), (draws.mean(0), exact, se)


def test_sites_observed_from_outside_keep_their_values():
    """A site conditioned outside ns.sgpmc (as HMCGibbs conditions its Gibbs sites) enters
    the integrated likelihood at its conditioned value."""
    X, f, rng = _data(n=20)
    y = f + 0.3 + 0.2 * rng.normal(size=len(X))
    Z = np.linspace(-2.5, 2.5, 5)[:, None]

    model = _shifted_model(Z)

    v = rng.normal(size=5)
    conditioned = numpyro.handlers.condition(ns.sgpmc(model), {"shift": 0.3})
    got = float(log_density(conditioned, (X, y), {}, {"f_whitened": jnp.asarray(v)})[0])
    A, cond_var = _conditional(X, Z, 1.1, 0.9)
    expected = (
        np.sum(stats.norm.logpdf(v))
        + stats.norm.logpdf(0.3)
        + np.sum(stats.norm.logpdf(y, A @ v + 0.3, 0.2) - cond_var / (2 * 0.04))
    )
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_a_family_of_gps_is_the_sum_of_its_members():
    """svgp inside a group plate with per-group lengthscales: the SGPMC density is the
    dense formula summed over the groups."""
    X, _, rng = _data(n=14)
    Y = np.stack([np.sin(2 * X[:, 0]), np.cos(X[:, 0])]) + 0.2 * rng.normal(size=(2, 14))
    Z = np.linspace(-2.5, 2.5, 5)[:, None]

    def model(X, Y):
        with numpyro.plate("group", 2, dim=-2):
            lengthscale = numpyro.sample("lengthscale", dist.LogNormal(0.0, 1.0))
            f = ns.svgp("f", ns.kernels.RBF(1.2, lengthscale), X, jnp.asarray(Z), jitter=JITTER)
            with numpyro.plate("data", X.shape[0], dim=-1):
                numpyro.sample("y", dist.Normal(f, 0.3), obs=Y)

    v = rng.normal(size=(2, 1, 5))
    lengthscales = np.array([[0.7], [1.4]])
    values = {"lengthscale": jnp.asarray(lengthscales), "f_whitened": jnp.asarray(v)}
    got = float(log_density(ns.sgpmc(model), (X, Y), {}, values)[0])
    expected = 0.0
    for g in range(2):
        A, cond_var = _conditional(X, Z, 1.2, lengthscales[g, 0])
        expected += (
            stats.lognorm(s=1.0).logpdf(lengthscales[g, 0])
            + np.sum(stats.norm.logpdf(v[g, 0]))
            + np.sum(stats.norm.logpdf(Y[g], A @ v[g, 0], 0.3) - cond_var / 0.18)
        )
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_a_deep_gp_and_an_outside_observation_get_their_own_messages():
    X, f, rng = _data(n=10)
    Z = jnp.linspace(-2, 2, 4)[:, None]

    def deep(X, y):
        h = ns.svgp("h", ns.kernels.RBF(1.0, 1.0), X, Z)
        g = ns.svgp("g", ns.kernels.RBF(1.0, 1.0), h[:, None], Z)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(g, 0.2), obs=y)

    values = {"h_whitened": jnp.zeros(4), "g_whitened": jnp.zeros(4)}
    with pytest.raises(ValueError, match="model cannot be integrated exactly: svgp 'g' takes"):
        log_density(ns.sgpmc(deep), (X, f), {}, values)
    values = {"variance": 1.0, "lengthscale": 1.0, "noise": 0.2, "f_whitened": jnp.zeros(4)}
    outside = numpyro.handlers.condition(ns.sgpmc(_model(Z)), {"y": f})
    with pytest.raises(ValueError, match=r"observed by a handler outside ns.sgpmc"):
        log_density(outside, (X,), {}, values)
    with pytest.raises(TypeError, match="required positional argument: .fn."):
        ns.sgpmc(quadrature_points=10)


@pytest.mark.slow
def test_partial_pooling_recovers_the_population_lengthscale():
    """A GP per group (svgp in a plate, X and Z per group), each group's log lengthscale
    drawn from a learnt population N(mu, tau^2). On groups simulated from a known
    population, NUTS on the SGPMC density puts the true mu within 2 posterior sds, and
    its posterior of (mu, tau) is that of NUTS on the exact hierarchical GP (Z = X, so the
    two densities are equal) within Monte-Carlo error."""
    groups, points, noise = 8, 20, 0.3
    true_mu, true_tau = np.log(0.5), 0.3
    rng = np.random.default_rng(0)
    log_lengthscales = true_mu + true_tau * rng.normal(size=groups)
    X = np.sort(rng.uniform(-1.5, 1.5, size=(groups, points, 1)), axis=1)
    Y = np.stack(
        [
            rng.multivariate_normal(
                np.zeros(points),
                reference.rbf(X[g], X[g], 1.0, np.exp(log_lengthscales[g])) + 1e-9 * np.eye(points),
            )
            for g in range(groups)
        ]
    ) + noise * rng.normal(size=(groups, points))

    def population():
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        tau = numpyro.sample("tau", dist.HalfNormal(0.5))
        return mu, tau

    def sparse(X, Y):
        mu, tau = population()
        with numpyro.plate("group", groups, dim=-2):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))  # non-centred log lengthscale
            kernel = ns.kernels.RBF(1.0, jnp.exp(mu + tau * z))
            f = ns.svgp("f", kernel, X, X, jitter=JITTER)
            with numpyro.plate("data", points, dim=-1):
                numpyro.sample("y", dist.Normal(f, noise), obs=Y)

    def exact(X, Y):
        mu, tau = population()
        with numpyro.plate("group", groups, dim=-1):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            scaled = (X - jnp.swapaxes(X, -1, -2)) / jnp.exp(mu + tau * z)[:, None, None]
            cov = jnp.exp(-0.5 * scaled**2) + (noise**2 + JITTER) * jnp.eye(points)
            numpyro.sample("y", dist.MultivariateNormal(jnp.zeros(points), cov), obs=Y)

    def run(model, key):
        mcmc = MCMC(NUTS(model), num_warmup=500, num_samples=1000, progress_bar=False)
        mcmc.run(key, jnp.asarray(X), jnp.asarray(Y))
        return mcmc.get_samples(group_by_chain=True)

    got, want = run(ns.sgpmc(sparse), random.PRNGKey(0)), run(exact, random.PRNGKey(1))
    mu = np.asarray(got["mu"])
    assert abs(mu.mean() - true_mu) < 2 * mu.std(), (mu.mean(), mu.std(), true_mu)
    for name in ("mu", "tau"):
        a, b = np.asarray(got[name]), np.asarray(want[name])
        se = [np.std(s) / np.sqrt(effective_sample_size(s)) for s in (a, b)]
        assert abs(a.mean() - b.mean()) < 4 * np.hypot(*se), (name, a.mean(), b.mean(), se)
