"""Sums over blocks of rows (numpyro_svgp._blocks) against the same sum taken whole,
and the blocked Gaussian data term against the dense reference ELBO (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpyro_svgp as ns
from numpyro_svgp import _blocks
from numpyro_svgp._blocks import block_rows, sum_over_blocks


def test_block_rows_prefers_an_exact_divisor_and_takes_small_data_whole():
    target = _blocks.BLOCK_ENTRIES // 64

    def cpu(n, m):
        return block_rows(n, m, backend="cpu")

    assert cpu(100_000, 64) == 4000  # the largest divisor at or below 4096
    assert 100_000 % cpu(100_000, 64) == 0
    assert cpu(2 * target - 1, 64) is None  # fewer than two blocks: whole
    assert cpu(2 * 4099, 64) == target  # 8198 = 2 * 4099 has no divisor in range
    assert cpu(10_000, 2048) == 250  # at least MIN_BLOCK_ROWS (256) as the target
    assert cpu(1024, 512) is None  # N < 4 M: the O(M^3) part dominates
    assert cpu(4096, 512) == 512
    # the backend of the running process when none is named
    assert block_rows(100_000, 64) == block_rows(100_000, 64, backend=jax.default_backend())


def test_block_rows_on_an_accelerator_takes_data_whole_up_to_large_sizes():
    # a GPU loops over blocks serially: the step-time grid's largest cell is whole
    for backend in ("gpu", "tpu"):
        assert block_rows(100_000, 1024, backend=backend) is None
        assert block_rows(100_000, 64, backend=backend) is None
        # 1e6 x 1024 pairs is split, into blocks of 2**27 / 1024 = 131072 rows at most
        rows = block_rows(1_000_000, 1024, backend=backend)
        assert rows is not None and 65_536 < rows <= 131_072 and 1_000_000 % rows == 0


def _term(shared, rows):
    """A sum over rows that touches every input nonlinearly, with a static leaf."""
    w, c, act = shared["w"], shared["c"], shared["act"]
    h = act(rows["X"] @ w) * rows["scale"][:, None]
    return jnp.sum(jnp.log1p(h**2) * c) + jnp.sum(rows["X"] ** 3) * c[0]


def _inputs(num_points, seed=0):
    rng = np.random.default_rng(seed)
    shared = {
        "w": jnp.asarray(rng.normal(size=(3, 5))),
        "c": jnp.asarray(rng.uniform(1, 2, 5)),
        "act": jnp.tanh,
    }
    rows = {
        "X": jnp.asarray(rng.normal(size=(num_points, 3))),
        "scale": jnp.asarray(rng.uniform(0.5, 1.5, num_points)),
    }
    return shared, rows


@pytest.mark.parametrize("rows", [7, 10])  # 101 = 14 blocks of 7 + 3; 100 = 10 blocks of 10
def test_sum_and_gradients_equal_the_whole_sum(rows):
    num_points = 101 if rows == 7 else 100
    shared, per_row = _inputs(num_points)
    whole = _term(shared, per_row)
    blocked = sum_over_blocks(_term, shared, per_row, rows)
    assert float(blocked) == pytest.approx(float(whole), rel=1e-13)

    def grads(f):
        def of(arrays):
            s = dict(shared, w=arrays["w"], c=arrays["c"])
            r = dict(per_row, X=arrays["X"])
            return f(s, r)

        return jax.grad(of)({"w": shared["w"], "c": shared["c"], "X": per_row["X"]})

    expected = grads(_term)
    got = jax.jit(lambda: grads(lambda s, r: sum_over_blocks(_term, s, r, rows)))()
    for name in expected:
        scale = float(jnp.max(jnp.abs(expected[name])))
        assert scale > 0
        np.testing.assert_allclose(
            got[name], expected[name], rtol=1e-12, atol=1e-13 * scale, err_msg=name
        )


def test_gradient_of_some_inputs_only_is_scaled_by_the_cotangent():
    shared, per_row = _inputs(60, seed=1)

    def loss(w, f):
        return 3.0 * f(dict(shared, w=w), per_row)

    expected = jax.grad(loss)(shared["w"], _term)
    got = jax.grad(loss)(shared["w"], lambda s, r: sum_over_blocks(_term, s, r, 8))
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_rows_must_share_a_leading_axis():
    shared, per_row = _inputs(10)
    with pytest.raises(ValueError, match="share a leading axis"):
        sum_over_blocks(_term, shared, dict(per_row, scale=per_row["scale"][:9]), 4)


def test_blocks_are_interleaved_so_that_a_sharded_n_stays_split():
    a = jnp.arange(12)
    blocks = _blocks.to_blocks(a, 4)  # 3 blocks of 4 rows
    np.testing.assert_array_equal(blocks, [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]])
    np.testing.assert_array_equal(_blocks.from_blocks(blocks), a)


def _elbo_and_grads(model, X, y, dtype, elbo):
    import numpyro  # noqa: F401  (the model's sites)
    from jax import random

    from .helpers import initial_params

    guide = ns.AutoSVGP(model)
    params = initial_params(model, guide, X, y)
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    params["f_whitened_auto_loc"] = params["f_whitened_auto_loc"] + 0.3

    def loss(p):
        return elbo.loss(random.PRNGKey(0), p, model, guide, X, y)

    return jax.jit(jax.value_and_grad(loss))(params)


def _warped_model(dtype, num_inducing):
    import equinox as eqx
    import numpyro
    import numpyro.distributions as dist
    from numpyro.contrib.module import eqx_module

    net0 = eqx.nn.MLP(2, 3, 8, 1, activation=jnp.tanh, key=jax.random.PRNGKey(0), dtype=dtype)
    Z0 = np.random.default_rng(3).normal(size=(num_inducing, 3))

    def model(X, y=None):
        kernel = ns.kernels.Warped(
            ns.kernels.Matern32(numpyro.param("variance", 1.0), 1.0), eqx_module("net", net0)
        )
        f = ns.svgp(
            "f", kernel, X, ns.FeatureInducingPoints(numpyro.param("Z", jnp.asarray(Z0, dtype)))
        )
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f, 0.3), obs=y)

    return model


def _spherical_model(dtype, num_inducing=None):
    # 25 features: degrees 0-4 on the sphere S^2
    import numpyro
    import numpyro.distributions as dist

    def model(X, y=None):
        kernel = ns.kernels.ArcCosine(1, numpyro.param("variance", 1.0), numpyro.param("bias", 1.0))
        f = ns.svgp("f", kernel, X, ns.SphericalHarmonicFeatures(4, 2))
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f, jnp.full(X.shape[0], 0.3, dtype)), obs=y)

    return model


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    "make_model,num_inducing",
    # float64 takes the matrix-product form for M = 20 and 25, the per-point one for 40
    [(_warped_model, 40), (_warped_model, 20), (_spherical_model, 25)],
)
@pytest.mark.slow
def test_blocked_elbo_equals_the_whole_one_for_inducing_features(make_model, num_inducing, dtype):
    """The ELBO and every gradient (kernel, network weights, Z) are the same whether
    the data term is taken whole or in blocks (55 points: 6 blocks of 9 and 1 more)."""
    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.uniform(-1, 1, size=(55, 2)), dtype)
    y = jnp.asarray(np.sin(3 * X[:, 0]) * X[:, 1], dtype)
    model = make_model(dtype, num_inducing)
    whole_value, whole_grads = _elbo_and_grads(model, X, y, dtype, ns.SVGP_ELBO(block_rows=None))
    value, grads = _elbo_and_grads(model, X, y, dtype, ns.SVGP_ELBO(block_rows=9))
    rtol = 1e-11 if dtype == "float64" else 2e-5
    assert float(value) == pytest.approx(float(whole_value), rel=rtol)
    leaves, expected = jax.tree.leaves(grads), jax.tree.leaves(whole_grads)
    assert len(leaves) == len(expected) > 3
    for got, want in zip(leaves, expected, strict=True):
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)
