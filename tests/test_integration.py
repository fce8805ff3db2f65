"""SVGP_ELBO's integration of every site that depends on svgp outputs (float64).

References are independent of the library: the marginals q(f_n) are computed densely
in NumPy, and each point's expected log-likelihood is integrated by
``scipy.integrate.quad`` (``dblquad`` for two outputs).
"""

import ast
import os

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from jax import random
from numpyro.handlers import block
from numpyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from numpyro.infer.autoguide import (
    AutoDelta,
    AutoGuideList,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from scipy import integrate, special, stats

import numpyro_svgp as ns

from . import reference as ref

N, M, VAR, LS, JITTER = 30, 7, 0.9, 0.8, 1e-6
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    X = np.sort(rng.uniform(-3, 3, size=(N, 1)), axis=0)
    Z = np.linspace(-2.5, 2.5, M)[:, None]
    return rng, X, Z


def _random_q(rng, scale=0.4):
    m = rng.normal(size=M)
    S = np.tril(scale * rng.normal(size=(M, M)), -1) + np.diag(rng.uniform(0.3, 0.9, size=M))
    return m, S


def _dense_marginals(X, Z, m, S):
    K_zz = ref.rbf(Z, Z, VAR, LS) + JITTER * np.eye(M)
    L = np.linalg.cholesky(K_zz)
    A = np.linalg.solve(L, ref.rbf(Z, X, VAR, LS)).T
    mean = A @ m
    var = VAR - np.sum(A**2, axis=1) + np.sum((A @ S) ** 2, axis=1)
    return mean, var


def _dense_kl(m, S):
    return 0.5 * (np.sum(S**2) + m @ m - M) - np.sum(np.log(np.abs(np.diag(S))))


def _quad_expectation(log_lik, mean, var):
    """sum_n int log_lik(n, f) N(f; mean_n, var_n) df by adaptive quadrature."""
    total = 0.0
    for n in range(len(mean)):
        sd = np.sqrt(var[n])

        def integrand(f, n=n, sd=sd):
            return stats.norm.pdf(f, mean[n], sd) * log_lik(n, f)

        total += integrate.quad(
            integrand, mean[n] - 12 * sd, mean[n] + 12 * sd, epsabs=1e-13, epsrel=1e-12, limit=200
        )[0]
    return total


def _one_gp_model(likelihood, Z):
    def model(X, y=None):
        f = ns.svgp("f", ns.kernels.RBF(VAR, LS), X, Z, jitter=JITTER)
        with numpyro.plate("data", X.shape[0]):
            likelihood(f, y)

    return model


def _params(model, X, y, m, S, elbo=None):
    guide = ns.AutoSVGP(model)
    svi = SVI(model, guide, optax.adam(1e-2), elbo or ns.SVGP_ELBO())
    params = svi.get_params(svi.init(random.PRNGKey(0), X, y))
    params["f_whitened_auto_loc"] = jnp.asarray(m)
    params["f_whitened_auto_scale_tril"] = jnp.asarray(S)
    return guide, params


def _sigmoid(f):
    return special.expit(f)


LIKELIHOODS = {
    "bernoulli_logits": (
        lambda f, y: numpyro.sample("y", dist.Bernoulli(logits=f), obs=y),
        lambda rng, f: (rng.uniform(size=N) < _sigmoid(f)).astype(float),
        lambda y: lambda n, f: stats.bernoulli.logpmf(y[n], _sigmoid(f)),
    ),
    "bernoulli_probs": (
        lambda f, y: numpyro.sample("y", dist.Bernoulli(probs=jax.nn.sigmoid(f)), obs=y),
        lambda rng, f: (rng.uniform(size=N) < _sigmoid(f)).astype(float),
        lambda y: lambda n, f: stats.bernoulli.logpmf(y[n], _sigmoid(f)),
    ),
    "poisson": (
        lambda f, y: numpyro.sample("y", dist.Poisson(jnp.exp(f)), obs=y),
        lambda rng, f: rng.poisson(np.exp(f)).astype(float),
        lambda y: lambda n, f: stats.poisson.logpmf(y[n], np.exp(f)),
    ),
    "student_t": (
        lambda f, y: numpyro.sample("y", dist.StudentT(4.0, f, 1.0), obs=y),
        lambda rng, f: f + rng.standard_t(4.0, size=N),
        lambda y: lambda n, f: stats.t.logpdf(y[n], 4.0, f, 1.0),
    ),
    # a narrow Student-t (scale 0.5 against sd(f) up to 1): its log density has complex
    # poles at y +- 1j * scale * sqrt(nu), close enough that 20 points leave a relative
    # error of a few 1e-6; the test asks for more points
    "student_t_narrow": (
        lambda f, y: numpyro.sample("y", dist.StudentT(4.0, f, 0.5), obs=y),
        lambda rng, f: f + 0.5 * rng.standard_t(4.0, size=N),
        lambda y: lambda n, f: stats.t.logpdf(y[n], 4.0, f, 0.5),
    ),
    "gamma": (
        lambda f, y: numpyro.sample("y", dist.Gamma(2.0, 2.0 * jnp.exp(-f)), obs=y),
        lambda rng, f: rng.gamma(2.0, np.exp(f) / 2.0),
        lambda y: lambda n, f: stats.gamma.logpdf(y[n], 2.0, scale=np.exp(f) / 2.0),
    ),
}


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_quadrature_equals_scipy_quad_and_is_deterministic(name):
    likelihood, simulate, log_lik = LIKELIHOODS[name]
    rng, X, Z = _inputs(1)
    m, S = _random_q(rng)
    mean, var = _dense_marginals(X, Z, m, S)
    y = simulate(rng, np.sin(2 * X[:, 0]))
    model = _one_gp_model(likelihood, Z)
    guide, params = _params(model, X, y, m, S)
    points = 50 if name == "student_t_narrow" else 20
    elbo = ns.SVGP_ELBO(quadrature_points=points)
    report = ns.integration_report(model, guide, params, X, y, elbo=elbo)
    assert report == {
        "y": {"integration": f"quadrature ({points} points)", "outputs": ("f",), "reason": ""}
    }
    expected = _quad_expectation(log_lik(y), mean, var) - _dense_kl(m, S)
    got = -float(elbo.loss(random.PRNGKey(0), params, model, guide, X, y))
    assert got == pytest.approx(expected, rel=1e-6)
    # deterministic: bit-identical for another key
    assert -float(elbo.loss(random.PRNGKey(123), params, model, guide, X, y)) == got
    # fewer points are less exact (the option is used)
    coarse = -float(
        ns.SVGP_ELBO(quadrature_points=2).loss(random.PRNGKey(0), params, model, guide, X, y)
    )
    assert coarse != got


@pytest.mark.parametrize("name", ["bernoulli_logits", "poisson"])
def test_trace_mean_field_monte_carlo_averages_to_the_quadrature(name):
    likelihood, simulate, _ = LIKELIHOODS[name]
    rng, X, Z = _inputs(2)
    m, S = _random_q(rng)
    y = simulate(rng, np.sin(2 * X[:, 0]))
    model = _one_gp_model(likelihood, Z)
    guide, params = _params(model, X, y, m, S)
    exact = -float(ns.SVGP_ELBO().loss(random.PRNGKey(0), params, model, guide, X, y))
    mc = jax.jit(jax.vmap(lambda k: TraceMeanField_ELBO().loss(k, params, model, guide, X, y)))
    draws = -np.asarray(mc(random.split(random.PRNGKey(1), 4000)))
    se = draws.std(ddof=1) / np.sqrt(len(draws))
    assert se > 0
    assert abs(draws.mean() - exact) < 4 * se


def _two_gp_model(Z):
    def model(X, y=None):
        f = ns.svgp("f", ns.kernels.RBF(VAR, LS), X, Z, jitter=JITTER)
        g = ns.svgp("g", ns.kernels.RBF(VAR, LS), X, Z, jitter=JITTER)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f, jnp.exp(g)), obs=y)

    return model


