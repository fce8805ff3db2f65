"""Several outputs: a linear model of coregionalisation (svgp(..., mixing=W)) and a
softmax over class GPs.

The LMC bound is checked against a dense, unwhitened NumPy computation of the same
bound (tests/reference.py for each latent GP, the mixing written out by hand) and
against scipy.integrate.quad for a non-Gaussian site.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from jax import random
from numpyro.infer import SVI, Predictive
from scipy import integrate

import numpyro_svgp as ns

from . import reference as ref
from .helpers import initial_params

JITTER = 1e-6
N, M, D, L, P = 20, 5, 1, 2, 3
NOISE = 0.05


def _problem():
    rng = np.random.default_rng(11)
    X = rng.uniform(-2, 2, size=(N, D))
    Z = rng.uniform(-2, 2, size=(L, M, D))
    variance = np.array([[0.8], [1.3]])  # (L, 1): one per latent GP
    lengthscale = np.array([[0.5], [1.1]])
    W = rng.normal(size=(P, L))
    Y = rng.normal(size=(P, N))
    loc = rng.normal(size=(L, 1, M))
    raw = np.tril(0.3 * rng.normal(size=(L, 1, M, M))) + np.eye(M) * rng.uniform(
        0.4, 1.0, size=(L, 1, M, 1)
    )
    return X, Z, variance, lengthscale, W, Y, loc, raw


def _lmc_model(Z, variance, lengthscale, likelihood="normal", W_latent=False):
    def model(X, W=None, Y=None):
        if W_latent:
            W = numpyro.sample("W", dist.Normal(0.0, 1.0).expand([P, L]).to_event(2))
        else:
            W = numpyro.param("W", W)
        with numpyro.plate("latent", L, dim=-2):
            kernel = ns.kernels.RBF(jnp.asarray(variance), jnp.asarray(lengthscale))
            f = ns.svgp("f", kernel, X, jnp.asarray(Z), jitter=JITTER, mixing=W)
        with numpyro.plate("output", P, dim=-2), numpyro.plate("data", N, dim=-1):
            if likelihood == "normal":
                numpyro.sample("y", dist.Normal(f, np.sqrt(NOISE)), obs=Y)
            else:
                numpyro.sample("y", dist.Poisson(jnp.exp(f)), obs=Y)

    return model


def _dense_latents(X, Z, variance, lengthscale, loc, S):
    """Per latent GP, from the whitened (m, S): dense marginals of q(g) and the KL."""
    latents = [
        ref.whitened_svgp_marginals(
            X, Z[j], float(variance[j, 0]), lengthscale[j], loc[j, 0], S[j, 0], JITTER
        )
        for j in range(L)
    ]
    means, variances, kls, _ = zip(*latents, strict=True)
    return np.array(means), np.array(variances), sum(kls)


def _dense_lmc_elbo(X, Z, variance, lengthscale, W, Y, loc, S):
    g_mean, g_var, kl = _dense_latents(X, Z, variance, lengthscale, loc, S)
    mean = np.array(
        [[sum(W[p, j] * g_mean[j, n] for j in range(L)) for n in range(N)] for p in range(P)]
    )
    var = np.array(
        [[sum(W[p, j] ** 2 * g_var[j, n] for j in range(L)) for n in range(N)] for p in range(P)]
    )
    ell = -0.5 * np.log(2 * np.pi * NOISE) - ((Y - mean) ** 2 + var) / (2 * NOISE)
    return np.sum(ell) - kl, mean, var, kl


def _with_q(params, loc, raw):
    return {
        **params,
        "f_whitened_auto_loc": jnp.asarray(loc),
        "f_whitened_auto_scale_tril": jnp.asarray(raw),
    }


def test_lmc_bound_equals_the_dense_bound_with_its_gradient_in_w_and_predictions():
    X, Z, variance, lengthscale, W, Y, loc, raw = _problem()
    model = _lmc_model(Z, variance, lengthscale)
    guide = ns.AutoSVGP(model)
    params = _with_q(initial_params(model, guide, X, W, Y), loc, raw)
    assert params["f_whitened_auto_loc"].shape == (L, 1, M)
    S = np.asarray(guide.scale_tril(jnp.asarray(raw)))
    report = ns.integration_report(model, guide, params, X, W, Y)
    assert report["y"]["integration"] == "closed form", report

    def loss(p):
        return ns.SVGP_ELBO().loss(random.PRNGKey(0), p, model, guide, X, W, Y)

    expected, mean_ref, var_ref, _ = _dense_lmc_elbo(X, Z, variance, lengthscale, W, Y, loc, S)
    assert -float(loss(params)) == pytest.approx(expected, rel=1e-10)

    # d ELBO / d W against central differences of the dense bound
    grad_W = -np.asarray(jax.grad(loss)(params)["W"])
    h = 1e-6
    for p, j in [(0, 0), (2, 1)]:
        step = np.zeros_like(W)
        step[p, j] = h
        up = _dense_lmc_elbo(X, Z, variance, lengthscale, W + step, Y, loc, S)[0]
        down = _dense_lmc_elbo(X, Z, variance, lengthscale, W - step, Y, loc, S)[0]
        assert grad_W[p, j] == pytest.approx((up - down) / (2 * h), rel=1e-6)

    mean, var = ns.predict_f(model, guide, params, X, W)
    assert mean.shape == (P, N)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(var, var_ref, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="full covariance is not available .* mixing"):
        ns.predict_f(model, guide, params, X, W, full_cov=True)


@pytest.mark.slow
def test_lmc_poisson_site_by_quadrature_against_scipy_quad():
    X, Z, variance, lengthscale, W, _, loc, raw = _problem()
    W = 0.5 * W
    Y = np.random.default_rng(2).poisson(1.5, size=(P, N)).astype(float)
    model = _lmc_model(Z, variance, lengthscale, likelihood="poisson")
    guide = ns.AutoSVGP(model)
    params = _with_q(initial_params(model, guide, X, W, Y), loc, raw)
    report = ns.integration_report(model, guide, params, X, W, Y)
    assert report["y"]["integration"].startswith("quadrature"), report
    S = np.asarray(guide.scale_tril(jnp.asarray(raw)))
    g_mean, g_var, kl = _dense_latents(X, Z, variance, lengthscale, loc, S)
    mean, var = W @ g_mean, np.square(W) @ g_var
    expected = -kl
    for mu, v, y in zip(mean.ravel(), var.ravel(), Y.ravel(), strict=True):
        sd = np.sqrt(v)

        def integrand(f, mu=mu, v=v, y=y):
            log_p = y * f - np.exp(f) - float(np.sum(np.log(np.arange(1, y + 1))))
            return np.exp(-0.5 * (f - mu) ** 2 / v) / np.sqrt(2 * np.pi * v) * log_p

        expected += integrate.quad(integrand, mu - 12 * sd, mu + 12 * sd, epsabs=1e-12)[0]
    elbo = -float(
        ns.SVGP_ELBO(quadrature_points=40).loss(random.PRNGKey(0), params, model, guide, X, W, Y)
    )
    assert elbo == pytest.approx(expected, rel=1e-8)


@pytest.mark.slow
def test_lmc_draws_share_their_latent_noise_and_w_may_be_a_latent():
    X, Z, variance, lengthscale, W, Y, loc, raw = _problem()
    model = _lmc_model(Z, variance, lengthscale)
    guide = ns.AutoSVGP(model)
    params = _with_q(initial_params(model, guide, X, W, Y), loc, raw)
    S = np.asarray(guide.scale_tril(jnp.asarray(raw)))
    g_mean, g_var, _ = _dense_latents(X, Z, variance, lengthscale, loc, S)
    # marginally independent latents at each point: cov(f_pn, f_qn) = sum_l W_pl W_ql var_ln
    num = 20000
    draws = np.asarray(
        Predictive(model, guide=guide, params=params, num_samples=num)(random.PRNGKey(3), X, W)["f"]
    )
    assert draws.shape == (num, P, N)
    n = 4
    centred = draws[:, :, n] - draws[:, :, n].mean(0)
    cov = centred.T @ centred / num
    expected = (W * g_var[:, n]) @ W.T
    se = np.sqrt((expected**2 + np.outer(np.diag(expected), np.diag(expected))) / num)
    assert np.all(np.abs(cov - expected) < 5 * se), (cov, expected)

    # W as a latent with a prior, q(W) = N(mu, sigma^2) entrywise: f given W is still in
    # closed form, and the mean of the loss over draws of W is the dense bound averaged
    # over q(W) in closed form (the bound is quadratic in W): E[W g]^2 -> (mu g)^2 plus
    # sigma^2 g^2, E[W^2] -> mu^2 + sigma^2; minus KL(q(W) || N(0, 1)). Also its gradient
    # in mu, against central differences of that closed form.
    latent = _lmc_model(Z, variance, lengthscale, W_latent=True)
    guide = ns.AutoSVGP(latent)
    params = _with_q(initial_params(latent, guide, X, None, Y), loc, raw)
    report = ns.integration_report(latent, guide, params, X, None, Y)
    assert report["y"]["integration"] == "closed form"
    mu, sigma = 0.8 * W, np.full_like(W, 0.3)
    params = {**params, "W_auto_loc": jnp.asarray(mu), "W_auto_scale": jnp.asarray(sigma)}
    _, _, kl_v = _dense_latents(X, Z, variance, lengthscale, loc, S)

    def expected_elbo(mu):
        mean = mu @ g_mean
        var = (mu**2 + sigma**2) @ g_var + sigma**2 @ g_mean**2
        ell = -0.5 * np.log(2 * np.pi * NOISE) - ((Y - mean) ** 2 + var) / (2 * NOISE)
        kl_w = np.sum(0.5 * (sigma**2 + mu**2 - 1) - np.log(sigma))
        return np.sum(ell) - kl_v - kl_w

    def loss_and_grad(key):
        value, grads = jax.value_and_grad(
            lambda p: ns.SVGP_ELBO().loss(key, p, latent, guide, X, None, Y)
        )(params)
        return value, grads["W_auto_loc"]

    keys = random.split(random.PRNGKey(4), 2000)
    values, grads = (np.asarray(a) for a in jax.jit(jax.vmap(loss_and_grad))(keys))
    se = values.std(ddof=1) / np.sqrt(len(keys))
    assert abs(-values.mean() - expected_elbo(mu)) < 5 * se, (values.mean(), se)
    h = 1e-5
    for p, j in [(0, 0), (1, 1), (2, 0)]:
        step = np.zeros_like(mu)
        step[p, j] = h
        fd = (expected_elbo(mu + step) - expected_elbo(mu - step)) / (2 * h)
        g = -grads[:, p, j]
        assert abs(g.mean() - fd) < 5 * g.std(ddof=1) / np.sqrt(len(keys)), (g.mean(), fd)


def test_mixing_errors_name_the_argument():
    X, Z, variance, lengthscale, W, Y, *_ = _problem()

    def place(W, plate=True):
        def model():
            kernel = ns.kernels.RBF(1.0, 1.0)
            if not plate:
                return ns.svgp("f", kernel, X, Z[0], mixing=W)
            with numpyro.plate("latent", L, dim=-2):
                return ns.svgp("f", kernel, X, Z[0], mixing=W)

        return numpyro.handlers.seed(model, 0)()

    assert place(W).shape == (P, N)
    with pytest.raises(
        ValueError,
        match=r"svgp\('f', \.\.\.\): mixing has shape \(3, 3\); it "
        r"needs shape \(P, 2\)",
    ):
        place(np.ones((P, 3)))
    with pytest.raises(ValueError, match=r"mixing has shape \(2,\)"):
        place(np.ones(2))
    with pytest.raises(ValueError, match="inside the latent plate"):
        place(W, plate=False)
    with pytest.raises(ValueError, match=r"mixing contains NaN or inf"):
        place(np.full((P, L), np.nan))


def _three_classes(n, seed):
    """Three well-separated classes along x: class k on [2k - 3, 2k - 1.6] (gaps between)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    X = (2.0 * y - 3.0 + 1.4 * rng.uniform(size=n))[:, None]
    return X, y


