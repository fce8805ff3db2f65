"""Deep-kernel SVGP: a Warped kernel with an equinox network fitted by SVI."""

import os
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from jax import random
from numpyro.contrib.module import eqx_module
from numpyro.infer import SVI, Predictive

import numpyro_svgp as ns

from .helpers import toy_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_identity_warp_equals_the_base_kernel():
    rng = np.random.default_rng(0)
    X1, X2 = rng.normal(size=(7, 3)), rng.normal(size=(5, 3))
    base = ns.kernels.Matern52(1.3, np.array([0.5, 1.0, 2.0]))
    warped = ns.kernels.Warped(base, lambda x: x)
    np.testing.assert_array_equal(warped(X1, X2), base(X1, X2))
    np.testing.assert_array_equal(warped(X1), base(X1))
    np.testing.assert_array_equal(warped.diag(X1), base.diag(X1))
    assert warped.evaluate(X1[0], X2[1]) == pytest.approx(float(base(X1[:1], X2[1:2])[0, 0]))
    # and the same SVGP: the Titsias bound with input-space and feature-space Z
    X, y = toy_data(40, seed=1)
    Z = X[::5]
    base = ns.kernels.Matern52(1.3, 0.7)
    warped = ns.kernels.Warped(base, lambda x: x)
    expected = float(ns.titsias_bound(base, X, y, Z, 0.05))
    assert float(ns.titsias_bound(warped, X, y, Z, 0.05)) == pytest.approx(expected, rel=1e-12)
    assert float(
        ns.titsias_bound(warped, X, y, ns.FeatureInducingPoints(Z), 0.05)
    ) == pytest.approx(expected, rel=1e-12)


def _model(net0, Z0):
    def model(X, y=None, num_data=None):
        net = eqx_module("net", net0)
        kernel = ns.kernels.Warped(
            ns.kernels.RBF(
                numpyro.param("variance", 1.0, constraint=dist.constraints.positive),
                numpyro.param("lengthscale", 1.0, constraint=dist.constraints.positive),
            ),
            net,
        )
        f = ns.svgp("f", kernel, X, ns.FeatureInducingPoints(numpyro.param("Z", Z0)))
        noise_var = numpyro.param("noise_var", 0.05, constraint=dist.constraints.positive)
        scale = 1.0 if num_data is None else num_data / X.shape[0]
        with numpyro.plate("data", X.shape[0]), numpyro.handlers.scale(scale=scale):
            numpyro.sample("y", dist.Normal(f, jnp.sqrt(noise_var)), obs=y)

    return model


@pytest.mark.slow
def test_gradients_reach_the_network_and_it_trains_on_minibatches_with_predictive():
    X, y = toy_data(200, seed=2)
    net0 = eqx.nn.MLP(1, 2, 16, 2, activation=jnp.tanh, key=random.PRNGKey(0))
    Z0 = jax.vmap(net0)(jnp.asarray(X[::20]))
    model = _model(net0, Z0)
    guide = ns.AutoSVGP(model)
    svi = SVI(model, guide, optax.adam(1e-2), ns.SVGP_ELBO())
    state = svi.init(random.PRNGKey(1), X, y)
    params = svi.get_params(state)
    assert "net$params" in params
    # at q(v) = p(v) the ELBO does not depend on the projection at all; move q first
    moved_q = dict(params, f_whitened_auto_loc=params["f_whitened_auto_loc"] + 0.3)
    grads = jax.grad(lambda p: ns.SVGP_ELBO().loss(random.PRNGKey(0), p, model, guide, X, y))(
        moved_q
    )
    leaves = jax.tree.leaves(grads["net$params"])
    assert leaves and all(np.all(np.isfinite(g)) for g in leaves)
    assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 1e-3
    result = ns.train_epochs(
        svi, random.PRNGKey(2), 25, X, y, batch_size=50, num_data=len(X), progress_bar=False
    )
    assert np.all(np.isfinite(result.losses)) and result.num_skipped == 0
    assert result.losses[-8:].mean() < result.losses[:8].mean() - 50
    moved = jax.tree.leaves(
        jax.tree.map(
            lambda a, b: jnp.max(jnp.abs(a - b)), result.params["net$params"], params["net$params"]
        )
    )
    assert max(float(m) for m in moved) > 1e-3
    X_new = np.linspace(-3, 3, 11)[:, None]
    draws = Predictive(model, guide=guide, params=result.params, num_samples=50)(
        random.PRNGKey(3), X_new
    )
    assert draws["f"].shape == (50, 11) and draws["y"].shape == (50, 11)
    mean, var = ns.predict_f(model, guide, result.params, X_new)
    np.testing.assert_allclose(
        np.asarray(draws["f"]).mean(0), mean, atol=5 * np.sqrt(float(np.max(var)) / 50) + 1e-6
    )


def test_feature_inducing_points_errors():
    X = np.zeros((4, 1))
    with pytest.raises(TypeError, match="Warped kernel"):
        ns.whitened_conditional(ns.kernels.RBF(), X, ns.FeatureInducingPoints(np.zeros((2, 1))))
    warped = ns.kernels.Warped(ns.kernels.RBF(), lambda x: jnp.concatenate([x, x]))
    with pytest.raises(ValueError, match="2 features but Z has 3"):
        ns.whitened_conditional(warped, X, ns.FeatureInducingPoints(np.zeros((2, 3))))
    with pytest.raises(TypeError, match="callable"):
        ns.kernels.Warped(ns.kernels.RBF(), 3.0)


SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, numpyro
    import numpyro.distributions as dist, optax, equinox as eqx
    from jax import random
    from numpyro.contrib.module import eqx_module
    from numpyro.infer import SVI
    import numpyro_svgp as ns
    assert not jax.config.jax_enable_x64
    rng = np.random.default_rng(0)
    X = np.sort(rng.uniform(0, 3, size=(300, 1)), 0).astype(np.float32)
    y = (np.sin(X[:, 0] ** 2 * 3) + 0.1 * rng.normal(size=300)).astype(np.float32)
    net0 = eqx.nn.MLP(1, 2, 32, 2, activation=jnp.tanh, key=random.PRNGKey(0))
    Z0 = jax.vmap(net0)(jnp.asarray(X[::15]))
    def model(X, y=None):
        kernel = ns.kernels.Warped(ns.kernels.RBF(
            numpyro.param("variance", jnp.float32(1.0), constraint=dist.constraints.positive),
            numpyro.param("lengthscale", jnp.float32(1.0), constraint=dist.constraints.positive)),
            eqx_module("net", net0))
        f = ns.svgp("f", kernel, X, ns.FeatureInducingPoints(numpyro.param("Z", Z0)))
        s2 = numpyro.param("noise_var", jnp.float32(0.1), constraint=dist.constraints.positive)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f, jnp.sqrt(s2)), obs=y)
    svi = SVI(model, ns.AutoSVGP(model), optax.adam(1e-2), ns.SVGP_ELBO())
    result = ns.train(svi, random.PRNGKey(0), 600, X, y, progress_bar=False)
    assert result.losses.dtype == np.float32, result.losses.dtype
    assert np.all(np.isfinite(result.losses)) and result.num_skipped == 0
    assert result.losses[-50:].mean() < result.losses[:50].mean()
    print("deep float32 ok", result.losses[0], result.losses[-1])
    """
)


@pytest.mark.slow
def test_deep_kernel_trains_without_nans_in_float32():
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "JAX_ENABLE_X64": "0"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "deep float32 ok" in run.stdout