def test_heteroscedastic_site_equals_two_dimensional_integral():
    rng, X, Z = _inputs(3)
    (m_f, S_f), (m_g, S_g) = _random_q(rng), _random_q(rng, scale=0.2)
    m_g = 0.3 * m_g
    mean_f, var_f = _dense_marginals(X, Z, m_f, S_f)
    mean_g, var_g = _dense_marginals(X, Z, m_g, S_g)
    y = np.sin(2 * X[:, 0]) + 0.3 * rng.normal(size=N)
    model = _two_gp_model(Z)
    guide = ns.AutoSVGP(model)
    svi = SVI(model, guide, optax.adam(1e-2), ns.SVGP_ELBO())
    params = svi.get_params(svi.init(random.PRNGKey(0), X, y))
    params.update(
        f_whitened_auto_loc=jnp.asarray(m_f),
        f_whitened_auto_scale_tril=jnp.asarray(S_f),
        g_whitened_auto_loc=jnp.asarray(m_g),
        g_whitened_auto_scale_tril=jnp.asarray(S_g),
    )
    report = ns.integration_report(model, guide, params, X, y)
    assert report["y"]["integration"] == "quadrature (20 x 20 points)"
    assert report["y"]["outputs"] == ("f", "g")
    # the 2-D integral per point on a 200 x 200 Gauss-Legendre grid over +-10 sd of each
    # marginal (a rule for smooth integrands on a box, unrelated to Gauss-Hermite)
    nodes, weights = special.roots_legendre(200)
    expected = 0.0
    for n in range(N):
        sf, sg = np.sqrt(var_f[n]), np.sqrt(var_g[n])
        f = mean_f[n] + 10 * sf * nodes
        g = mean_g[n] + 10 * sg * nodes
        density = (
            stats.norm.pdf(f, mean_f[n], sf)[:, None]
            * stats.norm.pdf(g, mean_g[n], sg)[None, :]
            * stats.norm.logpdf(y[n], f[:, None], np.exp(g)[None, :])
        )
        expected += 100 * sf * sg * weights @ density @ weights
    expected -= _dense_kl(m_f, S_f) + _dense_kl(m_g, S_g)
    got = -float(ns.SVGP_ELBO().loss(random.PRNGKey(0), params, model, guide, X, y))
    assert got == pytest.approx(expected, rel=1e-6)
    assert -float(ns.SVGP_ELBO().loss(random.PRNGKey(5), params, model, guide, X, y)) == got


