"""The one training loop (``train``, ``train_epochs``) and the prediction entry points,
on the mistakes a new user makes: Python ints as model arguments, a mini-batch model
predicted without ``num_data``, NaN rows in host data, a new group under a fitted
plate, a state passed as params, and going on from an earlier result."""

import logging
import platform
import resource

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from jax import random
from numpyro.infer import SVI, Predictive
from threadpoolctl import threadpool_info, threadpool_limits

import numpyro_svgp as ns

from .helpers import gaussian_model, toy_data

X, Y = toy_data(60, seed=71)
Z0 = np.linspace(-3, 3, 7)[:, None]


def _svi(model, lr=5e-2):
    return SVI(model, ns.AutoSVGP(model), optax.adam(lr), ns.SVGP_ELBO())


def powered_model(X, y=None, power=1):
    """``power`` is a Python int the model branches on, as ``svi.run`` allows."""
    kernel = ns.kernels.RBF(
        numpyro.param("variance", 1.0, constraint=dist.constraints.positive),
        numpyro.param("lengthscale", 0.6, constraint=dist.constraints.positive),
    )
    f = ns.svgp("f", kernel, X, numpyro.param("Z", jnp.asarray(Z0)))
    if power > 1:
        f = f**power
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Normal(f, 0.2), obs=y)


@pytest.mark.slow
def test_python_int_arguments_are_constants_and_train_matches_svi_run():
    svi = _svi(powered_model)
    positional = ns.train(svi, random.PRNGKey(0), 60, X, Y, 1, progress_bar=False)
    reference = svi.run(random.PRNGKey(0), 60, X, Y, 1, progress_bar=False)
    np.testing.assert_allclose(positional.losses, reference.losses, rtol=1e-10)
    keyword = ns.train(svi, random.PRNGKey(0), 60, X, Y, power=1, progress_bar=False)
    np.testing.assert_allclose(keyword.losses, reference.losses, rtol=1e-10)
    squared = ns.train(svi, random.PRNGKey(0), 5, X, Y, 2, progress_bar=False)
    assert not np.allclose(squared.losses, positional.losses[:5])


@pytest.mark.slow
def test_a_second_call_with_the_same_svi_and_shapes_compiles_no_steps(caplog):
    svi = _svi(gaussian_model(Z0))
    ns.train(svi, random.PRNGKey(0), 20, X, Y, steps_per_call=10, progress_bar=False)
    with jax.log_compiles(True), caplog.at_level(logging.DEBUG):
        caplog.clear()
        ns.train(svi, random.PRNGKey(1), 20, X, Y, steps_per_call=10, progress_bar=False)
        # another number of steps, ending in a partial chunk, runs the same program
        other = ns.train(svi, random.PRNGKey(1), 25, X, Y, steps_per_call=10, progress_bar=False)
    assert not [r for r in caplog.records if "_run_chunk" in r.getMessage()]
    reference = svi.run(random.PRNGKey(1), 25, X, Y, progress_bar=False)
    np.testing.assert_allclose(other.losses, reference.losses, rtol=1e-10)
    for name, value in reference.params.items():
        np.testing.assert_allclose(other.params[name], value, rtol=1e-9)
    # as does train_epochs with its last chunk shorter than steps_per_call: 60 rows in
    # batches of 5 is 12 steps, chunks of 5, 5 and 2
    ns.train_epochs(
        svi, random.PRNGKey(2), 1, X, Y, batch_size=5, steps_per_call=5, progress_bar=False
    )
    with jax.log_compiles(True), caplog.at_level(logging.DEBUG):
        caplog.clear()
        epochs = ns.train_epochs(
            svi, random.PRNGKey(2), 2, X, Y, batch_size=5, steps_per_call=5, progress_bar=False
        )
    assert not [r for r in caplog.records if "_run_chunk" in r.getMessage()]
    assert epochs.losses.shape == (24,) and np.all(np.isfinite(epochs.losses))
    # a new shape is a new program, and the log shows it (so the check above can fail)
    with jax.log_compiles(True), caplog.at_level(logging.DEBUG):
        caplog.clear()
        ns.train(svi, random.PRNGKey(1), 7, X, Y, steps_per_call=7, progress_bar=False)
    assert [r for r in caplog.records if "_run_chunk" in r.getMessage()]


