"""The NumPyro layer: site names and shapes, the analytic KL, AutoSVGP, and bad input.

Bad input covered here (each must raise an error naming the problem):
X/Z feature mismatch; Z given 1-D; y length not matching X; NaN/inf in X (concrete
and traced) and in y; non-positive kernel hyperparameters passed directly; a
failing Cholesky of K_zz; svgp called inside a plate; a discrete latent site.
"""

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from jax import random
from numpyro.distributions.kl import kl_divergence
from numpyro.handlers import seed, substitute, trace
from numpyro.infer import SVI

import numpyro_svgp as ns

from .helpers import gaussian_model, initial_params, toy_data

X, Y = toy_data(30)
Z0 = np.linspace(-2, 2, 5)[:, None]


def _traces(model, guide, params, *args):
    guide_trace = trace(seed(substitute(guide, data=params), 0)).get_trace(*args)
    model_trace = trace(seed(substitute(model, data=params), 1)).get_trace(*args)
    return model_trace, guide_trace


@pytest.mark.slow
def test_sites_names_shapes_and_analytic_kl():
    model = gaussian_model(Z0)
    guide = ns.AutoSVGP(model)
    params = initial_params(model, guide, X, Y)
    assert {"f_whitened_auto_loc", "f_whitened_auto_scale_tril"} <= set(params)
    assert params["f_whitened_auto_loc"].shape == (5,)
    assert params["f_whitened_auto_scale_tril"].shape == (5, 5)
    model_trace, guide_trace = _traces(model, guide, params, X, Y)

    prior = model_trace["f_whitened"]["fn"]
    assert isinstance(prior, dist.MultivariateNormal)
    assert prior.event_shape == (5,) and prior.batch_shape == ()
    np.testing.assert_array_equal(prior.scale_tril, np.eye(5))
    np.testing.assert_array_equal(prior.loc, np.zeros(5))
    assert model_trace["f"]["type"] == "deterministic"
    assert model_trace["f"]["value"].shape == (30,)
    assert model_trace["y"]["is_observed"]

    q = guide_trace["f_whitened"]["fn"]
    assert isinstance(q, dist.MultivariateNormal)
    # numpyro's own analytic KL applies to the pair (no NotImplementedError)
    expected = 0.5 * (jnp.sum(q.scale_tril**2) + jnp.sum(q.loc**2) - 5) - jnp.sum(
        jnp.log(jnp.diagonal(q.scale_tril))
    )
    assert float(kl_divergence(q, prior)) == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.slow
def test_guide_emits_every_latent_site_and_summaries():
    def model(X, y=None):
        ls = numpyro.sample("lengthscale", dist.LogNormal(0.0, 0.5))
        kernel = ns.kernels.RBF(1.0, ls)
        f = ns.svgp("f", kernel, X, numpyro.param("Z", jnp.asarray(Z0)))
        offset = numpyro.sample("offset", dist.Normal(0.0, 1.0))
        noise = numpyro.sample("noise", dist.HalfNormal(1.0))
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f + offset, noise), obs=y)

    guide = ns.AutoSVGP(model)
    params = initial_params(model, guide, X, Y)
    # a q(v) with a mean and off-diagonal correlations, so that a sampler that dropped
    # either would be caught below
    rng = np.random.default_rng(3)
    loc = rng.normal(size=5)
    L = np.tril(0.6 * rng.normal(size=(5, 5)), -1) + np.diag(rng.uniform(0.3, 1.0, size=5))
    params = {**params, "f_whitened_auto_loc": jnp.asarray(loc)}
    params["f_whitened_auto_scale_tril"] = jnp.asarray(L)
    _, guide_trace = _traces(model, guide, params, X, Y)
    sampled = [n for n, s in guide_trace.items() if s["type"] == "sample"]
    # AutoNormal's sites in model order, then the whitened ones (no ELBO depends on the order)
    assert sampled == ["lengthscale", "offset", "noise", "f_whitened"]

    median = guide.median(params)
    assert set(median) == {"lengthscale", "f_whitened", "offset", "noise"}
    assert median["lengthscale"] > 0 and median["noise"] > 0
    quantiles = guide.quantiles(params, [0.1, 0.5, 0.9])
    for name in median:
        np.testing.assert_allclose(quantiles[name][1], median[name], rtol=1e-10)
        assert np.all(quantiles[name][0] <= quantiles[name][2])
    draws = guide.sample_posterior(random.PRNGKey(0), params, sample_shape=(4000,))
    assert draws["f_whitened"].shape == (4000, 5)
    assert draws["noise"].shape == (4000,) and np.all(draws["noise"] > 0)
    # q(v) draws have the mean m and covariance L L^T, within 5 standard errors: n draws'
    # mean has SE sqrt(C_ii / n), their covariance SE sqrt((C_ii C_jj + C_ij^2) / (n - 1))
    v = np.asarray(draws["f_whitened"])
    n, C = len(v), L @ L.T
    assert np.all(np.abs(v.mean(0) - loc) < 5 * np.sqrt(np.diag(C) / n))
    se_cov = np.sqrt((np.outer(np.diag(C), np.diag(C)) + C**2) / (n - 1))
    assert np.all(np.abs(np.cov(v.T) - C) < 5 * se_cov)