OFFSET = np.linspace(-1.0, 1.0, N)


def _site_models(Z):
    """Models whose one observed site 'y' depends on f in different ways."""

    def plain(X, y=None):
        f = ns.svgp("f", ns.kernels.RBF(VAR, LS), X, Z, jitter=JITTER)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f, 0.3), obs=y)

    def offset(X, y=None):
        f = ns.svgp("f", ns.kernels.RBF(VAR, LS), X, Z, jitter=JITTER)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f + OFFSET, 0.3), obs=y)

    def column(X, y=None):
        # two observations per point, f broadcast over a trailing axis under to_event
        f = ns.svgp("f", ns.kernels.RBF(VAR, LS), X, Z, jitter=JITTER)
        scale = jnp.array([0.3, 0.6])
        numpyro.sample(
            "y",
            dist.Normal(f[:, None] + OFFSET[:, None], scale).to_event(2),
            obs=None if y is None else jnp.stack([y, -y], axis=1),
        )

    def bernoulli(X, y=None):
        f = ns.svgp("f", ns.kernels.RBF(VAR, LS), X, Z, jitter=JITTER)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Bernoulli(logits=f), obs=None if y is None else (y > 0) * 1.0)

    def cumulative(X, y=None):
        f = ns.svgp("f", ns.kernels.RBF(VAR, LS), X, Z, jitter=JITTER)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(jnp.cumsum(f), 0.3), obs=y)

    return {
        "plain": plain,
        "offset": offset,
        "column": column,
        "bernoulli": bernoulli,
        "cumulative": cumulative,
    }


@pytest.mark.parametrize(
    "name,integration",
    [
        ("plain", "closed form"),
        ("offset", "closed form"),
        ("column", "closed form"),
        ("bernoulli", "quadrature (20 points)"),
        ("cumulative", "Monte Carlo"),
    ],
)
def test_report_names_the_integration_of_each_site(name, integration):
    rng, X, Z = _inputs(4)
    y = np.sin(2 * X[:, 0])
    model = _site_models(Z)[name]
    guide, params = _params(model, X, y, *_random_q(rng))
    report = ns.integration_report(model, guide, params, X, y)
    assert report["y"]["integration"] == integration
    assert report["y"]["outputs"] == ("f",)
    if integration == "Monte Carlo":
        assert "cumsum" in report["y"]["reason"]
        with pytest.raises(ValueError, match=r"strict=True.*site 'y'.*cumsum"):
            ns.SVGP_ELBO(strict=True).loss(random.PRNGKey(0), params, model, guide, X, y)
        assert "Monte Carlo" in ns.format_integration_report(report)
    else:
        assert report["y"]["reason"] == ""
        ns.SVGP_ELBO(strict=True).loss(random.PRNGKey(0), params, model, guide, X, y)