@pytest.mark.slow
def test_init_state_goes_on_bit_for_bit():
    svi = _svi(gaussian_model(Z0))
    whole = ns.train(svi, random.PRNGKey(3), 80, X, Y, steps_per_call=40, progress_bar=False)
    first = ns.train(svi, random.PRNGKey(3), 40, X, Y, steps_per_call=40, progress_bar=False)
    second = ns.train(
        svi, random.PRNGKey(99), 40, X, Y, init_state=first, steps_per_call=40, progress_bar=False
    )
    np.testing.assert_array_equal(np.concatenate([first.losses, second.losses]), whole.losses)
    for name in whole.params:
        np.testing.assert_array_equal(second.params[name], whole.params[name])
    also = ns.train(
        svi,
        random.PRNGKey(99),
        40,
        X,
        Y,
        init_state=first.state,
        steps_per_call=40,
        progress_bar=False,
    )
    np.testing.assert_array_equal(also.losses, second.losses)
    with pytest.raises(TypeError, match="init_state must be an SVIState"):
        ns.train(svi, random.PRNGKey(0), 5, X, Y, init_state=first.params)
    # train_epochs takes the same state
    epochs = ns.train_epochs(
        svi, random.PRNGKey(5), 1, X, Y, batch_size=20, init_state=first, progress_bar=False
    )
    assert len(epochs.losses) == 3 and epochs.losses[0] < first.losses[0]
    assert ns.EpochsResult is ns.TrainResult and isinstance(epochs, ns.TrainResult)


def test_nonfinite_host_data_is_refused_naming_the_row():
    X_big, y_big = toy_data(300, seed=72)
    y_bad = y_big.copy()
    y_bad[150] = np.nan
    svi = _svi(gaussian_model(Z0))
    with pytest.raises(
        ValueError, match=r"data\[1\] has a non-finite value \(NaN or inf\) at row 150:"
    ):
        ns.train_epochs(svi, random.PRNGKey(0), 1, X_big, y_bad, batch_size=50)
    X_bad = X_big.copy()
    X_bad[[7, 9]] = np.inf
    with pytest.raises(ValueError, match=r"data\[0\] has .* at row 7 \(2 rows in all\)"):
        ns.train_epochs(svi, random.PRNGKey(0), 1, X_bad, y_big, batch_size=50)
    with pytest.raises(ValueError, match=r"held_out\[1\] has .* at row 150"):
        ns.train_epochs(
            svi, random.PRNGKey(0), 1, X_big, y_big, batch_size=50, held_out=(X_big, y_bad)
        )
    with pytest.raises(ValueError, match="positional argument 1 of the model has .* at row 150"):
        ns.train(svi, random.PRNGKey(0), 5, X_big, y_bad)


@pytest.mark.slow
def test_resuming_says_from_which_step(tmp_path, capsys):
    svi = _svi(gaussian_model(Z0))
    path = tmp_path / "fit.ckpt"
    ns.train(svi, random.PRNGKey(0), 30, X, Y, checkpoint=path, progress_bar=False)
    capsys.readouterr()
    ns.train(svi, random.PRNGKey(0), 50, X, Y, checkpoint=path, resume=True, progress_bar=False)
    assert f"resuming from '{path}' at step 30 of 50" in capsys.readouterr().err


# --- the README's mini-batch model -----------------------------------------------------


def minibatch_model(X_batch, y_batch=None, num_data=None):
    kernel = ns.kernels.RBF(
        numpyro.param("variance", 1.0, constraint=dist.constraints.positive),
        numpyro.param("lengthscale", 0.6, constraint=dist.constraints.positive),
    )
    f = ns.svgp("f", kernel, X_batch, numpyro.param("Z", jnp.asarray(Z0)))
    noise = numpyro.param("noise", 0.2, constraint=dist.constraints.positive)
    size = X_batch.shape[0]
    with numpyro.plate("data", num_data or size, subsample_size=size):
        numpyro.sample("y", dist.Normal(f, noise), obs=y_batch)