@pytest.mark.slow
def test_softmax_over_three_class_gps_reports_its_integration_and_classifies():
    X, y = _three_classes(150, 0)
    X_test, y_test = _three_classes(300, 1)
    Z = np.linspace(-3, 3, 8)[:, None]

    def model(X, y=None):
        with numpyro.plate("class", 3, dim=-2):
            kernel = ns.kernels.RBF(
                numpyro.param("variance", jnp.ones((3, 1)), constraint=dist.constraints.positive),
                numpyro.param(
                    "lengthscale", jnp.ones((3, 1)), constraint=dist.constraints.positive
                ),
            )
            f = ns.svgp("f", kernel, X, Z)  # (3, N)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Categorical(logits=f.T), obs=y)

    guide = ns.AutoSVGP(model)
    elbo = ns.SVGP_ELBO(num_particles=8)
    svi = SVI(model, guide, optax.adam(0.05), elbo)
    result = svi.run(random.PRNGKey(0), 300, X, y, progress_bar=False)
    report = ns.integration_report(model, guide, result.params, X, y, elbo=elbo)
    assert report["y"]["integration"] == "Monte Carlo"
    reason = report["y"]["reason"]
    assert "couples several values of svgp output 'f' in one term" in reason
    mean, _ = ns.predict_f(model, guide, result.params, X_test)
    accuracy = np.mean(np.argmax(np.asarray(mean), axis=0) == y_test)
    assert accuracy >= 0.9, accuracy