def test_closed_forms_with_offset_and_broadcast_equal_the_dense_formula():
    rng, X, Z = _inputs(5)
    m, S = _random_q(rng)
    mean, var = _dense_marginals(X, Z, m, S)
    y = np.sin(2 * X[:, 0]) + 0.2 * rng.normal(size=N)
    models = _site_models(Z)

    def gaussian(y, loc, s):
        return np.sum(-0.5 * np.log(2 * np.pi * s**2) - ((y - loc) ** 2 + var) / (2 * s**2))

    expected = {
        "offset": gaussian(y, mean + OFFSET, 0.3),
        "column": gaussian(y, mean + OFFSET, 0.3) + gaussian(-y, mean + OFFSET, 0.6),
    }
    for name, value in expected.items():
        guide, params = _params(models[name], X, y, m, S)
        got = -float(ns.SVGP_ELBO().loss(random.PRNGKey(0), params, models[name], guide, X, y))
        assert got == pytest.approx(value - _dense_kl(m, S), rel=1e-10), name


def test_masked_and_weighted_gaussian_site_in_closed_form():
    rng, X, Z = _inputs(6)
    m, S = _random_q(rng)
    mean, var = _dense_marginals(X, Z, m, S)
    y = np.sin(2 * X[:, 0])
    keep = rng.uniform(size=N) < 0.6

    def model(X, y=None):
        f = ns.svgp("f", ns.kernels.RBF(VAR, LS), X, Z, jitter=JITTER)
        with (
            numpyro.plate("data", X.shape[0]),
            numpyro.handlers.mask(mask=keep),
            numpyro.handlers.scale(scale=3.0),
        ):
            numpyro.sample("y", dist.Normal(f, 0.4), obs=y)

    guide, params = _params(model, X, y, m, S)
    assert ns.integration_report(model, guide, params, X, y)["y"]["integration"] == "closed form"
    terms = -0.5 * np.log(2 * np.pi * 0.16) - ((y - mean) ** 2 + var) / (2 * 0.16)
    expected = 3.0 * np.sum(terms[keep]) - _dense_kl(m, S)
    got = -float(ns.SVGP_ELBO().loss(random.PRNGKey(0), params, model, guide, X, y))
    assert got == pytest.approx(expected, rel=1e-10)


def test_non_pointwise_site_is_an_unbiased_monte_carlo_estimate():
    rng, X, Z = _inputs(7)
    m, S = _random_q(rng)
    y = np.cumsum(np.sin(2 * X[:, 0])) / 5
    model = _site_models(Z)["cumulative"]
    guide, params = _params(model, X, y, m, S)
    loss = jax.jit(jax.vmap(lambda k: ns.SVGP_ELBO().loss(k, params, model, guide, X, y)))
    draws = -np.asarray(loss(random.split(random.PRNGKey(0), 2000)))
    assert draws.std() > 0
    # reference: q(f) marginals and the joint draw A v + diag noise, densely in NumPy
    K_zz = ref.rbf(Z, Z, VAR, LS) + JITTER * np.eye(M)
    L = np.linalg.cholesky(K_zz)
    A = np.linalg.solve(L, ref.rbf(Z, X, VAR, LS)).T
    cond_var = VAR - np.sum(A**2, axis=1)
    sampler = np.random.default_rng(0)
    ref_draws = []
    for _ in range(4000):
        v = m + S @ sampler.normal(size=M)
        f = A @ v + np.sqrt(np.maximum(cond_var, 0)) * sampler.normal(size=N)
        ref_draws.append(np.sum(stats.norm.logpdf(y, np.cumsum(f), 0.3)))
    ref_draws = np.asarray(ref_draws) - _dense_kl(m, S)
    se = np.hypot(draws.std() / np.sqrt(len(draws)), ref_draws.std() / np.sqrt(len(ref_draws)))
    assert abs(draws.mean() - ref_draws.mean()) < 4 * se


