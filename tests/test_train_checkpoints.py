"""Issue 32, items 4, 7, 8 and 9: checkpoints that cannot be written or were corrupted,
``train_epochs`` with checkpoints and a plate of the batch size, keywords that are
neither the training function's nor the model's, and the "not converged" signal."""

import json
import os
import re
import shutil
import struct
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from jax import random
from numpyro.infer import SVI, Trace_ELBO

import numpyro_svgp as ns

from .helpers import gaussian_model, toy_data

X, Y = toy_data(60, seed=71)
X_VAL, Y_VAL = toy_data(40, seed=72)
Z0 = np.linspace(-3, 3, 7)[:, None]


def counted(model, calls):
    """``model`` with a host callback that counts its runs (on ``calls["rows"]`` rows
    only, if given), and raises once ``calls["crash_at"]`` is reached (a crash mid-run),
    or runs ``calls["action"]`` at ``calls["action_at"]``."""

    def tick():
        calls["n"] += 1
        if calls.get("crash_at") and calls["n"] >= calls["crash_at"]:
            raise RuntimeError("simulated crash")
        if calls.get("action_at") and calls["n"] == calls["action_at"]:
            calls["action"]()

    def wrapped(X, y=None, num_data=None):
        if X.shape[0] == calls.get("rows", X.shape[0]):  # static: batches of one size
            jax.debug.callback(tick)
        model(X, y, num_data)

    return wrapped


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


def _svi(model, lr=5e-2):
    return SVI(model, ns.AutoSVGP(model), optax.adam(lr), ns.SVGP_ELBO())


# --- item 4: a checkpoint that cannot be written, a corrupted header ---------------------