def test_a_natural_step_on_the_lmc_latents_is_the_dense_fisher_preconditioned_gradient():
    """The latent GPs of an LMC are coupled through W, so a natural step is not their
    optimum: it is tests/reference.py's natural_step on each latent's dense gradients,
    d ELBO / d m_l = A_l^T d_mean_l - m_l and d ELBO / d Sigma_l = A_l^T diag(d_var_l) A_l
    - (I - Sigma_l^-1) / 2 with A_l = (L_l^-1 K_zx)^T, d_mean_ln = sum_p W_pl (y_pn -
    mean_pn) / noise and d_var_ln = -sum_p W_pl^2 / (2 noise)."""
    X, Z, variance, lengthscale, W, Y, loc, raw = _problem()
    raw = np.abs(raw)  # a positive diagonal: raw is the Cholesky factor of Sigma
    model = _lmc_model(Z, variance, lengthscale)
    guide = ns.AutoSVGP(model)
    optimizer = ns.natural_gradient(optax.set_to_zero(), 0.5, guide=guide)
    svi = SVI(model, guide, optimizer, ns.SVGP_ELBO())
    state = svi.init(random.PRNGKey(0), X, W, Y)
    step, (unconstrained, opt_state) = state.optim_state  # numpyro's optax state
    unconstrained = {
        **unconstrained,
        "f_whitened_auto_loc": jnp.asarray(loc),
        "f_whitened_auto_scale_tril": jnp.asarray(raw),
    }
    state = state._replace(optim_state=(step, (unconstrained, opt_state)))
    state, _ = jax.jit(svi.update)(state, X, W, Y)
    params = svi.get_params(state)
    m_new = np.asarray(params["f_whitened_auto_loc"])
    S_new = np.asarray(params["f_whitened_auto_scale_tril"])

    A, g_mean, g_var, Sigma = [], [], [], []
    for j in range(L):
        K_zz = ref.rbf(Z[j], Z[j], float(variance[j, 0]), lengthscale[j]) + JITTER * np.eye(M)
        K_zx = ref.rbf(Z[j], X, float(variance[j, 0]), lengthscale[j])
        A.append(np.linalg.solve(np.linalg.cholesky(K_zz), K_zx).T)
        Sigma.append(raw[j, 0] @ raw[j, 0].T)
        g_mean.append(A[j] @ loc[j, 0])
        g_var.append(
            variance[j, 0] - np.sum(A[j] ** 2, axis=1) + np.sum((A[j] @ Sigma[j]) * A[j], axis=1)
        )
    mean = W @ np.array(g_mean)
    d_mean = W.T @ (Y - mean) / NOISE
    d_var = -np.sum(W**2, axis=0)[:, None] * np.ones((L, N)) / (2 * NOISE)
    for j in range(L):
        dloss_dm = -(A[j].T @ d_mean[j] - loc[j, 0])
        dloss_dSigma = -(
            A[j].T @ (d_var[j][:, None] * A[j]) - 0.5 * (np.eye(M) - np.linalg.inv(Sigma[j]))
        )
        m_ref, C_ref = ref.natural_step(loc[j, 0], Sigma[j], dloss_dm, dloss_dSigma, 0.5)
        np.testing.assert_allclose(m_new[j, 0], m_ref, rtol=1e-7, atol=1e-9)
        C = S_new[j, 0] @ S_new[j, 0].T
        np.testing.assert_allclose(C, C_ref, rtol=1e-7, atol=1e-9)


