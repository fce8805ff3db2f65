"""svgp inside numpyro.plate: a family of independent GPs.

Every number is checked against the dense, unwhitened NumPy references of
tests/reference.py applied to each GP of the family on its own (the family's ELBO is
the sum of its members' ELBOs), or against scipy.integrate.quad.
"""

from contextlib import ExitStack

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from jax import random
from jax.extend.core import jaxprs_in_params
from numpyro.handlers import seed, trace
from numpyro.infer import SVI, Predictive
from scipy import integrate, special

import numpyro_svgp as ns

from . import reference as ref
from .helpers import compiled_loss, initial_params

JITTER = 1e-6
N, M, D = 25, 5, 2
RNG = np.random.default_rng(7)
X = RNG.uniform(-2, 2, size=(N, D))
NOISE = 0.04


def _layout(name):
    """(plate shapes and dims, family shape) of each layout under test."""
    return {
        "group": ([("group", 3, -2)], (3,)),
        "nested": ([("region", 2, -3), ("output", 2, -2)], (2, 2)),
    }[name]


def _family_problem(layout, per_group_x):
    plates, shape = _layout(layout)
    rng = np.random.default_rng(1)
    G = int(np.prod(shape))
    batch = shape + (1,)  # the plates' batch shape: the data dim -1 is free
    variance = rng.uniform(0.5, 1.5, size=batch)
    lengthscale = rng.uniform(0.5, 1.2, size=batch + (D,))  # ARD, one per GP
    Z = rng.uniform(-2, 2, size=shape + (M, D))
    Xs = rng.uniform(-2, 2, size=shape + (N, D)) if per_group_x else X
    Y = rng.normal(size=shape + (N,))
    loc = rng.normal(size=batch + (M,))
    raw = np.tril(0.3 * rng.normal(size=batch + (M, M))) + np.eye(M) * rng.uniform(
        0.4, 1.0, size=batch + (M, 1)
    )
    return plates, shape, G, variance, lengthscale, Z, Xs, Y, loc, raw


def _model(plates, variance, lengthscale, Z, likelihood="normal", jitter=JITTER):
    def model(X, Y=None):
        with ExitStack() as stack:
            for name, size, dim in plates:
                stack.enter_context(numpyro.plate(name, size, dim=dim))
            kernel = ns.kernels.RBF(jnp.asarray(variance), jnp.asarray(lengthscale))
            f = ns.svgp("f", kernel, X, jnp.asarray(Z), jitter=jitter)
            with numpyro.plate("data", N, dim=-1):
                if likelihood == "normal":
                    numpyro.sample("y", dist.Normal(f, np.sqrt(NOISE)), obs=Y)
                else:
                    numpyro.sample("y", dist.Bernoulli(logits=f), obs=Y)

    return model


def _reference_moments(Xg, Zg, variance, lengthscale, m, S):
    """Dense unwhitened marginals of q(f) and KL of one GP, from whitened (m, S)."""
    return ref.whitened_svgp_marginals(Xg, Zg, variance, lengthscale, m, S, JITTER)


def _members(shape, variance, lengthscale, Z, Xs, loc, S, per_group_x):
    for index in np.ndindex(*shape):
        yield (
            index,
            (
                Xs[index] if per_group_x else Xs,
                Z[index],
                float(variance[index][0]),
                lengthscale[index][0],
                loc[index][0],
                S[index][0],
            ),
        )


def _params(model, guide, Xs, Y, loc, raw):
    params = initial_params(model, guide, Xs, Y)
    assert params["f_whitened_auto_loc"].shape == loc.shape
    assert params["f_whitened_auto_scale_tril"].shape == raw.shape
    return {
        **params,
        "f_whitened_auto_loc": jnp.asarray(loc),
        "f_whitened_auto_scale_tril": jnp.asarray(raw),
    }