def test_a_checkpoint_that_cannot_be_written_is_refused_before_the_first_step(tmp_path):
    calls = {"n": 0}
    svi = _svi(counted(minibatch_model, calls))
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    unwritable = [a_file / "fit.ckpt", tmp_path / "missing" / "fit.ckpt", tmp_path]
    if os.path.isdir("/proc"):  # /proc takes no new files, even from root
        unwritable.append("/proc/fit.ckpt")
    # the model's runs in svi.init, before any step
    ns.train(svi, random.PRNGKey(0), 0, X, Y, progress_bar=False)
    ns.train_epochs(svi, random.PRNGKey(0), 0, X, Y, batch_size=20, num_data=60)
    init_runs, calls["n"] = calls["n"], 0
    for path in unwritable:
        named = re.escape(f"checkpoint='{path}'")
        with pytest.raises(ValueError, match=named):
            ns.train(svi, random.PRNGKey(0), 20, X, Y, checkpoint=path, progress_bar=False)
        with pytest.raises(ValueError, match=named):
            ns.train_epochs(
                svi, random.PRNGKey(0), 2, X, Y, batch_size=20, num_data=60, checkpoint=path
            )
    assert calls["n"] == init_runs * len(unwritable), (calls, init_runs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_a_save_that_fails_mid_run_warns_and_training_returns_its_result(tmp_path):
    folder = tmp_path / "disk"
    folder.mkdir()
    # the folder vanishes (an unmounted or full disk) during steps 11 to 20: the save at
    # step 10 is made, those at 20 and 30 fail
    calls = {"n": 0, "action_at": 15, "action": lambda: shutil.rmtree(folder)}
    svi = _svi(counted(minibatch_model, calls))
    args = (svi, random.PRNGKey(0), 30, X, Y)
    with pytest.warns(RuntimeWarning) as caught:
        result = ns.train(
            *args, checkpoint=folder / "fit.ckpt", checkpoint_every=10, progress_bar=False
        )
    messages = [str(w.message) for w in caught if "could not write" in str(w.message)]
    assert len(messages) == 2, messages
    assert "at step 20" in messages[0] and "it holds step 10 of this run" in messages[0]
    assert "at step 30" in messages[1]
    calls.pop("action_at")
    reference = ns.train(*args, progress_bar=False)
    np.testing.assert_array_equal(result.losses, reference.losses)
    for name in reference.params:
        np.testing.assert_array_equal(result.params[name], reference.params[name])


def _header_span(blob):
    (length,) = struct.unpack(">I", blob[8:12])
    return 12, 12 + length


def test_a_flipped_bit_in_the_header_is_refused_naming_the_file(tmp_path):
    svi = _svi(minibatch_model)
    like = svi.init(random.PRNGKey(0), X, Y)
    path = tmp_path / "fit.ckpt"
    ns.save_checkpoint(path, like, 3000, np.arange(3000.0))
    blob = path.read_bytes()
    assert ns.load_checkpoint(path, like=like)[1] == 3000
    start, end = _header_span(blob)
    at = blob.index(b'"step": 3000', start, end) + len(b'"step": ')
    bad = tmp_path / "bad.ckpt"
    # '3' (0x33) -> '2' (0x32): still valid JSON, "step": 2000
    bad.write_bytes(blob[:at] + bytes([blob[at] ^ 1]) + blob[at + 1 :])
    with pytest.raises(ns.CheckpointError, match=f"{bad} is corrupted: the header's checksum"):
        ns.load_checkpoint(bad, like=like)
    with pytest.raises(ns.CheckpointError, match=f"{bad} is corrupted"):
        ns.train(svi, random.PRNGKey(0), 4000, X, Y, checkpoint=bad, resume=True)
    # a flipped bit in the header's length
    bad.write_bytes(blob[:11] + bytes([blob[11] ^ 4]) + blob[12:])
    with pytest.raises(ns.CheckpointError, match=f"{bad} is .*corrupted"):
        ns.load_checkpoint(bad, like=like)


def test_a_version_1_checkpoint_is_read_with_a_warning(tmp_path):
    # version 1 (numpyro_svgp 0.1.0): the same layout without the header's checksum
    svi = _svi(minibatch_model)
    like = svi.init(random.PRNGKey(0), X, Y)
    path = tmp_path / "fit.ckpt"
    ns.save_checkpoint(path, like, 7, np.arange(7.0))
    blob = path.read_bytes()
    start, end = _header_span(blob)
    header = json.loads(blob[start:end])
    assert header["version"] == 2
    header["version"] = 1
    old = json.dumps(header).encode()
    old_path = tmp_path / "old.ckpt"
    old_path.write_bytes(blob[:8] + struct.pack(">I", len(old)) + old + blob[end + 32 :])
    with pytest.warns(UserWarning, match="version 1 checkpoint, whose header .* no checksum"):
        state, step, losses = ns.load_checkpoint(old_path, like=like)
    assert step == 7
    np.testing.assert_array_equal(losses, np.arange(7.0))
    leaves = zip(jax.tree.leaves(state), jax.tree.leaves(like), strict=True)
    for got, want in leaves:
        np.testing.assert_array_equal(got, want)


# --- item 7: a subsampled plate of the batch size -----------------------------------------


def test_train_epochs_refuses_a_subsampled_plate_of_the_batch_size():
    svi = _svi(minibatch_model)
    with pytest.raises(
        ValueError,
        match=r"the plate 'data' is subsampled but its size is the batch size, 20, not the "
        r"N = 60 rows .* num_data=60",
    ):
        ns.train_epochs(svi, random.PRNGKey(0), 1, X, Y, batch_size=20, progress_bar=False)
    # told N, or fed the whole data, the model is right
    ns.train_epochs(svi, random.PRNGKey(0), 1, X, Y, batch_size=20, num_data=60, progress_bar=False)
    ns.train_epochs(svi, random.PRNGKey(0), 1, X, Y, batch_size=60, progress_bar=False)
    # a full-data model fed batches: warned, its likelihood is not scaled
    with pytest.warns(UserWarning, match=r"site 'y' is in the plate 'data' of the batch size"):
        ns.train_epochs(
            _svi(gaussian_model(Z0)), random.PRNGKey(0), 1, X, Y, batch_size=20, progress_bar=False
        )

    # scaled by the model itself: nothing to say
    def scaled_model(X_batch, y_batch=None, num_data=None):
        with numpyro.handlers.scale(scale=1.0 if num_data is None else num_data / len(X_batch)):
            gaussian_model(Z0)(X_batch, y_batch)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ns.train_epochs(
            _svi(scaled_model),
            random.PRNGKey(0),
            1,
            X,
            Y,
            batch_size=20,
            num_data=60,
            progress_bar=False,
        )


# --- item 8: keywords, and train_epochs with checkpoints ----------------------------------


def test_keywords_that_are_neither_the_functions_nor_the_models_are_refused_by_name():
    svi = _svi(minibatch_model)
    with pytest.raises(
        TypeError,
        match=r"train_epochs\(\) got the keyword argument 'checkpoint_evry', which is "
        r"neither one of its own \(batch_size, .*checkpoint_every.*\) nor one the model "
        r"takes \(X_batch, y_batch, num_data\)",
    ):
        ns.train_epochs(
            svi, random.PRNGKey(0), 1, X, Y, batch_size=20, num_data=60, checkpoint_evry=5
        )
    with pytest.raises(TypeError, match=r"train\(\) got the keyword argument 'num_epochs'"):
        ns.train(svi, random.PRNGKey(0), 5, X, Y, num_epochs=3)

    # a model that takes any keyword gets them all
    seen = []

    def open_model(X, y=None, **kwargs):
        seen.append(sorted(kwargs))
        minibatch_model(X, y, kwargs.get("num_data"))

    ns.train(_svi(open_model), random.PRNGKey(0), 2, X, Y, num_data=60, progress_bar=False)
    assert seen and all(s == ["num_data"] for s in seen)


def test_train_epochs_refuses_a_checkpoint_of_another_run(tmp_path):
    svi = _svi(minibatch_model)
    like = svi.init(random.PRNGKey(0), X[:20], Y[:20], num_data=60)
    path = tmp_path / "fit.ckpt"
    ns.save_checkpoint(path, like, 3, np.ones(3))
    kwargs = dict(batch_size=20, num_data=60, checkpoint=path, resume=True, progress_bar=False)
    with pytest.raises(ns.CheckpointError, match="was not written by train_epochs"):
        ns.train_epochs(svi, random.PRNGKey(0), 2, X, Y, **kwargs)
    ns.train_epochs(svi, random.PRNGKey(0), 1, X, Y, **{**kwargs, "resume": False})
    with pytest.raises(ns.CheckpointError, match="written with batch_size=20, but this run"):
        ns.train_epochs(svi, random.PRNGKey(0), 2, X, Y, **{**kwargs, "batch_size": 15})


@pytest.mark.slow
def test_train_epochs_resumed_after_a_crash_is_bit_identical(tmp_path):
    calls = {"n": 0, "rows": 7}  # count the steps on full batches (and svi.init's runs)
    svi = _svi(counted(minibatch_model, calls), lr=0.1)
    like = svi.init(random.PRNGKey(0), X[:7], Y[:7], num_data=60)
    init_runs = calls["n"]
    # 60 rows in batches of 7: 8 full batches and one of 4 per epoch (9 steps); chunks of
    # 3 steps, checkpoints every 5 steps, so most fall mid-epoch
    kwargs = dict(
        batch_size=7,
        drop_last=False,
        steps_per_call=3,
        held_out=(X_VAL, Y_VAL),
        patience=2,
        num_eval_samples=3,
        num_data=60,
        progress_bar=False,
    )
    whole = ns.train_epochs(svi, random.PRNGKey(4), 12, X, Y, **kwargs)
    # the held-out score peaks at epoch 10, and patience runs out at 12
    assert (whole.best_epoch, whole.stopped_early, whole.losses.size) == (10, True, 108)
    # a crash in the 87th full batch, step 97 (epoch 11): the checkpoint is at step 95,
    # with the best state (epoch 10) in it, which is the one returned in the end
    path = tmp_path / "fit.ckpt"
    calls.update(n=0, crash_at=init_runs + 87)
    with pytest.raises(Exception, match="simulated crash"):
        ns.train_epochs(
            svi, random.PRNGKey(4), 12, X, Y, checkpoint=path, checkpoint_every=5, **kwargs
        )
    calls.update(n=0, crash_at=None)
    assert ns.load_checkpoint(path, like=like)[1] == 95
    resumed = ns.train_epochs(
        svi,
        random.PRNGKey(4),
        12,
        X,
        Y,
        checkpoint=path,
        checkpoint_every=5,
        resume=True,
        **kwargs,
    )
    np.testing.assert_array_equal(resumed.losses, whole.losses)
    np.testing.assert_array_equal(resumed.held_out, whole.held_out)
    assert (resumed.best_epoch, resumed.stopped_early) == (whole.best_epoch, whole.stopped_early)
    for name in whole.params:
        np.testing.assert_array_equal(resumed.params[name], whole.params[name])
    np.testing.assert_array_equal(resumed.state.rng_key, whole.state.rng_key)
    # resuming a finished run takes no step and gives the same result
    calls.update(n=0)
    again = ns.train_epochs(
        svi, random.PRNGKey(4), 12, X, Y, checkpoint=path, resume=True, **kwargs
    )
    assert calls["n"] == init_runs
    np.testing.assert_array_equal(again.losses, whole.losses)
    np.testing.assert_array_equal(again.held_out, whole.held_out)
    for name in whole.params:
        np.testing.assert_array_equal(again.params[name], whole.params[name])


# --- item 9: the loss's trend at the end -------------------------------------------------


def _quadratic(offset):
    """loss(w) = (w - 3)^2 / 2 + offset exactly (no latent sites): under SGD(eta) from
    w = 0, loss_t = 4.5 (1 - eta)^(2 t) + offset."""

    def model():
        w = numpyro.param("w", 0.0)
        numpyro.factor("quadratic", -((w - 3.0) ** 2) / 2 - offset)

    def guide():
        pass

    return model, guide


def _relative_slope(losses):
    # the reference: NumPy's least-squares line through the last quarter
    width = len(losses) // 4
    window = losses[-width:]
    slope = np.polyfit(np.arange(width), window, 1)[0]
    return slope * width / abs(window.mean())


@pytest.mark.parametrize("eta, converged", [(1e-3, False), (0.3, True)])
def test_the_result_says_whether_the_loss_had_levelled_off(eta, converged, capsys):
    model, guide = _quadratic(10.0)
    svi = SVI(model, guide, optax.sgd(eta), Trace_ELBO())
    result = ns.train(svi, random.PRNGKey(0), 400, steps_per_call=50)
    closed_form = 4.5 * (1 - eta) ** (2 * np.arange(400)) + 10.0
    np.testing.assert_allclose(result.losses, closed_form, rtol=1e-12)
    assert result.converged is converged
    reference = _relative_slope(closed_form)
    np.testing.assert_allclose(result.relative_slope, reference, rtol=1e-6, atol=1e-12)
    if not converged:
        assert reference < -10 * 1e-3  # well past the threshold
    err = capsys.readouterr().err
    assert "trend=" in err
    assert ("not converged: the loss is still falling" in err) is not converged
    assert ns.train(svi, random.PRNGKey(0), 40).converged is None  # too few steps


def test_a_flat_noisy_loss_counts_as_converged():
    # q(x) = N(0, 1) held fixed (learning rate 0) against p(x) = N(0, 2): a Monte Carlo
    # loss log 2 - 3 x^2 / 8, of mean 0.32 and standard deviation 0.53
    def model():
        numpyro.sample("x", dist.Normal(0.0, 2.0))

    def guide():
        numpyro.sample("x", dist.Normal(numpyro.param("m", 0.0), 1.0))

    svi = SVI(model, guide, optax.sgd(0.0), Trace_ELBO())
    result = ns.train(svi, random.PRNGKey(1), 800, progress_bar=False)
    assert abs(result.relative_slope) > 1e-3  # noise alone moves the fitted line
    assert result.converged is True