def test_softmax_elbo_averages_to_the_dense_expected_log_softmax_minus_the_kls():
    """Three independent class GPs under a softmax: q(f_cn) are the dense marginals of each
    class GP, independent across classes, so the ELBO is sum_n E[log softmax(f_n)_{y_n}]
    (by NumPy Monte Carlo, 4 x 10^4 draws per point) minus the three KLs. SVGP_ELBO's
    Monte-Carlo loss, averaged over 400 keys, agrees within 5 standard errors of the
    difference (both estimators' SEs from their draws)."""
    C, n = 3, 12
    rng = np.random.default_rng(8)
    Xs = rng.uniform(-2, 2, size=(n, 1))
    ys = rng.integers(0, C, size=n)
    Zs = np.linspace(-2, 2, 4)[:, None]
    var, ls = np.array([0.8, 1.2, 1.0]), np.array([0.6, 0.9, 1.3])
    loc = rng.normal(size=(C, 1, 4))
    raw = np.tril(0.3 * rng.normal(size=(C, 1, 4, 4)), -1) + np.eye(4) * rng.uniform(
        0.3, 0.9, size=(C, 1, 4, 1)
    )

    def model(X, y=None):
        with numpyro.plate("class", C, dim=-2):
            kernel = ns.kernels.RBF(jnp.asarray(var[:, None]), jnp.asarray(ls[:, None]))
            f = ns.svgp("f", kernel, X, jnp.asarray(Zs), jitter=JITTER)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Categorical(logits=f.T), obs=y)

    guide = ns.AutoSVGP(model)
    params = _with_q(initial_params(model, guide, Xs, ys), loc, raw)
    keys = random.split(random.PRNGKey(5), 400)
    losses = np.asarray(
        jax.jit(jax.vmap(lambda k: ns.SVGP_ELBO().loss(k, params, model, guide, Xs, ys)))(keys)
    )

    means, sds, kl = [], [], 0.0
    for c in range(C):
        mean, v, kl_c, _ = ref.whitened_svgp_marginals(
            Xs, Zs, var[c], ls[c], loc[c, 0], raw[c, 0], JITTER
        )
        means.append(mean)
        sds.append(np.sqrt(v))
        kl += kl_c
    draws = 40_000
    f = np.array(means)[:, :, None] + np.array(sds)[:, :, None] * rng.normal(size=(C, n, draws))
    log_softmax = f - np.logaddexp.reduce(f, axis=0)
    terms = log_softmax[ys, np.arange(n)]  # (n, draws): independent across points
    expected = terms.mean(axis=1).sum() - kl
    se_ref2 = np.sum(terms.var(axis=1, ddof=1) / draws)
    se = np.sqrt(losses.var(ddof=1) / len(keys) + se_ref2)
    assert losses.std() > 0
    assert abs(-losses.mean() - expected) < 5 * se, (-losses.mean(), expected, se)
    # a log density that would need the same Monte Carlo is refused, pointing to
    # Predictive; predict_y estimates the class probabilities with their error instead
    with pytest.raises(
        ValueError, match=r"site 'y' cannot be integrated over q\(f\) exactly.*Predictive"
    ):
        ns.predict_log_density(model, guide, params, Xs, ys)
    assert ns.predict_y(model, guide, params, Xs).standard_error is not None