def _assert_same_mean_as_trace_elbo(model, guide, params, X, y, draws=2000):
    """SVGP_ELBO's loss has the mean of numpyro's Trace_ELBO loss (an independent, unbiased
    estimator that draws every latent site from the guide): the difference of the two
    means of ``draws`` keys each is within 5 of its standard errors, and nonzero
    variance shows that both estimators are random."""
    keys = random.split(random.PRNGKey(11), draws)
    ours, theirs = (
        np.asarray(jax.jit(jax.vmap(lambda k, e=e: e.loss(k, params, model, guide, X, y)))(keys))
        for e in (ns.SVGP_ELBO(), Trace_ELBO())
    )
    assert ours.std() > 0 and theirs.std() > 0
    se = np.sqrt(ours.var(ddof=1) / draws + theirs.var(ddof=1) / draws)
    assert abs(ours.mean() - theirs.mean()) < 5 * se, (ours.mean(), theirs.mean(), se)


def test_deep_gp_falls_back_to_monte_carlo_with_the_reason():
    rng, X, Z = _inputs(8)

    def model(X, y=None):
        h = ns.svgp("h", ns.kernels.RBF(VAR, LS), X, Z, jitter=JITTER)
        f = ns.svgp("f", ns.kernels.RBF(VAR, LS), h[:, None], Z, jitter=JITTER)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f, 0.3), obs=y)

    y = np.sin(2 * X[:, 0])
    guide = ns.AutoSVGP(model)
    svi = SVI(model, guide, optax.adam(1e-2), ns.SVGP_ELBO())
    params = svi.get_params(svi.init(random.PRNGKey(0), X, y))
    report = ns.integration_report(model, guide, params, X, y)
    assert report["y"]["integration"] == "Monte Carlo"
    assert "svgp 'f' takes its inputs from svgp output 'h'" in report["y"]["reason"]
    # the Monte Carlo fallback is unbiased: its mean over keys is that of numpyro's
    # Trace_ELBO (which draws every site), within 5 standard errors of the difference
    _assert_same_mean_as_trace_elbo(model, guide, params, X, y)
    with pytest.raises(ValueError, match="strict=True.*'h'"):
        ns.SVGP_ELBO(strict=True).loss(random.PRNGKey(0), params, model, guide, X, y)


def test_the_elbo_forms_no_n_by_m_array_in_blocks():
    """With the Gaussian data term in blocks, nothing of size (N, M) is traced."""
    n, m = 2000, 9
    rng = np.random.default_rng(9)
    X = rng.uniform(-3, 3, size=(n, 1))
    y = np.sin(2 * X[:, 0])
    Z = np.linspace(-3, 3, m)[:, None]

    def model(X, y=None):
        f = ns.svgp("f", ns.kernels.RBF(VAR, LS), X, Z, jitter=JITTER)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f, 0.3), obs=y)

    guide = ns.AutoSVGP(model)
    for form in ("matrix", "per_point"):
        elbo = ns.SVGP_ELBO(gaussian_form=form, block_rows=100)
        svi = SVI(model, guide, optax.adam(1e-2), elbo)
        params = svi.get_params(svi.init(random.PRNGKey(0), X, y))
        closed = jax.make_jaxpr(
            jax.grad(lambda p, elbo=elbo: elbo.loss(random.PRNGKey(0), p, model, guide, X, y))
        )(params)
        shapes = set()

        def walk(jaxpr, shapes=shapes):
            for eqn in jaxpr.eqns:
                shapes.update(tuple(v.aval.shape) for v in eqn.outvars)
                for value in eqn.params.values():
                    for sub in value if isinstance(value, (tuple, list)) else [value]:
                        if isinstance(sub, jax.extend.core.ClosedJaxpr):
                            walk(sub.jaxpr)
                        elif isinstance(sub, jax.extend.core.Jaxpr):
                            walk(sub)

        walk(closed.jaxpr)
        assert (100, m) in shapes or (m, 100) in shapes, form  # the blocks are there
        assert not {(n, m), (m, n)} & shapes, form


