"""Property-based tests of bad (and merely unusual) input, with hypothesis.

Each case must give either a correct result (checked against a dense NumPy
computation) or an error whose message names the offending argument, never a
wrong number or a bare XLA error. Cases:

1. shapes: any N >= 0, M >= 1 (M > N included), D >= 1: correct projection,
   conditional variance and jitter; Z far outside the data range too.
2. dtypes: float32/float64 pass; integer and boolean inputs are promoted to float
   and give the same result as the float input; float16, bfloat16 and complex are
   refused naming the argument.
3. NaN/inf at any position of X or Z: refused naming X or Z and the first index.
4. empty arrays: N = 0 gives empty results; M = 0 is refused ("Z is empty");
   D = 0 is refused ("has no features").
5. wrong ranks: 1-D or 3-D X or Z refused with the expected shape.
6. kernel hyperparameters: any non-positive or non-finite value refused naming it;
   an ARD lengthscale of the wrong length refused naming it.
7. observations: y with a trailing dimension, y of another length than X, and
   mini-batches whose X and y sizes differ are refused naming the observed site;
   NaN/inf anywhere in y is refused naming the site.
8. models: a plate of size 0 (empty data) is refused naming the plate and the empty
   argument; a GP family's group plate at numpyro's default dim=-1, around a nested
   data plate, is refused naming the plate and the fix (dim=-2).
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax import random
from numpyro.infer import SVI

import numpyro_svgp as ns

from .helpers import gaussian_model, initial_params

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _points(rng, n, d, low=-3.0, high=3.0):
    return rng.uniform(low, high, size=(n, d))


@SETTINGS
@given(
    n=st.integers(0, 25),
    m=st.integers(1, 30),
    d=st.integers(1, 3),
    shift=st.sampled_from([0.0, 10.0, -100.0]),
    seed=st.integers(0, 2**16),
)
@pytest.mark.slow
def test_any_shapes_give_the_dense_result(n, m, d, shift, seed):
    rng = np.random.default_rng(seed)
    X, Z = _points(rng, n, d), _points(rng, m, d) + shift  # Z may lie far outside the data
    kernel = ns.kernels.Matern52(0.9, 0.8)

    # jit: one compilation per shape instead of one per operation
    # (the kernel matrices of the reference too: each eager operation would compile alone)
    def parts(X, Z):
        c = ns.whitened_conditional(kernel, X, Z, jitter=1e-6)
        K_xz = kernel(X, Z) if n else jnp.zeros((0, m))
        return c.projection(), c.variance(), c.jitter, kernel(Z, Z), K_xz

    A, var, jitter, K_zz, K_xz = jax.jit(parts)(X, Z)
    assert A.shape == (n, m) and var.shape == (n,)
    K_zz = np.asarray(K_zz) + float(jitter) * np.eye(m)
    K_xz = np.asarray(K_xz)
    Q = K_xz @ np.linalg.solve(K_zz, K_xz.T)
    np.testing.assert_allclose(np.asarray(A) @ np.asarray(A).T, Q, atol=1e-6)
    np.testing.assert_allclose(var, np.maximum(0.9 - np.diag(Q), 0), atol=1e-6)
    assert np.all(np.asarray(var) >= 0)


@SETTINGS
@given(
    dtype=st.sampled_from(["float32", "float64", "int32", "int64", "bool"]),
    seed=st.integers(0, 2**16),
)
def test_real_dtypes_are_accepted_and_integers_promoted(dtype, seed):
    rng = np.random.default_rng(seed)
    X = rng.integers(-3, 4, size=(6, 2)).astype(dtype)
    Z = np.array([[0, 0], [1, -1], [2, 2]], dtype=dtype)
    kernel = ns.kernels.RBF(1.0, 1.5)
    c = ns.whitened_conditional(kernel, X, Z, jitter=1e-6)
    A, var = c.projection(), c.variance()
    assert jnp.issubdtype(A.dtype, jnp.floating)
    c64 = ns.whitened_conditional(kernel, X.astype("float64"), Z.astype("float64"), jitter=1e-6)
    A64, var64 = c64.projection(), c64.variance()
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(A, A64, atol=tol)
    np.testing.assert_allclose(var, var64, atol=tol)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.complex64])
@pytest.mark.parametrize("which", ["X", "Z"])
def test_unsupported_dtypes_are_refused_by_name(dtype, which):
    arrays = {"X": np.zeros((4, 1)), "Z": np.ones((2, 1))}
    arrays[which] = jnp.asarray(arrays[which], dtype)
    with pytest.raises(TypeError, match=f"^{which} "):
        ns.whitened_conditional(ns.kernels.RBF(), arrays["X"], arrays["Z"])


@SETTINGS
@given(
    which=st.sampled_from(["X", "Z"]),
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
    n=st.integers(1, 12),
    m=st.integers(1, 6),
    d=st.integers(1, 3),
    data=st.data(),
)
def test_nonfinite_inputs_are_refused_naming_argument_and_index(which, bad, n, m, d, data):
    rng = np.random.default_rng(0)
    arrays = {"X": _points(rng, n, d), "Z": _points(rng, m, d)}
    rows, cols = arrays[which].shape
    i, j = data.draw(st.integers(0, rows - 1)), data.draw(st.integers(0, cols - 1))
    arrays[which][i, j] = bad
    with pytest.raises(
        ValueError, match=rf"{which} contains NaN or inf .*first at index \({i}, {j}\)"
    ):
        ns.whitened_conditional(ns.kernels.RBF(), arrays["X"], arrays["Z"])


def test_empty_arrays():
    c = ns.whitened_conditional(ns.kernels.RBF(), np.zeros((0, 2)), np.ones((3, 2)))
    A, var = c.projection(), c.variance()
    assert A.shape == (0, 3) and var.shape == (0,)
    with pytest.raises(ValueError, match="Z is empty"):
        ns.whitened_conditional(ns.kernels.RBF(), np.zeros((4, 2)), np.zeros((0, 2)))
    with pytest.raises(ValueError, match=r"X has no features \(shape \(4, 0\)\)"):
        ns.whitened_conditional(ns.kernels.RBF(), np.zeros((4, 0)), np.zeros((2, 0)))


@pytest.mark.parametrize(
    "which, shape", [("X", (5,)), ("X", (5, 1, 1)), ("Z", (3,)), ("Z", (3, 1, 1))]
)
def test_wrong_ranks_are_refused(which, shape):
    arrays = {"X": np.zeros((5, 1)), "Z": np.arange(3.0)[:, None]}
    arrays[which] = np.zeros(shape)
    with pytest.raises(
        ValueError, match=rf"{which} must be a 2-D array of shape \(num_points, num_features\)"
    ):
        ns.whitened_conditional(ns.kernels.RBF(), arrays["X"], arrays["Z"])


@SETTINGS
@given(
    name=st.sampled_from(["variance", "lengthscale"]),
    value=st.one_of(st.floats(max_value=0.0), st.sampled_from([np.nan, np.inf])),
    kernel=st.sampled_from(["RBF", "Matern12", "Matern32", "Matern52", "Periodic"]),
)
def test_bad_hyperparameters_are_refused_by_name(name, value, kernel):
    with pytest.raises(ValueError, match=f"{name} must be positive and finite"):
        getattr(ns.kernels, kernel)(**{name: value})


@SETTINGS
@given(d=st.integers(1, 4), length=st.integers(1, 5))
def test_ard_lengthscale_length_must_match_features(d, length):
    kernel = ns.kernels.RBF(lengthscale=np.ones(length))
    X = np.zeros((3, d))
    if length == d:
        assert kernel(X).shape == (3, 3)
    else:
        with pytest.raises(
            ValueError,
            match=rf"lengthscale has shape \({length},\) but the inputs have {d} features",
        ):
            kernel(X)


Z0 = np.linspace(-2, 2, 4)[:, None]
MODEL = gaussian_model(Z0)
X_FULL = np.linspace(-3, 3, 40)[:, None]
Y_FULL = np.sin(X_FULL[:, 0])


def _elbo_loss(X, y):
    guide = ns.AutoSVGP(MODEL)
    svi = SVI(MODEL, guide, optax.adam(1e-2), ns.SVGP_ELBO())
    state = svi.init(random.PRNGKey(0), X, y)
    return float(svi.evaluate(state, X, y))


@settings(max_examples=8, deadline=None)
@given(n=st.integers(2, 40), extra=st.sampled_from([(1,), (2,), (1, 1)]))
@pytest.mark.slow
def test_y_with_a_trailing_dimension_is_refused(n, extra):
    y = np.zeros((n,) + extra)
    with pytest.raises(ValueError, match=rf"observed site 'y' has shape \({n}, "):
        _elbo_loss(X_FULL[:n], y)


@settings(max_examples=10, deadline=None)
@given(batch_x=st.integers(1, 40), batch_y=st.integers(1, 40))
@pytest.mark.slow
def test_minibatches_of_different_sizes_are_refused(batch_x, batch_y):
    X, y = X_FULL[:batch_x], Y_FULL[:batch_y]
    if batch_x == batch_y:
        assert np.isfinite(_elbo_loss(X, y))
    else:
        with pytest.raises(
            ValueError,
            match=rf"observed site 'y' has shape \({batch_y},\) "
            rf"but its distribution has shape \({batch_x},\)",
        ):
            _elbo_loss(X, y)


@settings(max_examples=15, deadline=None)
@given(i=st.integers(0, 39), bad=st.sampled_from([np.nan, np.inf, -np.inf]))
def test_nonfinite_observations_are_refused_naming_the_site(i, bad):
    y = Y_FULL.copy()
    y[i] = bad
    with pytest.raises(
        ValueError, match=rf"observed site 'y' contains NaN or inf .*first at index \({i},\)"
    ):
        _elbo_loss(X_FULL, y)


def test_empty_data_is_refused_naming_the_plate_and_the_argument():
    # numpyro's plate asserts a positive size without saying which plate or why
    with pytest.raises(
        ValueError,
        match=r"plate 'data' has size 0: the model's arguments X \(shape \(0, 1\)\), "
        r"y \(shape \(0,\)\) are empty",
    ):
        _elbo_loss(X_FULL[:0], Y_FULL[:0])
    # new inputs for a fitted guide: its plate-size check is the first run of the model
    guide = ns.AutoSVGP(MODEL)
    params = initial_params(MODEL, guide, X_FULL, Y_FULL)
    with pytest.raises(
        ValueError, match=r"plate 'data' has size 0: the model's argument X \(shape \(0, 1\)\) is"
    ):
        ns.predict_f(MODEL, guide, params, X_FULL[:0])


def test_a_plate_of_size_zero_is_refused_by_name():
    def model(X, num_groups):
        with numpyro.plate("group", num_groups, dim=-2):
            ns.svgp("f", ns.kernels.RBF(), X, Z0)

    with pytest.raises(ValueError, match=r"the model's plate 'group' has size 0\."):
        initial_params(model, ns.AutoSVGP(model), X_FULL, 0)


@pytest.mark.parametrize("dim", [None, -1, -2])
def test_a_group_plate_at_dim_minus_one_is_refused_naming_it_and_the_fix(dim):
    G, N = 3, 10

    def model(X, Y=None):
        with numpyro.plate("group", G, dim=dim):
            f = ns.svgp("f", ns.kernels.RBF(), X, Z0)
            with numpyro.plate("data", N):
                numpyro.sample("y", dist.Normal(f, 0.1), obs=Y)

    args = (X_FULL[:N], np.zeros((G, N)))
    if dim == -2:  # the fix the message gives
        assert initial_params(model, ns.AutoSVGP(model), *args)["f_whitened_auto_loc"].shape == (
            G,
            1,
            len(Z0),
        )
        return
    with pytest.raises(
        ValueError,
        match=r"svgp\('f', \.\.\.\) is inside the plate 'group' \(size 3\) at dim=-1 .*"
        r"outputs of shape \(3, 10\).*numpyro\.plate\('group', 3, dim=-2\)",
    ):
        initial_params(model, ns.AutoSVGP(model), *args)