@pytest.mark.slow
def test_a_minibatch_model_predicts_without_num_data():
    svi = _svi(minibatch_model)
    result = ns.train_epochs(
        svi, random.PRNGKey(0), 10, X, Y, batch_size=20, num_data=len(X), progress_bar=False
    )
    X_test = np.linspace(-3, 3, 11)[:, None]
    mean, var = ns.predict_f(minibatch_model, svi.guide, result.params, X_test)
    # the same params in the full-data model: the data plate plays no part in f
    full = gaussian_model(Z0)
    params = {**result.params, "noise_var": result.params["noise"] ** 2}
    mean_full, var_full = ns.predict_f(full, svi.guide, params, X_test)
    np.testing.assert_allclose(mean, mean_full, rtol=1e-12)
    np.testing.assert_allclose(var, var_full, rtol=1e-12)
    score = ns.held_out_log_likelihood(
        minibatch_model, svi.guide, result.params, X, Y, rng_key=random.PRNGKey(1), num_samples=20
    )
    assert np.isfinite(float(score))


def test_a_plate_of_size_none_is_named():
    def model(X_batch, y_batch=None, num_data=None):
        f = ns.svgp("f", ns.kernels.RBF(1.0, 0.6), X_batch, jnp.asarray(Z0))
        with numpyro.plate("data", num_data, subsample_size=X_batch.shape[0]):
            numpyro.sample("y", dist.Normal(f, 0.2), obs=y_batch)

    svi = _svi(model)
    params = svi.get_params(svi.init(random.PRNGKey(0), X, Y, num_data=len(X)))
    with pytest.raises(ValueError, match="predict_f: a numpyro.plate in the model got size None"):
        ns.predict_f(model, svi.guide, params, X)
    with pytest.raises(ValueError, match="held_out_log_likelihood: a numpyro.plate .* size None"):
        ns.held_out_log_likelihood(model, svi.guide, params, X, Y, rng_key=random.PRNGKey(0))


def test_predict_f_refuses_what_is_not_the_fitted_params():
    model = gaussian_model(Z0)
    svi = _svi(model)
    state = svi.init(random.PRNGKey(0), X, Y)
    with pytest.raises(TypeError, match="needs the fitted params as a dict .* got SVIState"):
        ns.predict_f(model, svi.guide, state, X)
    with pytest.raises(ValueError, match="got empty params"):
        ns.predict_f(model, svi.guide, {}, X)
    params = svi.get_params(state)
    partial = {k: v for k, v in params.items() if k != "lengthscale"}
    with pytest.raises(
        ValueError,
        match=r"the model has params that are not in the given params: \['lengthscale'\]",
    ):
        ns.predict_f(model, svi.guide, partial, X)
    with pytest.raises(TypeError, match="needs the fitted params as a dict"):
        ns.held_out_log_likelihood(model, svi.guide, state, X, Y, rng_key=random.PRNGKey(0))


# --- new groups --------------------------------------------------------------------------

G = 3
GROUP = np.arange(len(X)) % G
Y_GROUP = Y + np.array([-1.0, 0.0, 1.0])[GROUP]


def grouped_model(X, group, num_groups, y=None, num_new_groups=0):
    """Group offsets under a plate of ``num_groups``; the offsets of groups never seen
    come from their prior in a plate of their own."""
    tau = numpyro.param("tau", 1.0, constraint=dist.constraints.positive)
    with numpyro.plate("group", num_groups):
        offset = numpyro.sample("offset", dist.Normal(0.0, tau))
    if num_new_groups:
        with numpyro.plate("new_group", num_new_groups):
            offset = jnp.concatenate([offset, numpyro.sample("new_offset", dist.Normal(0.0, tau))])
    f = ns.svgp("f", ns.kernels.RBF(1.0, 0.6), X, jnp.asarray(Z0))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Normal(f + offset[group], 0.2), obs=y)