def test_scale_tril_with_negative_diagonal_is_a_valid_factor():
    from numpyro_svgp._guide import whitened_scale_tril

    raw = np.array([[-0.5, 9.0], [0.3, 0.8]])  # upper triangle ignored, one negative diagonal
    S = np.asarray(whitened_scale_tril(jnp.asarray(raw)))
    L = np.tril(raw)
    assert np.all(np.diag(S) > 0) and np.allclose(np.triu(S, 1), 0)
    np.testing.assert_allclose(S @ S.T, L @ L.T, rtol=1e-14)


def test_svgp_inside_a_plate_is_refused():
    def model(X, y=None):
        with numpyro.plate("data", X.shape[0]):
            f = ns.svgp("f", ns.kernels.RBF(), X, jnp.asarray(Z0))
            numpyro.sample("y", dist.Normal(f, 0.1), obs=y)

    with pytest.raises(ValueError, match="called inside a plate"):
        trace(seed(model, 0)).get_trace(X, Y)


def test_discrete_latent_site_is_refused_by_autosvgp():
    def model(X, y=None):
        numpyro.sample("k", dist.Bernoulli(0.5))
        f = ns.svgp("f", ns.kernels.RBF(), X, jnp.asarray(Z0))
        numpyro.sample("y", dist.Normal(f, 0.1), obs=y)

    with pytest.raises(ValueError, match="continuous latent sites only; site 'k' is discrete"):
        initial_params(model, ns.AutoSVGP(model), X, Y)


def _svi_run(model, *args, steps=2):
    svi = SVI(model, ns.AutoSVGP(model), optax.adam(1e-2), ns.SVGP_ELBO())
    return svi.run(random.PRNGKey(0), steps, *args, progress_bar=False)


@pytest.mark.parametrize(
    "X_bad, Z_bad, match",
    [
        (np.ones((30, 2)), Z0, "X has 2 features but Z has 1"),
        (X, Z0[:, 0], r"Z must be a 2-D array.*got shape \(5,\)"),
        (np.where(np.arange(30)[:, None] == 3, np.nan, X), Z0, "X contains NaN or inf"),
        (np.where(np.arange(30)[:, None] == 0, np.inf, X), Z0, "X contains NaN or inf"),
        (X, np.full((5, 1), np.nan), "Z contains NaN or inf"),
    ],
)
def test_bad_inputs_to_svgp(X_bad, Z_bad, match):
    kernel = ns.kernels.RBF(1.0, 0.5)
    with pytest.raises(ValueError, match=match):
        trace(seed(lambda: ns.svgp("f", kernel, X_bad, Z_bad), 0)).get_trace()