def test_inducing_points_are_the_raw_array():
    rng, X, Z = _inputs(10)
    y = np.sin(2 * X[:, 0])
    m, S = _random_q(rng)
    likelihood = LIKELIHOODS["bernoulli_logits"][0]
    losses = []
    for inducing in (Z, ns.InducingPoints(Z)):
        model = _one_gp_model(likelihood, inducing)
        guide, params = _params(model, X, (y > 0) * 1.0, m, S)
        losses.append(
            float(ns.SVGP_ELBO().loss(random.PRNGKey(0), params, model, guide, X, (y > 0) * 1.0))
        )
    assert losses[0] == losses[1]
    conditional = ns.whitened_conditional(ns.kernels.RBF(VAR, LS), X, Z, jitter=JITTER)
    assert conditional._fields == (
        "kernel",
        "inducing",
        "inputs",
        "cholesky",
        "jitter",
        "family",
        "group_index",
        "mixing",
    )
    # one GP; svgp inside plates makes a family, with group_index in its ragged form
    assert conditional.family.shape == () and conditional.group_index is None
    assert isinstance(conditional.inducing, ns.InducingPoints)


@pytest.mark.slow
def test_autosvgp_is_an_autonormal_with_its_subsample_handling():
    """A local latent under a subsampled plate gets a full-size parameter, as AutoNormal
    gives it."""
    rng, X, Z = _inputs(11)
    y = np.sin(2 * X[:, 0])

    def model(X, y=None, batch=10):
        f = ns.svgp("f", ns.kernels.RBF(VAR, LS), X, Z, jitter=JITTER)
        with numpyro.plate("data", X.shape[0], subsample_size=batch) as idx:
            a = numpyro.sample("a", dist.Normal(0.0, 1.0))
            numpyro.sample("y", dist.Normal(f[idx] + a, 0.3), obs=None if y is None else y[idx])

    guide = ns.AutoSVGP(model)
    assert isinstance(guide, AutoNormal)
    svi = SVI(model, guide, optax.adam(1e-2), ns.SVGP_ELBO())
    params = svi.get_params(svi.init(random.PRNGKey(0), X, y))
    blocked = block(model, hide=["f_whitened"])
    plain = AutoNormal(blocked)
    svi = SVI(blocked, plain, optax.adam(1e-2), TraceMeanField_ELBO())
    plain_params = svi.get_params(svi.init(random.PRNGKey(0), X, y))
    assert params["a_auto_loc"].shape == plain_params["a_auto_loc"].shape == (N,)
    assert params["a_auto_scale"].shape == plain_params["a_auto_scale"].shape == (N,)
    assert params["f_whitened_auto_scale_tril"].shape == (M, M)
    draws = guide.sample_posterior(random.PRNGKey(1), params, sample_shape=(3,))
    assert draws["a"].shape == (3, N) and draws["f_whitened"].shape == (3, M)
    assert set(guide.median(params)) == {"a", "f_whitened"}