@pytest.mark.slow
def test_a_new_group_under_the_fitted_plate_is_refused_and_the_new_plate_pattern_works():
    svi = _svi(grouped_model)
    result = ns.train(svi, random.PRNGKey(0), 400, X, GROUP, G, Y_GROUP, progress_bar=False)
    fitted = np.asarray(svi.guide.median(result.params)["offset"])
    np.testing.assert_allclose(fitted - fitted.mean(), [-1.0, 0.0, 1.0], atol=0.15)
    # a fourth group by growing the fitted plate: its offset would be group 2's
    predictive = Predictive(grouped_model, guide=svi.guide, params=result.params, num_samples=2)
    with pytest.raises(
        ValueError,
        match="plate 'group' has size 4 in this call, but the guide was fitted with size 3",
    ):
        predictive(random.PRNGKey(1), X[:4], np.arange(4), G + 1)
    with pytest.raises(ValueError, match="plate 'group' has size 4"):
        ns.predict_f(grouped_model, svi.guide, result.params, X[:4], np.arange(4), G + 1)
    # the pattern: new groups in their own plate, drawn from the prior
    draws = Predictive(
        grouped_model,
        guide=svi.guide,
        params=result.params,
        num_samples=4000,
        return_sites=["new_offset", "y"],
    )(random.PRNGKey(3), X[:4], np.arange(4), G, num_new_groups=1)
    new = np.asarray(draws["new_offset"])[:, 0]
    tau = float(result.params["tau"])
    # within 5 standard errors: tau / sqrt(n) for the mean of n draws, and
    # tau / sqrt(2 (n - 1)) for their standard deviation (Gaussian draws)
    n = len(new)
    assert abs(float(np.mean(new))) < 5 * tau / np.sqrt(n)
    assert abs(float(np.std(new, ddof=1)) - tau) < 5 * tau / np.sqrt(2 * (n - 1))
    # the fitted groups keep their own offsets: the draws' mean of y within 5 of its
    # standard errors (estimated from the draws) of the predictive mean plus the offset
    y_old = np.asarray(draws["y"])[:, :3]
    mean, _ = ns.predict_f(grouped_model, svi.guide, result.params, X[:3], np.arange(3), G)
    se = y_old.std(axis=0, ddof=1) / np.sqrt(len(y_old))
    assert np.all(np.abs(y_old.mean(axis=0) - (np.asarray(mean) + fitted)) < 5 * se)


def _blas_threads_now():
    return sorted({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})


def test_training_holds_blas_at_one_thread_and_restores_it():
    """XLA:CPU's LAPACK runs in SciPy's OpenBLAS: ``blas_threads`` (default 1) holds its
    threads while the steps run, seen from inside the compiled step, and gives them back."""
    import scipy.linalg.cython_lapack  # noqa: F401  (loaded, so that the limits reach it)

    seen = []

    def model(X, y=None):
        jax.debug.callback(lambda: seen.append(_blas_threads_now()))
        gaussian_model(Z0)(X, y)

    svi = _svi(model)
    with threadpool_limits(limits=2, user_api="blas"):
        ns.train(svi, random.PRNGKey(0), 3, X, Y, steps_per_call=3, progress_bar=False)
        assert seen and all(s == [1] for s in seen), seen
        assert _blas_threads_now() == [2]
        seen.clear()
        ns.train(svi, random.PRNGKey(0), 3, X, Y, blas_threads=None, progress_bar=False)
        assert seen and all(s == [2] for s in seen), seen
        seen.clear()
        ns.train_epochs(svi, random.PRNGKey(0), 1, X, Y, batch_size=30, progress_bar=False)
        assert seen and all(s == [1] for s in seen), seen
        assert _blas_threads_now() == [2]
    for bad in (0, 1.5, True, "1"):
        with pytest.raises(ValueError, match=r"blas_threads must be None .* got"):
            ns.train(svi, random.PRNGKey(0), 3, X, Y, blas_threads=bad)
        with pytest.raises(ValueError, match=r"blas_threads must be None .* got"):
            ns.train_epochs(svi, random.PRNGKey(0), 1, X, Y, batch_size=30, blas_threads=bad)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc settings are glibc's")
def test_training_keeps_freed_memory_instead_of_faulting_it_in_every_step():
    # M = 300: the step's temporaries are large enough that malloc maps and unmaps them
    # each step, so every page faults anew, unless training keeps the memory it frees
    rng = np.random.default_rng(8)
    X_big = rng.uniform(-2, 2, size=(500, 3))
    y_big = np.sin(X_big[:, 0]) + 0.1 * rng.normal(size=500)
    svi = _svi(gaussian_model(X_big[:300]))
    args = (svi, random.PRNGKey(0), 10, X_big, y_big)
    ns.train(*args, steps_per_call=10, progress_bar=False)  # compiled once

    def faults(keep):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        ns.train(*args, steps_per_call=10, progress_bar=False, keep_memory=keep)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    given_back, kept = faults(False), faults(True)
    assert kept < 0.6 * given_back, (kept, given_back)
    with pytest.raises(ValueError, match="keep_memory must be True or False, got 1"):
        ns.train(*args, keep_memory=1)