def test_bad_observations_under_svi():
    model = gaussian_model(Z0)
    with pytest.raises(ValueError, match=r"observed site 'y' has shape \(29,\).*\(30,\)"):
        _svi_run(model, X, Y[:29])
    with pytest.raises(ValueError, match=r"observed site 'y' has shape \(1,\)"):
        _svi_run(model, X, Y[:1])
    # NaN in y is found inside the compiled step
    with pytest.raises(Exception, match="observed site 'y' contains NaN or inf"):
        _svi_run(model, X, np.where(np.arange(30) == 5, np.nan, Y))
    # NaN in X found inside the compiled step as well
    model_traced_x = gaussian_model(Z0)
    svi = SVI(model_traced_x, ns.AutoSVGP(model_traced_x), optax.adam(1e-2), ns.SVGP_ELBO())
    state = svi.init(random.PRNGKey(0), X, Y)
    with pytest.raises(Exception, match="X contains NaN or inf"):
        svi.update(state, np.where(np.arange(30)[:, None] == 2, np.nan, X), Y)


def test_cholesky_failure_names_the_matrix_and_causes():
    Z_dup = np.array([[0.0], [0.0], [1.0]])
    model = gaussian_model(Z_dup, jitter=0.0)
    with pytest.raises(Exception, match=r"Cholesky factorisation of K_zz.*3x3.*duplicate"):
        _svi_run(model, X, Y)


def test_kernel_type_is_checked():
    with pytest.raises(TypeError, match="needs a numpyro_svgp.kernels.Kernel"):
        trace(seed(lambda: ns.svgp("f", lambda a, b: a @ b.T, X, Z0), 0)).get_trace()


def test_svgp_elbo_refuses_mutable_state_and_honours_site_scale():
    def with_mutable(X, y=None):
        numpyro.primitives.mutable("counter", jnp.zeros(()))
        gaussian_model(Z0)(X, y)

    with pytest.raises(NotImplementedError, match=r"mutable state \(sites \['counter'\]\)"):
        _svi_run(with_mutable, X, Y)

    model = gaussian_model(Z0)
    guide = ns.AutoSVGP(model)
    params = initial_params(model, guide, X, Y)
    params = dict(params, f_whitened_auto_loc=jnp.linspace(-1, 1, 5))
    half = numpyro.handlers.scale(model, scale=0.5)
    half_guide = numpyro.handlers.scale(guide, scale=0.5)
    full_loss = ns.SVGP_ELBO().loss(random.PRNGKey(0), params, model, guide, X, Y)
    half_loss = ns.SVGP_ELBO().loss(random.PRNGKey(0), params, half, half_guide, X, Y)
    assert float(half_loss) == pytest.approx(0.5 * float(full_loss), rel=1e-12)


def test_autosvgp_sets_up_from_one_run_of_the_model_and_names_a_bad_initial_value():
    """The guide's prototype is one run of the model (numpyro's initialisation ran it
    three times, differentiating its log density op by op, each op compiled alone),
    with the whitened site at 0 and nothing drawn for the svgp output."""
    runs = []

    def model(X, y=None):
        runs.append(1)
        kernel = ns.kernels.RBF(1.0, numpyro.sample("lengthscale", dist.LogNormal(0.0, 0.3)))
        f = ns.svgp("f", kernel, X, jnp.asarray(Z0))
        noise = numpyro.sample("noise", dist.HalfNormal(1.0))
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f, noise + 0.1), obs=y)

    guide = ns.AutoSVGP(model, init_loc_fn=numpyro.infer.init_to_value(values={"lengthscale": 0.7}))
    with numpyro.handlers.seed(rng_seed=0):
        guide(X, Y)
    assert len(runs) == 1
    params = initial_params(model, guide, X, Y)
    np.testing.assert_allclose(params["lengthscale_auto_loc"], np.log(0.7), rtol=1e-12)
    np.testing.assert_array_equal(params["f_whitened_auto_loc"], np.zeros(len(Z0)))

    # an initial value outside the support (log 0 in unconstrained space) is named
    bad = ns.AutoSVGP(model, init_loc_fn=numpyro.infer.init_to_value(values={"noise": 0.0}))
    with pytest.raises(ValueError, match="initial value of site 'noise' is not finite"):
        initial_params(model, bad, X, Y)
