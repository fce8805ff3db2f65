"""Reliability: jitter escalation, non-finite-step guards, checkpoints, reproducibility."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import optax
import pytest
from jax import random
from numpyro.infer import SVI

import numpyro_svgp as ns

from . import reference
from .helpers import gaussian_model, toy_data

X, Y = toy_data(80, seed=21)
Z0 = np.linspace(-3, 3, 8)[:, None]


def _svi(model, lr=5e-2):
    return SVI(model, ns.AutoSVGP(model), optax.adam(lr), ns.SVGP_ELBO())


# --- Cholesky --------------------------------------------------------------------------


def test_cholesky_escalates_jitter_only_when_needed_and_stays_differentiable():
    K_good = jnp.array([[2.0, 0.5], [0.5, 1.0]])
    L, used = ns.cholesky_with_jitter(K_good, 1e-6)
    assert float(used) == 1e-6
    np.testing.assert_allclose(L @ L.T, K_good + 1e-6 * np.eye(2), rtol=1e-14)

    # eigenvalues 2 + 1e-4 and -1e-4: indefinite until the jitter exceeds 1e-4
    K_bad = jnp.array([[1.0, 1.0 + 1e-4], [1.0 + 1e-4, 1.0]])
    L, used = jax.jit(lambda K: ns.cholesky_with_jitter(K, 1e-6))(K_bad)
    assert float(used) == pytest.approx(1e-3)
    np.testing.assert_allclose(L @ L.T, K_bad + 1e-3 * np.eye(2), rtol=1e-12)
    grad = jax.grad(lambda K: jnp.sum(ns.cholesky_with_jitter(K, 1e-6)[0]))(K_bad)
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("escalates", [False, True], ids=["first-try", "escalated"])
def test_cholesky_derivative_matches_finite_differences_and_jax(escalates):
    # The factor's derivative is hand-written (zero where a first try failed, so the
    # successful retry beside it in the cond keeps finite gradients). References: JAX's
    # own Cholesky derivative at the jitter used, and central finite differences.
    rng = np.random.default_rng(3)
    B = rng.normal(size=(5, 5))
    if escalates:  # rank 2 minus 1e-3 I: indefinite until the jitter reaches 1e-2
        B[:, 2:] = 0.0
    K = jnp.asarray(B @ B.T - (1e-3 if escalates else 0.0) * np.eye(5))
    W = jnp.asarray(rng.normal(size=(5, 5)))
    E = rng.normal(size=(5, 5))
    E = jnp.asarray(E + E.T)

    def objective(K):
        return jnp.sum(W * ns.cholesky_with_jitter(K, 1e-6)[0])

    used = float(jax.jit(lambda K: ns.cholesky_with_jitter(K, 1e-6)[1])(K))
    assert used == pytest.approx(1e-2 if escalates else 1e-6)
    reference = jax.grad(lambda K: jnp.sum(W * jnp.linalg.cholesky(K + used * jnp.eye(5))))(K)
    grad = jax.jit(jax.grad(objective))(K)
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(
        0.5 * (grad + grad.T), 0.5 * (reference + reference.T), rtol=1e-9, atol=1e-9
    )
    # forward mode through the same rule
    tangent = jax.jvp(objective, (K,), (E,))[1]
    h = 1e-6
    fd = (objective(K + h * E) - objective(K - h * E)) / (2 * h)
    np.testing.assert_allclose(tangent, fd, rtol=1e-6)
    np.testing.assert_allclose(jnp.sum(grad * E), tangent, rtol=1e-10)


FAMILY_FACTORS = textwrap.dedent(
    """
    import jax, jax.numpy as jnp
    import numpyro_svgp as ns
    K = jnp.broadcast_to(2.0 * jnp.eye(20), (1000, 20, 20))
    factor = jax.jit(jax.vmap(lambda K: ns.cholesky_with_jitter(K, 1e-4)))
    for _ in range(30):
        jax.block_until_ready(factor(K))
    print("factored")
    """
)


def test_a_thousand_escalating_factors_at_once_never_hang():
    """A family of 1,000 GPs factorises its K_zz with one batched Cholesky. Two batched
    LAPACK calls running at once could deadlock XLA:CPU's thread pool; the jitter
    search must never start a second one beside the first (this hung in about a third
    of the runs when it did)."""
    run = subprocess.run(
        [sys.executable, "-c", FAMILY_FACTORS], capture_output=True, text=True, timeout=90
    )
    assert run.returncode == 0 and "factored" in run.stdout, run.stderr[-2000:]


def test_cholesky_error_after_bounded_escalation_names_everything():
    K = jnp.array([[1.0, 0.0], [0.0, -10.0]])
    with pytest.raises(Exception, match=r"K_zz \+ jitter \(2x2, float64, jitter tried up to 1 I\)"):
        # waited for: on an asynchronous backend (GPU) the check's error comes with the value
        jax.block_until_ready(jax.jit(lambda K: ns.cholesky_with_jitter(K, 1e-6))(K))
    with pytest.raises(Exception, match="duplicate or near-duplicate inducing inputs Z"):
        jax.block_until_ready(ns.cholesky_with_jitter(K, 1e-6, max_escalations=2))


@pytest.mark.slow
def test_svgp_with_duplicate_inducing_inputs_trains_and_reports_its_jitter():
    # Z[0] appears three times more: K_zz is singular, and with a base jitter below
    # round-off the first factorisation fails; escalation must rescue it and say so
    Z_dup = np.concatenate([Z0[:1]] * 3 + [Z0])
    model = gaussian_model(Z_dup, jitter=1e-20)
    svi = _svi(model)
    start = svi.get_params(svi.init(random.PRNGKey(0), X, Y))
    report = ns.svgp_diagnostics(model, svi.guide, start, X, Y)
    assert report["f"]["num_inducing"] == 11
    assert 1e-20 < report["f"]["jitter"] <= 1e-20 * 10**ns.MAX_JITTER_ESCALATIONS
    # training moves the copies apart; every step on the way stays finite
    result = ns.train(svi, random.PRNGKey(0), 200, X, Y, progress_bar=False)
    assert np.all(np.isfinite(result.losses)) and result.num_skipped == 0
    assert result.losses[-1] < result.losses[0]


# --- non-finite steps -----------------------------------------------------------------


def _flaky_model(probability):
    """A Gaussian SVGP plus a factor that is NaN on a random fraction of steps."""
    base = gaussian_model(Z0)

    def model(X, y=None):
        base(X, y)
        u = jax.random.uniform(numpyro.prng_key())
        numpyro.factor("flaky", jnp.where(u < probability, jnp.nan, 0.0))

    return model


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_and_counted():
    model = _flaky_model(0.1)
    result = ns.train(_svi(model), random.PRNGKey(1), 400, X, Y, progress_bar=False)
    bad = ~np.isfinite(result.losses)
    assert result.num_skipped == int(bad.sum()) > 10
    assert all(np.all(np.isfinite(v)) for v in result.params.values())
    clean = ns.train(_svi(gaussian_model(Z0)), random.PRNGKey(1), 400, X, Y, progress_bar=False)
    # the fit still converges to the same place
    assert result.losses[np.isfinite(result.losses)][-1] == pytest.approx(
        clean.losses[-1], rel=1e-2
    )


def _nan_updates_from(step):
    """An optax transformation that turns every update from ``step`` on into NaN."""

    def update(updates, count, params=None):
        bad = count >= step
        return jax.tree.map(lambda u: jnp.where(bad, jnp.nan, u), updates), count + 1

    return optax.GradientTransformation(lambda params: jnp.zeros((), jnp.int32), update)


@pytest.mark.slow
def test_training_stops_after_too_many_nonfinite_steps_in_a_row():
    model = gaussian_model(Z0)
    optimizer = optax.chain(optax.adam(5e-2), _nan_updates_from(3))
    svi = SVI(model, ns.AutoSVGP(model), optimizer, ns.SVGP_ELBO())
    with pytest.raises(ns.TrainingStopped, match="5 steps in a row gave a non-finite loss") as info:
        ns.train(
            svi,
            random.PRNGKey(2),
            100,
            X,
            Y,
            max_nonfinite_in_a_row=5,
            steps_per_call=10,
            progress_bar=False,
        )
    result = info.value.result
    assert len(result.losses) == 3 + 5 and result.num_skipped == 5
    assert np.all(np.isfinite(result.losses[:3]))
    # the state kept is the one after the last good step
    three = ns.train(svi, random.PRNGKey(2), 3, X, Y, progress_bar=False)
    for name, value in three.params.items():
        np.testing.assert_array_equal(result.params[name], value)


# --- checkpoints ----------------------------------------------------------------------


# (steps, steps before the interruption, checkpoint interval): the cheap form runs in the
# quick suite, the long one is slow
@pytest.mark.parametrize(
    "steps, part, every", [(12, 8, 4), pytest.param(120, 80, 40, marks=pytest.mark.slow)]
)
def test_resume_from_checkpoint_is_bit_identical(tmp_path, steps, part, every):
    model = gaussian_model(Z0)
    svi = _svi(model)
    full = ns.train(
        svi,
        random.PRNGKey(3),
        steps,
        X,
        Y,
        checkpoint=tmp_path / "full.ckpt",
        checkpoint_every=every,
        progress_bar=False,
    )
    path = tmp_path / "part.ckpt"
    ns.train(
        svi,
        random.PRNGKey(3),
        part,
        X,
        Y,
        checkpoint=path,
        checkpoint_every=every,
        progress_bar=False,
    )
    resumed = ns.train(
        svi,
        random.PRNGKey(3),
        steps,
        X,
        Y,
        checkpoint=path,
        checkpoint_every=every,
        resume=True,
        progress_bar=False,
    )
    np.testing.assert_array_equal(resumed.losses, full.losses)
    for name in full.params:
        np.testing.assert_array_equal(resumed.params[name], full.params[name])
    np.testing.assert_array_equal(resumed.state.rng_key, full.state.rng_key)
    state, step, losses = ns.load_checkpoint(path, like=svi.init(random.PRNGKey(0), X, Y))
    assert step == steps and len(losses) == steps


def test_bad_checkpoints_are_refused(tmp_path):
    model = gaussian_model(Z0)
    svi = _svi(model)
    like = svi.init(random.PRNGKey(0), X, Y)
    path = tmp_path / "good.ckpt"
    ns.save_checkpoint(path, like, 0, [])
    blob = path.read_bytes()

    def refused(data, match, template=like):
        bad = tmp_path / "bad.ckpt"
        bad.write_bytes(data)
        with pytest.raises(ns.CheckpointError, match=match):
            ns.load_checkpoint(bad, like=template)

    refused(blob[: len(blob) // 2], "truncated")
    refused(blob[:-1], "truncated")
    refused(blob[:-10] + bytes(b ^ 1 for b in blob[-10:]), "checksum")
    refused(b"PK\x03\x04" + blob[4:], "not a numpyro_svgp checkpoint")
    refused(os.urandom(256), "not a numpyro_svgp checkpoint")
    other = gaussian_model(np.linspace(-3, 3, 5)[:, None])  # M = 5 instead of 8
    refused(blob, "leaf .* has shape", _svi(other).init(random.PRNGKey(0), X, Y))
    bigger = SVI(
        model, ns.AutoSVGP(model), optax.chain(optax.clip(1.0), optax.adam(1e-2)), ns.SVGP_ELBO()
    )
    refused(blob, "another structure", bigger.init(random.PRNGKey(0), X, Y))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    svi = _svi(gaussian_model(Z0))
    state = svi.init(random.PRNGKey(0), X, Y)
    path = tmp_path / "state.ckpt"
    ns.save_checkpoint(path, state, 7, [1.0] * 7)
    good = path.read_bytes()

    def crash(*_):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        ns.save_checkpoint(path, state, 8, [1.0] * 8)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.ckpt"]
    assert ns.load_checkpoint(path, like=state)[1] == 7


# --- reproducibility ------------------------------------------------------------------


REPRO = textwrap.dedent(
    """
    import hashlib, jax
    jax.config.update("jax_enable_x64", True)
    import numpy as np, optax
    from jax import random
    from numpyro.infer import SVI, TraceMeanField_ELBO
    import numpyro_svgp as ns
    from tests.helpers import gaussian_model, toy_data
    X, y = toy_data(80, seed=21)
    model = gaussian_model(np.linspace(-3, 3, 8)[:, None])
    svi = SVI(model, ns.AutoSVGP(model), optax.adam(5e-2), TraceMeanField_ELBO())
    r = ns.train(svi, random.PRNGKey(4), 150, X, y, progress_bar=False)
    print(hashlib.sha256(np.asarray(r.losses).tobytes()).hexdigest())
    """
)


@pytest.mark.slow
def test_same_seed_gives_bit_identical_losses_in_process_and_across_processes():
    model = gaussian_model(Z0)
    for elbo in (ns.SVGP_ELBO(), numpyro.infer.TraceMeanField_ELBO()):
        runs = [
            SVI(model, ns.AutoSVGP(model), optax.adam(5e-2), elbo)
            .run(random.PRNGKey(4), 150, X, Y, progress_bar=False)
            .losses
            for _ in range(2)
        ]
        np.testing.assert_array_equal(runs[0], runs[1])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digests = [
        subprocess.run(
            [sys.executable, "-c", REPRO], capture_output=True, text=True, cwd=root, check=True
        ).stdout.strip()
        for _ in range(2)
    ]
    assert len(digests[0]) == 64 and digests[0] == digests[1]
    # and a different seed gives a different Monte-Carlo trajectory
    other = SVI(model, ns.AutoSVGP(model), optax.adam(5e-2), numpyro.infer.TraceMeanField_ELBO())
    assert not np.array_equal(
        other.run(random.PRNGKey(5), 150, X, Y, progress_bar=False).losses, runs[0]
    )


def test_train_validates_its_arguments():
    svi = _svi(gaussian_model(Z0))
    with pytest.raises(ValueError, match="checkpoint_every needs a checkpoint path"):
        ns.train(svi, random.PRNGKey(0), 10, X, Y, checkpoint_every=5)
    with pytest.raises(ValueError, match="resume=True needs a checkpoint path"):
        ns.train(svi, random.PRNGKey(0), 10, X, Y, resume=True)


@pytest.mark.slow
def test_train_shows_a_progress_bar_with_the_running_loss(capsys):
    ns.train(_svi(gaussian_model(Z0)), random.PRNGKey(0), 20, X, Y, steps_per_call=10)
    err = capsys.readouterr().err
    assert "SVI" in err and "loss=" in err and "20/20" in err


@pytest.mark.parametrize("num_points", [200, 700], ids=["N<M", "N>M"])
def test_factors_above_the_solve_block_match_dense_numpy_and_jax(num_points):
    # M = 300 is above the order up to which LAPACK solves triangular systems whole, so
    # the projection and the Cholesky derivative solve by blocks (300 -> 150 -> 75).
    # References: the dense NumPy marginals of q(f), and the gradient that JAX derives
    # for the same marginals through its own Cholesky and triangular solve.
    rng = np.random.default_rng(11)
    M, D, variance, lengthscale, jitter = 300, 2, 1.3, 0.4, 1e-6
    X = rng.uniform(-3, 3, size=(num_points, D))
    Z = rng.uniform(-3, 3, size=(M, D))
    m = rng.normal(size=M)
    S = np.tril(0.1 * rng.normal(size=(M, M)), -1) + np.diag(rng.uniform(0.3, 1.0, M))
    W = rng.normal(size=num_points)

    def marginals(Z, m, S):
        kernel = ns.kernels.RBF(variance, lengthscale)
        conditional = ns.whitened_conditional(kernel, X, Z, jitter=jitter)
        return ns.predictive_moments(conditional, m, S)

    mean, var = jax.jit(marginals)(Z, m, S)
    want_mean, want_var, _, _ = reference.whitened_svgp_marginals(
        X, Z, variance, lengthscale, m, S, jitter
    )
    np.testing.assert_allclose(mean, want_mean, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(var, want_var, rtol=1e-7, atol=1e-9)

    def plain(Z, m, S):
        K_zz = ns.kernels.RBF(variance, lengthscale)(Z) + jitter * jnp.eye(M)
        L = jnp.linalg.cholesky(K_zz)
        A = jax.scipy.linalg.solve_triangular(
            L, ns.kernels.RBF(variance, lengthscale)(X, Z).T, lower=True
        ).T
        return A @ m, variance - jnp.sum(A**2, 1) + jnp.sum((A @ S) ** 2, 1)

    def objective(f):
        return lambda *a: sum(jnp.sum(W * out) for out in f(*a))

    got = jax.jit(jax.grad(objective(marginals), argnums=(0, 1, 2)))(Z, m, S)
    want = jax.jit(jax.grad(objective(plain), argnums=(0, 1, 2)))(Z, m, S)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-8 * np.max(np.abs(w)))


def test_a_factor_by_blocks_escalates_its_jitter_as_a_whole_factor_does():
    # M = 300 is factorised by blocks; a matrix that is indefinite until the jitter
    # reaches 1e-2 (rank 5, minus 2e-3 I) must still escalate to exactly that jitter
    B = np.random.default_rng(12).normal(size=(300, 5))
    K = B @ B.T - 2e-3 * np.eye(300)
    L, used = jax.jit(lambda K: ns.cholesky_with_jitter(K, 1e-6))(K)
    assert float(used) == pytest.approx(1e-2)
    np.testing.assert_allclose(L, np.linalg.cholesky(K + 1e-2 * np.eye(300)), rtol=1e-8, atol=1e-12)
    assert np.all(np.triu(np.asarray(L), 1) == 0.0)