@pytest.mark.slow
def test_natural_gradient_touches_only_the_guides_own_pairs():
    rng, X, Z = _inputs(12)
    y = np.sin(2 * X[:, 0]) + 0.1 * rng.normal(size=N)

    def model(X, y=None):
        s = numpyro.sample("s", dist.LogNormal(-1.0, 0.3))
        f = ns.svgp("f", ns.kernels.RBF(VAR, LS), X, Z, jitter=JITTER)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f, s), obs=y)

    svgp_part = ns.AutoSVGP(block(model, hide=["s"]))
    guide = AutoGuideList(model)
    guide.append(svgp_part)
    guide.append(AutoMultivariateNormal(block(model, expose=["s"])))
    optimizer = ns.natural_gradient(optax.sgd(0.1), 0.5, guide=svgp_part)
    svi = SVI(model, guide, optimizer, TraceMeanField_ELBO())
    state = svi.init(random.PRNGKey(0), X, y)
    params = svi.get_params(state)
    assert {"auto_loc", "auto_scale_tril", "f_whitened_auto_loc"} <= set(params)
    assert svgp_part.whitened_param_names() == [
        ("f_whitened_auto_loc", "f_whitened_auto_scale_tril")
    ]
    # the gradient of the linear loss sum(params), except the ignored upper triangle of
    # scale_tril, whose gradient is zero
    grads = jax.tree.map(jnp.ones_like, params)
    grads["f_whitened_auto_scale_tril"] = jnp.tril(grads["f_whitened_auto_scale_tril"])
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    # plain SGD on the AutoMultivariateNormal's loc and scale_tril, untouched by natgrad
    np.testing.assert_allclose(updates["auto_loc"], -0.1 * np.ones_like(params["auto_loc"]))
    np.testing.assert_allclose(
        updates["auto_scale_tril"], -0.1 * np.ones_like(params["auto_scale_tril"])
    )
    # and the natural step of size 0.5 on q(v), against the dense reference: for
    # loss = sum(m) + sum(tril(chol(Sigma))), d/dm = 1 and d/dSigma by central differences
    m0 = np.asarray(params["f_whitened_auto_loc"])
    L0 = np.asarray(params["f_whitened_auto_scale_tril"])
    assert np.all(np.diag(L0) > 0)  # so that L0 is Sigma's Cholesky factor
    Sigma0 = L0 @ L0.T
    dloss_dSigma = ref.symmetric_gradient(lambda C: np.sum(np.linalg.cholesky(C)), Sigma0)
    m_ref, C_ref = ref.natural_step(m0, Sigma0, np.ones_like(m0), dloss_dSigma, 0.5)
    m_new = m0 + np.asarray(updates["f_whitened_auto_loc"])
    L_new = L0 + np.asarray(updates["f_whitened_auto_scale_tril"])
    np.testing.assert_allclose(m_new, m_ref, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(L_new @ L_new.T, C_ref, rtol=1e-6, atol=1e-8)
    with pytest.raises(TypeError, match="AutoSVGP"):
        ns.natural_gradient(optax.sgd(0.1), guide=guide)


def test_options_are_checked():
    with pytest.raises(ValueError, match="gaussian_form"):
        ns.SVGP_ELBO(gaussian_form="dense")
    with pytest.raises(ValueError, match="block_rows"):
        ns.SVGP_ELBO(block_rows=0)
    with pytest.raises(ValueError, match="quadrature_points"):
        ns.SVGP_ELBO(quadrature_points=0)


@pytest.mark.slow
def test_quadrature_in_float32_is_close_to_float64():
    rng, X, Z = _inputs(13)
    m, S = _random_q(rng)
    y = (np.sin(2 * X[:, 0]) > 0) * 1.0
    likelihood = LIKELIHOODS["bernoulli_logits"][0]
    values = {}
    for dtype in ("float64", "float32"):
        Zd = jnp.asarray(Z, dtype)
        model = _one_gp_model(likelihood, Zd)
        cast = (jnp.asarray(X, dtype), jnp.asarray(y, dtype))
        guide, params = _params(model, *cast, m, S)
        params = jax.tree.map(lambda a, dtype=dtype: jnp.asarray(a, dtype), params)
        loss = ns.SVGP_ELBO().loss(random.PRNGKey(0), params, model, guide, *cast)
        values[dtype] = float(loss)
        assert np.isfinite(values[dtype])
    assert values["float32"] == pytest.approx(values["float64"], rel=1e-4)


def test_package_has_no_import_cycle():
    package = os.path.join(ROOT, "numpyro_svgp")
    graph = {}
    for file in os.listdir(package):
        if not file.endswith(".py"):
            continue
        module = file[:-3]
        tree = ast.parse(open(os.path.join(package, file)).read())
        graph[module] = {
            node.module.split(".")[1]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("numpyro_svgp.")
        } | {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == "numpyro_svgp"
            for alias in node.names
        } - {module}
    graph.pop("__init__")
    state = {}

    def visit(module, path):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", f"import cycle: {' -> '.join(path + [module])}"
        state[module] = "open"
        for dependency in graph.get(module, ()):
            visit(dependency, path + [module])
        state[module] = "done"

    for module in graph:
        visit(module, [])
    assert "_conditional" not in graph["_linalg"] and not graph["_linalg"]


def _dense_gaussian_kl(m, C):
    return 0.5 * (np.trace(C) + m @ m - M - np.linalg.slogdet(C)[1])


@pytest.mark.parametrize("guide_name", ["diagonal", "point_mass", "low_rank"])
def test_other_guides_of_v(guide_name):
    """AutoNormal and AutoDelta on the whitened site: the closed form with their mean
    and covariance (for the point mass, zero covariance and log p(v) in place of the
    KL), deterministic in the key. AutoLowRankMultivariateNormal draws v through its
    joint site: the report says so, and the loss averages to the closed form."""
    rng, X, Z = _inputs(11)
    y = np.sin(2 * X[:, 0]) + 0.2 * rng.normal(size=N)
    model = _one_gp_model(lambda f, y: numpyro.sample("y", dist.Normal(f, 0.3), obs=y), Z)
    m = rng.normal(size=M)
    if guide_name == "diagonal":
        guide = AutoNormal(model)
        scale = rng.uniform(0.3, 0.9, size=M)
        values, C = {"f_whitened_auto_loc": m, "f_whitened_auto_scale": scale}, np.diag(scale**2)
    elif guide_name == "low_rank":
        guide = AutoLowRankMultivariateNormal(model, rank=2)
        W, scale = 0.4 * rng.normal(size=(M, 2)), rng.uniform(0.3, 0.9, size=M)
        values = {"auto_loc": m, "auto_cov_factor": W, "auto_scale": scale}
        # numpyro scales the factor by the diagonal: cov = diag(s) (W W^T + I) diag(s)
        C = scale[:, None] * (W @ W.T + np.eye(M)) * scale[None, :]
    else:
        guide = AutoDelta(model)
        values, C = {"f_whitened_auto_loc": m}, np.zeros((M, M))
    svi = SVI(model, guide, optax.adam(1e-2), ns.SVGP_ELBO())
    params = svi.get_params(svi.init(random.PRNGKey(0), X, y))
    assert set(params) == set(values)
    params = {k: jnp.asarray(v) for k, v in values.items()}
    S = np.linalg.cholesky(C) if guide_name != "point_mass" else C
    mean, var = _dense_marginals(X, Z, m, S)
    ell = np.sum(-0.5 * np.log(2 * np.pi * 0.09) - ((y - mean) ** 2 + var) / (2 * 0.09))
    if guide_name == "point_mass":
        expected = ell + np.sum(stats.norm.logpdf(m))
    else:
        expected = ell - _dense_gaussian_kl(m, C)
    report = ns.integration_report(model, guide, params, X, y)["y"]
    assert report["integration"] == "closed form"
    loss = jax.jit(jax.vmap(lambda k: ns.SVGP_ELBO().loss(k, params, model, guide, X, y)))
    if guide_name != "low_rank":
        assert report["reason"] == ""
        losses = loss(random.split(random.PRNGKey(0), 2))
        assert losses[0] == losses[1]
        assert -float(losses[0]) == pytest.approx(expected, rel=1e-10)
        return
    assert report["reason"] == (
        "v of svgp output 'f' is drawn through the guide's site '_auto_latent': "
        "exact over f given v, at one draw of v"
    )
    draws = -np.asarray(loss(random.split(random.PRNGKey(0), 4000)))
    assert draws.std() > 0
    assert abs(draws.mean() - expected) < 4 * draws.std() / np.sqrt(len(draws))


def test_a_non_gaussian_q_of_v_is_reported_and_refused_under_strict():
    rng, X, Z = _inputs(12)
    y = (rng.uniform(size=N) < 0.5).astype(float)
    model = _one_gp_model(lambda f, y: numpyro.sample("y", dist.Bernoulli(logits=f), obs=y), Z)

    def guide(X, y=None):
        loc = numpyro.param("loc", jnp.zeros(M))
        numpyro.sample("f_whitened", dist.StudentT(5.0, loc, 0.5).to_event(1))

    report = ns.integration_report(model, guide, {"loc": jnp.zeros(M)}, X, y)
    assert report["y"]["integration"] == "quadrature (20 points)"
    assert "q(v) of svgp output 'f' is a Independent, not Gaussian" in report["y"]["reason"]
    with pytest.raises(ValueError, match=r"strict=True.*site 'y'.*not Gaussian"):
        ns.SVGP_ELBO(strict=True).loss(random.PRNGKey(0), {"loc": jnp.zeros(M)}, model, guide, X, y)
    # still an unbiased estimate (quadrature over f given the drawn v): its mean over keys
    # is that of numpyro's Trace_ELBO, within 5 standard errors of the difference
    _assert_same_mean_as_trace_elbo(model, guide, {"loc": jnp.asarray(rng.normal(size=M))}, X, y)


def test_version_lives_in_one_place_and_the_package_is_typed():
    import importlib.metadata
    import pathlib

    assert importlib.metadata.version("numpyro_svgp") == ns.__version__
    assert (pathlib.Path(ns.__file__).parent / "py.typed").is_file()