@pytest.mark.parametrize(
    "layout, per_group_x",
    [
        ("group", False),
        ("group", True),
        pytest.param("nested", False, marks=pytest.mark.slow),
    ],
)
def test_family_elbo_is_the_sum_of_the_dense_elbos_of_its_gps(layout, per_group_x):
    plates, shape, G, variance, lengthscale, Z, Xs, Y, loc, raw = _family_problem(
        layout, per_group_x
    )
    model = _model(plates, variance, lengthscale, Z)
    tr = trace(seed(model, 0)).get_trace(Xs, Y)
    assert tr["f"]["value"].shape == shape + (N,)
    assert tr["f_whitened"]["value"].shape == shape + (1, M)
    guide = ns.AutoSVGP(model)
    params = _params(model, guide, Xs, Y, loc, raw)
    S = np.asarray(guide.scale_tril(jnp.asarray(raw)))
    report = ns.integration_report(model, guide, params, Xs, Y)
    assert report["y"]["integration"] == "closed form"

    expected = 0.0
    for index, (Xg, Zg, var, ls, m, Sg) in _members(
        shape, variance, lengthscale, Z, Xs, loc, S, per_group_x
    ):
        _, _, _, (K_xz, K_zz, mu, Sigma) = _reference_moments(Xg, Zg, var, ls, m, Sg)
        expected += ref.hensman_elbo_unwhitened(
            np.full(N, var), K_xz, K_zz, Y[index], NOISE, mu, Sigma
        )
    loss = compiled_loss(model, guide, Xs, Y)
    elbo = -float(loss(params, random.PRNGKey(0)))
    assert elbo == pytest.approx(expected, rel=1e-9)
    # and its gradient reaches every GP's q(v)
    grad = jax.grad(loss)(params, random.PRNGKey(0))
    assert np.all(np.abs(np.asarray(grad["f_whitened_auto_loc"])).reshape(G, -1).max(axis=1) > 0)

    mean, variance_f = ns.predict_f(model, guide, params, Xs)
    for index, (Xg, Zg, var, ls, m, Sg) in _members(
        shape, variance, lengthscale, Z, Xs, loc, S, per_group_x
    ):
        ref_mean, ref_var, _, _ = _reference_moments(Xg, Zg, var, ls, m, Sg)
        np.testing.assert_allclose(mean[index], ref_mean, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(variance_f[index], ref_var, rtol=1e-7, atol=1e-10)
    # one joint covariance per GP, whose diagonal is the variance
    mean_c, cov = ns.predict_f(model, guide, params, Xs, full_cov=True)
    assert cov.shape == shape + (N, N)
    np.testing.assert_allclose(mean_c, mean, rtol=1e-12)
    np.testing.assert_allclose(
        np.diagonal(cov, axis1=-2, axis2=-1), variance_f, rtol=1e-9, atol=1e-12
    )


def test_family_bernoulli_sites_are_integrated_by_quadrature_per_gp():
    plates, shape, G, variance, lengthscale, Z, Xs, _, loc, raw = _family_problem("group", False)
    Y = (np.random.default_rng(3).uniform(size=shape + (N,)) < 0.5).astype(float)
    model = _model(plates, variance, lengthscale, Z, likelihood="bernoulli")
    guide = ns.AutoSVGP(model)
    params = _params(model, guide, Xs, Y, loc, raw)
    assert ns.integration_report(model, guide, params, Xs, Y)["y"]["integration"].startswith(
        "quadrature"
    )
    S = np.asarray(guide.scale_tril(jnp.asarray(raw)))
    expected = 0.0
    for index, (Xg, Zg, var, ls, m, Sg) in _members(
        shape, variance, lengthscale, Z, Xs, loc, S, False
    ):
        mean, var_f, kl, _ = _reference_moments(Xg, Zg, var, ls, m, Sg)
        for mu_n, v_n, y_n in zip(mean, var_f, Y[index], strict=True):

            def integrand(f, mu_n=mu_n, v_n=v_n, y_n=y_n):
                log_p = y_n * f - np.logaddexp(0.0, f)
                return np.exp(-0.5 * (f - mu_n) ** 2 / v_n) / np.sqrt(2 * np.pi * v_n) * log_p

            sd = np.sqrt(v_n)
            expected += integrate.quad(integrand, mu_n - 12 * sd, mu_n + 12 * sd, epsabs=1e-12)[0]
        expected -= kl
    elbo = -float(ns.SVGP_ELBO().loss(random.PRNGKey(0), params, model, guide, Xs, Y))
    assert elbo == pytest.approx(expected, rel=1e-7)


def test_one_natural_step_reaches_every_gps_optimal_q():
    plates, shape, G, variance, lengthscale, Z, Xs, Y, _, _ = _family_problem("group", False)
    model = _model(plates, variance, lengthscale, Z)
    guide = ns.AutoSVGP(model)
    svi = SVI(
        model, guide, ns.natural_gradient(optax.set_to_zero(), 1.0, guide=guide), ns.SVGP_ELBO()
    )
    state, _ = svi.update(svi.init(random.PRNGKey(0), Xs, Y), Xs, Y)
    params = svi.get_params(state)
    S = np.asarray(guide.scale_tril(params["f_whitened_auto_scale_tril"]))
    for index in np.ndindex(*shape):
        var, ls = float(variance[index][0]), lengthscale[index][0]
        K_zz = ref.rbf(Z[index], Z[index], var, ls) + JITTER * np.eye(M)
        m_opt, S_opt = ref.whiten(
            *ref.optimal_q_u(ref.rbf(X, Z[index], var, ls), K_zz, Y[index], NOISE), K_zz
        )
        np.testing.assert_allclose(
            params["f_whitened_auto_loc"][index][0], m_opt, rtol=1e-6, atol=1e-8
        )
        Sg = S[index][0]
        np.testing.assert_allclose(Sg @ Sg.T, S_opt @ S_opt.T, rtol=1e-6, atol=1e-10)


def test_predictive_draws_have_the_family_shape_and_its_moments():
    plates, shape, G, variance, lengthscale, Z, Xs, Y, loc, raw = _family_problem("group", False)
    model = _model(plates, variance, lengthscale, Z)
    guide = ns.AutoSVGP(model)
    params = _params(model, guide, Xs, Y, loc, raw)
    draws = Predictive(model, guide=guide, params=params, num_samples=4000)(random.PRNGKey(1), Xs)
    assert draws["f"].shape == (4000,) + shape + (N,)
    mean, var = ns.predict_f(model, guide, params, Xs)
    se = np.sqrt(var / 4000)
    assert np.all(np.abs(draws["f"].mean(0) - mean) < 5 * se)
    # the sample variance of n Gaussian draws has standard error var * sqrt(2 / (n - 1))
    se_var = var * np.sqrt(2 / (4000 - 1))
    assert np.all(np.abs(draws["f"].var(0) - var) < 5 * se_var)


def _params_model(Z_init, variance_init, lengthscale_init):
    """A GP per group whose hyperparameters and Z are numpyro.params (so the loss has
    gradients in them), and a noise shared by all groups; without a group axis in X, one
    GP with the same param names."""
    positive = dist.constraints.positive

    def gp_and_likelihood(X, Y, rows):
        kernel = ns.kernels.RBF(
            numpyro.param("variance", jnp.asarray(variance_init), constraint=positive),
            numpyro.param("lengthscale", jnp.asarray(lengthscale_init), constraint=positive),
        )
        f = ns.svgp("f", kernel, X, numpyro.param("Z", jnp.asarray(Z_init)), jitter=JITTER)
        noise = numpyro.param("noise", 0.3, constraint=positive)
        with numpyro.plate("data", rows, dim=-1):
            numpyro.sample("y", dist.Normal(f, noise), obs=Y)

    def model(X, Y=None):
        if X.ndim == 2:
            return gp_and_likelihood(X, Y, X.shape[0])
        with numpyro.plate("group", X.shape[0], dim=-2):
            gp_and_likelihood(X, Y, X.shape[1])

    return model


@pytest.mark.slow
def test_family_loss_and_gradients_are_the_sums_of_its_single_gps():
    """G GPs in a plate, each with its own variance, ARD lengthscales, Z, X and q(v), and a
    shared noise: the loss is the sum of the G single-GP losses (each its own model,
    svgp outside any plate) to 1e-10, and so are the gradients: per group in the
    per-group params, summed over groups in the shared noise. A plate size other than
    the fitted one is refused at prediction."""
    G = 3
    rng = np.random.default_rng(5)
    Xs = rng.uniform(-2, 2, size=(G, N, D))
    Y = np.sin(Xs[..., 0]) + 0.3 * rng.normal(size=(G, N))
    Z = rng.uniform(-2, 2, size=(G, M, D))
    variance = rng.uniform(0.5, 1.5, size=(G, 1))
    lengthscale = rng.uniform(0.5, 1.2, size=(G, 1, D))
    loc = rng.normal(size=(G, 1, M))
    raw = np.tril(0.3 * rng.normal(size=(G, 1, M, M))) + np.eye(M) * rng.uniform(
        0.4, 1.0, size=(G, 1, M, 1)
    )
    family = _params_model(Z, variance, lengthscale)
    guide = ns.AutoSVGP(family)
    params = {
        **initial_params(family, guide, Xs, Y),
        "f_whitened_auto_loc": jnp.asarray(loc),
        "f_whitened_auto_scale_tril": jnp.asarray(raw),
    }
    loss = compiled_loss(family, guide, Xs, Y)
    value, grads = jax.value_and_grad(loss)(params, random.PRNGKey(0))

    total, noise_grad = 0.0, 0.0
    for g in range(G):
        single = _params_model(Z[g], variance[g, 0], lengthscale[g, 0])
        single_guide = ns.AutoSVGP(single)
        single_params = {
            **initial_params(single, single_guide, Xs[g], Y[g]),
            "f_whitened_auto_loc": jnp.asarray(loc[g, 0]),
            "f_whitened_auto_scale_tril": jnp.asarray(raw[g, 0]),
        }
        single_loss = compiled_loss(single, single_guide, Xs[g], Y[g])
        value_g, grads_g = jax.value_and_grad(single_loss)(single_params, random.PRNGKey(0))
        total += float(value_g)
        noise_grad += float(grads_g["noise"])
        for name in ("variance", "lengthscale", "Z", "f_whitened_auto_loc"):
            expected = np.asarray(grads_g[name])
            np.testing.assert_allclose(
                np.asarray(grads[name][g]).reshape(expected.shape),
                expected,
                rtol=1e-10,
                atol=1e-10 * np.abs(expected).max(),
                err_msg=f"{name} of group {g}",
            )
        expected = np.tril(np.asarray(grads_g["f_whitened_auto_scale_tril"]))
        np.testing.assert_allclose(
            np.tril(np.asarray(grads["f_whitened_auto_scale_tril"][g, 0])),
            expected,
            rtol=1e-10,
            atol=1e-10 * np.abs(expected).max(),
        )
    assert float(value) == pytest.approx(total, rel=1e-10)
    assert float(grads["noise"]) == pytest.approx(noise_grad, rel=1e-10)

    # the fitted plate has G members: a call with G + 1 groups is refused, not clamped;
    # by the model where a per-group param cannot grow, else by the guide
    grown = np.concatenate([Xs, Xs[:1]])
    with pytest.raises(ValueError, match=r"RBF.variance has shape \(3, 1\).*\(4, 1\)"):
        ns.predict_f(family, guide, params, grown)

    def shared(X, Y=None):
        with numpyro.plate("group", X.shape[0], dim=-2):
            f = ns.svgp("f", ns.kernels.RBF(1.0, 0.8), X, jnp.asarray(Z[0]), jitter=JITTER)
            with numpyro.plate("data", X.shape[1], dim=-1):
                numpyro.sample("y", dist.Normal(f, 0.3), obs=Y)

    guide = ns.AutoSVGP(shared)
    params = initial_params(shared, guide, Xs, Y)
    for predict in (
        lambda: ns.predict_f(shared, guide, params, grown),
        lambda: Predictive(shared, guide=guide, params=params, num_samples=2)(
            random.PRNGKey(1), grown
        ),
    ):
        with pytest.raises(ValueError, match=r"plate 'group' has size 4 .* fitted with size 3"):
            predict()


def test_hyperparameters_shared_or_per_gp_and_shape_errors_name_the_argument():
    def model(variance, lengthscale, Z, X=X):
        with numpyro.plate("group", 3, dim=-2):
            return ns.svgp("f", ns.kernels.RBF(variance, lengthscale), X, Z)

    Z = np.linspace(-2, 2, M)[:, None] * np.ones(D)
    f = seed(model, 0)
    # shared scalar, shared ARD, per-GP scalar, per-GP ARD all place 3 GPs
    for variance, lengthscale in [
        (1.0, 0.7),
        (1.0, np.ones(D)),
        (np.ones((3, 1)), np.ones((3, 1))),
        (np.ones((3, 1)), np.ones((3, 1, D))),
    ]:
        assert f(variance, lengthscale, Z).shape == (3, N)
    with pytest.raises(ValueError, match=r"RBF.variance has shape \(4, 1\).*batch shape \(3, 1\)"):
        f(np.ones((4, 1)), 1.0, Z)
    with pytest.raises(ValueError, match=r"RBF.lengthscale has shape \(3,\)"):
        f(1.0, np.ones(3), Z)  # (3,) is neither (3, 1) nor (D,) = (2,)
    with pytest.raises(ValueError, match=r"svgp\('f', \.\.\.\): Z has shape \(4, 5, 2\)"):
        f(1.0, 1.0, np.ones((4, M, D)))
    with pytest.raises(ValueError, match=r"X has shape \(2, 25, 2\)"):
        f(1.0, 1.0, Z, np.ones((2, N, D)))
    with pytest.raises(ValueError, match="Leading axes .* for ns.svgp called inside numpyro.plate"):
        ns.kernels.RBF(np.ones(3))(X)


@pytest.mark.slow
def test_subsampled_groups_give_an_unbiased_elbo_and_full_size_params():
    G = 6
    rng = np.random.default_rng(5)
    Y = rng.normal(size=(G, N))
    Z = np.linspace(-2, 2, M)[:, None] * np.ones(D)

    def model(X, Y, groups=None):
        with numpyro.plate("group", G, subsample_size=groups, dim=-2) as idx:
            ls = numpyro.sample("ls", dist.LogNormal(0.0, 0.3))
            f = ns.svgp("f", ns.kernels.RBF(1.0, ls), X, Z, jitter=JITTER)
            with numpyro.plate("data", N, dim=-1):
                numpyro.sample("y", dist.Normal(f, 0.3), obs=jnp.asarray(Y)[idx])

    sub, full = ns.AutoSVGP(model), ns.AutoSVGP(model)
    params = initial_params(model, sub, X, Y, 2)
    assert params["f_whitened_auto_loc"].shape == (G, 1, M)  # the full plate, not the batch
    params = {**params, "f_whitened_auto_loc": jnp.asarray(rng.normal(size=(G, 1, M)))}
    initial_params(model, full, X, Y)
    keys = random.split(random.PRNGKey(0), 2000)

    def losses(guide, groups):
        one = lambda key: ns.SVGP_ELBO().loss(key, params, model, guide, X, Y, groups)  # noqa: E731
        return np.asarray(jax.jit(jax.vmap(one))(keys))

    estimates, exact = losses(sub, 2), losses(full, None)
    assert np.std(estimates) > 10 * np.std(exact)  # the groups really are subsampled
    se = np.sqrt(np.var(estimates) / len(keys) + np.var(exact) / len(keys))
    assert abs(estimates.mean() - exact.mean()) < 4 * se


@pytest.mark.slow
def test_data_minibatches_inside_groups_and_arviz_dims_named_after_the_plates():
    plates, shape, G, variance, lengthscale, Z, Xs, Y, loc, raw = _family_problem("group", False)

    def model(X, Y=None, num_data=None):
        with numpyro.plate("group", G, dim=-2):
            f = ns.svgp(
                "f",
                ns.kernels.RBF(jnp.asarray(variance), jnp.asarray(lengthscale)),
                X,
                jnp.asarray(Z),
                jitter=JITTER,
            )
            with numpyro.plate("data", num_data or X.shape[0], subsample_size=X.shape[0], dim=-1):
                numpyro.sample("y", dist.Normal(f, np.sqrt(NOISE)), obs=Y)

    guide = ns.AutoSVGP(model)
    params = _params(model, guide, X, Y, loc, raw)
    full = compiled_loss(model, guide, X, Y)(params, random.PRNGKey(0))
    kl = float(
        ns.kl(params["f_whitened_auto_loc"], guide.scale_tril(params["f_whitened_auto_scale_tril"]))
    )
    # the data term of 5 batches of 5 rows, each scaled by N / 5, adds up to the full one
    # one program for the five batches: their rows are arguments, not constants
    batch_loss = jax.jit(
        lambda p, Xb, Yb: ns.SVGP_ELBO().loss(random.PRNGKey(0), p, model, guide, Xb, Yb, N)
    )
    terms = [float(batch_loss(params, X[i::5], Y[:, i::5])) - kl for i in range(5)]
    assert sum(terms) / 5 == pytest.approx(float(full) - kl, rel=1e-10)

    draws = Predictive(model, guide=guide, params=params, num_samples=20)(random.PRNGKey(1), X)
    idata = ns.to_inference_data(
        guide.sample_posterior(random.PRNGKey(2), params, sample_shape=(20,)),
        posterior_predictive={"f": draws["f"], "y": draws["y"]},
        model=model,
        model_args=(X, Y),
    )
    assert idata.posterior["f_whitened"].dims[2] == "group"
    assert idata.posterior["f_whitened"].dims[-1] == "f_inducing"
    assert idata.posterior_predictive["f"].dims[2:] == ("group", "data")


def test_diagnostics_report_the_jitter_of_each_gp():
    plates, shape, G, variance, lengthscale, Z, Xs, Y, loc, raw = _family_problem("nested", False)
    Z = Z.copy()
    Z[1, 0, :3] = Z[1, 0, 3]  # one GP of the family with repeated inducing inputs:
    # singular K_zz, which a jitter below round-off cannot factorise
    model = _model(plates, variance, lengthscale, Z, jitter=1e-20)
    guide = ns.AutoSVGP(model)
    params = initial_params(model, guide, Xs, Y)
    jitter = ns.svgp_diagnostics(model, guide, params, Xs, Y)["f"]["jitter"]
    assert jitter.shape == shape
    assert jitter[1, 0] > 1e-20 and np.all(np.delete(jitter.ravel(), 2) == 1e-20)


# --- ragged groups: X (N, D) with group_index (N,) -------------------------------------

SIZES = (3, 19, 24, 7, 2, 12)  # rows per group; N = 67 rows in all


def _ragged_problem():
    rng = np.random.default_rng(11)
    G = len(SIZES)
    group = np.repeat(np.arange(G), SIZES)
    rng.shuffle(group)  # rows of all groups interleaved
    Xr = rng.uniform(-2, 2, size=(len(group), D))
    y = rng.normal(size=len(group))
    variance = rng.uniform(0.5, 1.5, size=G)  # as sampled in plate("group", G): (G,)
    lengthscale = rng.uniform(0.5, 1.2, size=(G, D))
    Z = rng.uniform(-2, 2, size=(G, M, D))
    loc = rng.normal(size=(G, M))
    raw = np.tril(0.3 * rng.normal(size=(G, M, M))) + np.eye(M)
    return G, group, Xr, y, variance, lengthscale, Z, loc, raw


def _ragged_model(G, variance, lengthscale, Z, likelihood="normal"):
    def model(X, group, y=None):
        with numpyro.plate("group", G):
            kernel = ns.kernels.RBF(jnp.asarray(variance), jnp.asarray(lengthscale))
            f = ns.svgp("f", kernel, X, jnp.asarray(Z), jitter=JITTER, group_index=group)
        with numpyro.plate("data", X.shape[0]):
            if likelihood == "normal":
                numpyro.sample("y", dist.Normal(f, np.sqrt(NOISE)), obs=y)
            else:
                numpyro.sample("y", dist.Poisson(jnp.exp(f)), obs=y)

    return model


def test_ragged_groups_equal_the_dense_elbo_of_each_group_on_its_own_rows():
    G, group, Xr, y, variance, lengthscale, Z, loc, raw = _ragged_problem()
    model = _ragged_model(G, variance, lengthscale, Z)
    guide = ns.AutoSVGP(model)
    params = initial_params(model, guide, Xr, group, y)
    assert params["f_whitened_auto_loc"].shape == (G, M)
    params = {
        **params,
        "f_whitened_auto_loc": jnp.asarray(loc),
        "f_whitened_auto_scale_tril": jnp.asarray(raw),
    }
    assert (
        ns.integration_report(model, guide, params, Xr, group, y)["y"]["integration"]
        == "closed form"
    )
    S = np.asarray(guide.scale_tril(jnp.asarray(raw)))
    expected = 0.0
    means, variances = np.zeros(len(y)), np.zeros(len(y))
    for g in range(G):
        rows = group == g
        mean, var_f, _, (K_xz, K_zz, mu, Sigma) = _reference_moments(
            Xr[rows], Z[g], variance[g], lengthscale[g], loc[g], S[g]
        )
        means[rows], variances[rows] = mean, var_f
        expected += ref.hensman_elbo_unwhitened(
            np.full(rows.sum(), variance[g]), K_xz, K_zz, y[rows], NOISE, mu, Sigma
        )
    loss = lambda p: ns.SVGP_ELBO().loss(random.PRNGKey(0), p, model, guide, Xr, group, y)  # noqa: E731
    assert -float(jax.jit(loss)(params)) == pytest.approx(expected, rel=1e-9)
    mean, var = ns.predict_f(model, guide, params, Xr, group)
    np.testing.assert_allclose(mean, means, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(var, variances, rtol=1e-7, atol=1e-10)
    with pytest.raises(ValueError, match="full covariance is not available .* group_index"):
        ns.predict_f(model, guide, params, Xr, group, full_cov=True)

    # O(N M^2): each row meets its own GP only; no array in the loss or its gradient
    # has both a row axis and a group axis (as a padded or dense form would)
    def shapes(jaxpr):
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                yield tuple(var.aval.shape)
            for sub in jaxprs_in_params(eqn.params):
                yield from shapes(sub)

    closed = jax.make_jaxpr(jax.value_and_grad(loss))(params)
    seen = set(shapes(closed.jaxpr))
    assert (len(y), M, M) not in seen  # factors are gathered per block of rows, not per row
    assert not [shape for shape in seen if G in shape and len(y) in shape]


def test_ragged_poisson_groups_by_quadrature_and_bad_group_index_named():
    G, group, Xr, _, variance, lengthscale, Z, loc, raw = _ragged_problem()
    y = np.random.default_rng(2).poisson(2.0, size=len(group)).astype(float)
    model = _ragged_model(G, variance, lengthscale, Z, likelihood="poisson")
    guide = ns.AutoSVGP(model)
    params = {
        **initial_params(model, guide, Xr, group, y),
        "f_whitened_auto_loc": jnp.asarray(loc),
        "f_whitened_auto_scale_tril": jnp.asarray(raw),
    }
    assert ns.integration_report(model, guide, params, Xr, group, y)["y"]["integration"].startswith(
        "quadrature"
    )
    S = np.asarray(guide.scale_tril(jnp.asarray(raw)))
    expected = 0.0
    for g in range(G):
        rows = group == g
        mean, var_f, kl, _ = _reference_moments(
            Xr[rows], Z[g], variance[g], lengthscale[g], loc[g], S[g]
        )
        # E[y f - exp(f) - log y!] under N(mean, var): closed form for the Poisson(exp f)
        expected += (
            np.sum(y[rows] * mean - np.exp(mean + var_f / 2) - special.gammaln(y[rows] + 1)) - kl
        )
    elbo = -float(compiled_loss(model, guide, Xr, group, y)(params, random.PRNGKey(0)))
    assert elbo == pytest.approx(expected, rel=1e-8)

    f = seed(model, 0)
    with pytest.raises(ValueError, match=r"group_index\[5\] = 6 is outside \[0, 6\)"):
        f(Xr, np.where(np.arange(len(group)) == 5, 6, group))
    with pytest.raises(ValueError, match=r"group_index\[2\] = -1 is outside \[0, 6\)"):
        f(Xr, np.where(np.arange(len(group)) == 2, -1, group))
    with pytest.raises(ValueError, match=r"group_index has shape \(66,\).*\(67,\)"):
        f(Xr, group[:-1])
    with pytest.raises(TypeError, match="group_index must hold integers"):
        f(Xr, group.astype(float))

    # under jit the values are checked when the program runs
    def ragged_f(X, group):
        with numpyro.plate("group", G):
            return ns.svgp("f", ns.kernels.RBF(), X, jnp.asarray(Z), group_index=group)

    jitted = jax.jit(lambda X, group: seed(ragged_f, 0)(X, group))
    assert jitted(Xr, group).shape == (len(group),)
    with pytest.raises(Exception, match=r"group_index holds a value outside \[0, 6\)"):
        jax.block_until_ready(jitted(Xr, np.where(np.arange(len(group)) == 5, 6, group)))

    def outside(X):
        return ns.svgp("f", ns.kernels.RBF(), X, Z[0], group_index=group)

    with pytest.raises(ValueError, match="called inside the group plate"):
        seed(outside, 0)(Xr)


@pytest.mark.slow
def test_ragged_form_equals_the_plated_form_with_its_padding_masked():
    """Groups of 3, 17 and 50 rows: ragged, and padded to 50 rows per group in a plate."""
    sizes, width = (3, 17, 50), 50
    G = len(sizes)
    rng = np.random.default_rng(5)
    group = np.repeat(np.arange(G), sizes)
    rng.shuffle(group)
    Xr = rng.uniform(-2, 2, size=(len(group), D))
    y = rng.normal(size=len(group))
    variance = rng.uniform(0.5, 1.5, size=G)
    lengthscale = rng.uniform(0.5, 1.2, size=(G, D))
    Z = rng.uniform(-2, 2, size=(G, M, D))
    loc = rng.normal(size=(G, M))
    raw = np.tril(0.3 * rng.normal(size=(G, M, M))) + np.eye(M)
    Xp, Yp = np.zeros((G, width, D)), np.zeros((G, width))
    mask = np.zeros((G, width), bool)
    for g in range(G):
        rows = group == g
        Xp[g, : rows.sum()], Yp[g, : rows.sum()], mask[g, : rows.sum()] = Xr[rows], y[rows], True

    def plated(X, Y):
        with numpyro.plate("group", G, dim=-2):
            kernel = ns.kernels.RBF(
                jnp.asarray(variance[:, None]), jnp.asarray(lengthscale[:, None, :])
            )
            f = ns.svgp("f", kernel, X, jnp.asarray(Z), jitter=JITTER)
            with numpyro.plate("data", width, dim=-1):
                numpyro.sample("y", dist.Normal(f, np.sqrt(NOISE)).mask(mask), obs=Y)

    ragged = _ragged_model(G, variance, lengthscale, Z)
    losses, grads = {}, {}
    for name, model, args, shape in [
        ("ragged", ragged, (Xr, group, y), (G,)),
        ("plated", plated, (Xp, Yp), (G, 1)),
    ]:
        guide = ns.AutoSVGP(model)
        params = {
            **initial_params(model, guide, *args),
            "f_whitened_auto_loc": jnp.asarray(loc.reshape(shape + (M,))),
            "f_whitened_auto_scale_tril": jnp.asarray(raw.reshape(shape + (M, M))),
        }
        loss, grad = jax.value_and_grad(compiled_loss(model, guide, *args))(
            params, random.PRNGKey(0)
        )
        losses[name] = float(loss)
        grads[name] = [
            np.asarray(grad[k]).reshape(G, -1)
            for k in ("f_whitened_auto_loc", "f_whitened_auto_scale_tril")
        ]
    assert losses["ragged"] == pytest.approx(losses["plated"], rel=1e-10)
    for ragged_grad, plated_grad in zip(grads["ragged"], grads["plated"], strict=True):
        np.testing.assert_allclose(ragged_grad, plated_grad, rtol=1e-8, atol=1e-12)


def test_one_natural_step_reaches_each_ragged_groups_optimal_q():
    """Ragged groups are independent GPs on their own rows: on a Gaussian likelihood one
    natural step of size one reaches each group's optimal q (Titsias), from q(v) at the
    prior."""
    G, group, Xr, y, variance, lengthscale, Z, _, _ = _ragged_problem()
    model = _ragged_model(G, variance, lengthscale, Z)
    guide = ns.AutoSVGP(model)
    svi = SVI(
        model, guide, ns.natural_gradient(optax.set_to_zero(), 1.0, guide=guide), ns.SVGP_ELBO()
    )
    state, _ = jax.jit(svi.update)(svi.init(random.PRNGKey(0), Xr, group, y), Xr, group, y)
    params = svi.get_params(state)
    S = np.asarray(guide.scale_tril(params["f_whitened_auto_scale_tril"]))
    for g in range(G):
        rows = group == g
        K_zz = ref.rbf(Z[g], Z[g], variance[g], lengthscale[g]) + JITTER * np.eye(M)
        K_xz = ref.rbf(Xr[rows], Z[g], variance[g], lengthscale[g])
        m_opt, S_opt = ref.whiten(*ref.optimal_q_u(K_xz, K_zz, y[rows], NOISE), K_zz)
        np.testing.assert_allclose(params["f_whitened_auto_loc"][g], m_opt, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(S[g] @ S[g].T, S_opt @ S_opt.T, rtol=1e-6, atol=1e-10)
