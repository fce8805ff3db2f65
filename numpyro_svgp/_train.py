"""``train``: SVI with guards against non-finite steps, checkpoints and a progress bar.

Steps run in compiled chunks (``lax.scan``). A step whose loss or new optimizer
state is not finite is skipped, meaning the parameters and optimizer state stay as
they were while the random key moves on, and is counted. After
``max_nonfinite_in_a_row`` such steps in a row training stops with
:class:`TrainingStopped`, which carries everything up to the last good step.
"""

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from numpyro.infer.svi import SVIState
from tqdm.auto import tqdm

from numpyro_svgp._checkpoint import load_checkpoint, save_checkpoint
from numpyro_svgp._predict import held_out_log_likelihood

__all__ = ["EpochsResult", "TrainResult", "TrainingStopped", "train", "train_epochs"]


class TrainResult(NamedTuple):
    """What :func:`train` returns."""

    params: dict
    """The constrained params (as ``svi.get_params``)."""
    state: SVIState
    """The final SVI state: pass it to ``svi.update`` to go on by hand."""
    losses: np.ndarray
    """The loss of every step; skipped steps hold their non-finite loss."""
    num_skipped: int
    """How many steps were skipped for a non-finite loss or gradient."""


class TrainingStopped(RuntimeError):
    """Training gave up after too many non-finite steps in a row; ``.result`` holds
    the :class:`TrainResult` up to the last good step."""

    def __init__(self, message: str, result: TrainResult):
        super().__init__(message)
        self.result = result


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _chunk_runner(svi, max_in_a_row: int, length: int, static_kwargs: dict):
    """A compiled function running ``length`` guarded steps; ``static_kwargs`` (sizes,
    flags) are fixed at compile time, array arguments are traced. With ``batches``
    (arrays with a leading axis of ``length``), step ``i`` gets ``batches[j][i]`` as
    its positional arguments instead of ``args``."""

    @jax.jit
    def run(state, in_a_row, skipped, args, kwargs, batches=None):
        kwargs = {**kwargs, **static_kwargs}

        def step(carry, batch):
            state, in_a_row, skipped = carry
            stopped = in_a_row >= max_in_a_row
            step_args = args if batch is None else batch
            new_state, loss = svi.update(state, *step_args, **kwargs)
            ok = jnp.isfinite(loss) & _all_finite(new_state.optim_state) & ~stopped

            def keep(new, old):
                return jnp.where(ok, new, old)

            optim_state = jax.tree.map(keep, new_state.optim_state, state.optim_state)
            mutable = jax.tree.map(keep, new_state.mutable_state, state.mutable_state)
            # the key moves on after a skipped step, so a Monte-Carlo loss is redrawn
            rng_key = jnp.where(stopped, state.rng_key, new_state.rng_key)
            in_a_row = jnp.where(stopped, in_a_row, jnp.where(ok, 0, in_a_row + 1))
            skipped = skipped + (~ok & ~stopped)
            carry = (SVIState(optim_state, mutable, rng_key), in_a_row, skipped)
            return carry, (loss, stopped)

        return lax.scan(step, (state, in_a_row, skipped), batches, length=length)

    return run


def train(
    svi,
    rng_key,
    num_steps: int,
    *args,
    max_nonfinite_in_a_row: int = 20,
    steps_per_call: int = 100,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    progress_bar: bool = True,
    **kwargs,
) -> TrainResult:
    """Run ``num_steps`` SVI steps with non-finite-step guards and optional checkpoints.

    Example::

        svi = SVI(model, ns.AutoSVGP(model), optax.adam(5e-2), ns.SVGP_ELBO())
        result = ns.train(svi, key, 5000, X, y, checkpoint="fit.ckpt", checkpoint_every=500)
        # after a crash, the same call with resume=True continues from fit.ckpt and
        # reproduces the uninterrupted run bit for bit

    :param svi: a :class:`numpyro.infer.SVI`.
    :param rng_key: the random key (as for ``svi.run``).
    :param int num_steps: total number of steps (including those of a resumed checkpoint).
    :param args: the model's arguments.
    :param int max_nonfinite_in_a_row: stop after this many consecutive skipped steps.
    :param int steps_per_call: steps compiled into one call (progress-bar granularity).
    :param checkpoint: a file to save the full state (params, optimizer state, step,
        rng key, loss history) to, atomically.
    :param int checkpoint_every: save every this many steps (and at the end); default:
        only at the end.
    :param bool resume: continue from ``checkpoint`` if the file exists.
    :param bool progress_bar: show a tqdm bar with the running loss.
    :param kwargs: the model's keyword arguments; arrays are traced, anything else
        (a batch size, a flag) is a compile-time constant.
    :return: a :class:`TrainResult`.
    :raises TrainingStopped: after ``max_nonfinite_in_a_row`` skipped steps in a row.
    """
    if num_steps < 0 or steps_per_call < 1 or max_nonfinite_in_a_row < 1:
        raise ValueError(
            "num_steps must be >= 0, steps_per_call >= 1 and max_nonfinite_in_a_row >= 1."
        )
    if checkpoint_every is not None and (checkpoint is None or checkpoint_every < 1):
        raise ValueError("checkpoint_every needs a checkpoint path and must be >= 1.")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs a checkpoint path.")

    state = svi.init(rng_key, *args, **kwargs)
    losses, step = [], 0
    if resume and os.path.exists(checkpoint):
        state, step, previous = load_checkpoint(checkpoint, like=state)
        losses = [previous]
        if step > num_steps:
            raise ValueError(f"the checkpoint is at step {step}, past num_steps={num_steps}.")
    arrays = {k: v for k, v in kwargs.items() if isinstance(v, (jax.Array, np.ndarray))}
    static_kwargs = {k: v for k, v in kwargs.items() if k not in arrays}
    in_a_row = jnp.asarray(0)
    skipped = jnp.asarray(int(np.sum(~np.isfinite(np.concatenate(losses))) if losses else 0))
    runners = {}
    every = checkpoint_every or num_steps or 1

    def result():
        history = np.concatenate(losses) if losses else np.zeros(0)
        return TrainResult(svi.get_params(state), state, history, int(skipped))

    with tqdm(total=num_steps, initial=step, disable=not progress_bar, desc="SVI") as bar:
        while step < num_steps:
            boundary = min((step // steps_per_call + 1) * steps_per_call,
                           (step // every + 1) * every, num_steps)
            length = boundary - step
            if length not in runners:
                runners[length] = _chunk_runner(svi, max_nonfinite_in_a_row, length, static_kwargs)
            (state, in_a_row, skipped), (chunk_losses, stopped) = runners[length](
                state, in_a_row, skipped, args, arrays
            )
            chunk_losses, stopped = np.asarray(chunk_losses), np.asarray(stopped)
            taken = int(np.sum(~stopped))
            losses.append(chunk_losses[:taken])
            step += taken
            bar.update(taken)
            finite = chunk_losses[:taken][np.isfinite(chunk_losses[:taken])]
            if finite.size:
                bar.set_postfix(loss=f"{finite.mean():.4g}", skipped=int(skipped))
            # a step is only ever stopped once in_a_row has reached the limit
            if int(in_a_row) >= max_nonfinite_in_a_row:
                raise TrainingStopped(
                    f"training stopped at step {step}: {max_nonfinite_in_a_row} steps in a "
                    f"row gave a non-finite loss or gradient ({int(skipped)} skipped in all). "
                    "The state is the last good one (TrainingStopped.result). Look for a "
                    "noise variance or lengthscale collapsing towards 0, inducing inputs "
                    "piling up, or float32 with a badly conditioned K_zz.",
                    result(),
                )
            if checkpoint is not None and (step % every == 0 or step == num_steps):
                save_checkpoint(checkpoint, state, step, np.concatenate(losses))
    return result()


class EpochsResult(NamedTuple):
    """What :func:`train_epochs` returns."""

    params: dict
    """The constrained params: those of the best held-out evaluation when
    ``held_out`` is given, else the last."""
    state: SVIState
    """The SVI state those params come from."""
    losses: np.ndarray
    """The loss of every step taken."""
    num_skipped: int
    """Steps skipped for a non-finite loss or gradient."""
    held_out: np.ndarray
    """``(epoch, mean held-out log-likelihood)`` rows, one per evaluation."""
    best_epoch: int
    """The epoch whose params are returned (counted from 1)."""
    stopped_early: bool
    """Whether ``patience`` ran out before ``num_epochs``."""


def _seed_from_key(rng_key) -> int:
    return int(jax.random.randint(rng_key, (), 0, np.iinfo(np.int32).max))


def train_epochs(
    svi,
    rng_key,
    num_epochs: int,
    *data,
    batch_size: int,
    held_out: tuple | None = None,
    eval_every: int = 1,
    patience: int | None = None,
    num_eval_samples: int = 100,
    drop_last: bool = True,
    max_nonfinite_in_a_row: int = 20,
    steps_per_call: int = 50,
    progress_bar: bool = True,
    **kwargs,
) -> EpochsResult:
    """SVI over shuffled epochs of host data, with optional early stopping.

    Each epoch draws a new permutation of the ``N`` rows on the host and feeds
    mini-batches of ``batch_size`` rows to ``svi.update(state, *batch, **kwargs)``;
    only ``steps_per_call`` batches are on the device at a time, so the data can be
    far larger than device memory. The model sees a batch as its positional data and
    must scale its likelihood by ``N / batch_size``, e.g. with
    ``numpyro.plate("data", num_data, subsample_size=X.shape[0])`` and
    ``num_data=N`` passed as a keyword::

        def model(X, y=None, num_data=None):
            ...
            f = ns.svgp("f", kernel, X, Z)
            with numpyro.plate("data", num_data, subsample_size=X.shape[0]):
                numpyro.sample("y", dist.Normal(f, noise), obs=y)

        result = ns.train_epochs(svi, key, 20, X, y, batch_size=1024, num_data=len(X),
                                 held_out=(X_val, y_val), patience=3)

    Steps have the guards of :func:`train` (non-finite steps skipped, at most
    ``max_nonfinite_in_a_row`` in a row). With ``held_out``, every ``eval_every``
    epochs the :func:`~numpyro_svgp.held_out_log_likelihood` of those arguments is
    computed (same key every time, so evaluations are comparable); the params of the
    best evaluation are returned, and with ``patience`` training stops after that
    many evaluations without improvement.

    :param svi: a :class:`numpyro.infer.SVI` whose guide is an :class:`~numpyro_svgp.AutoSVGP`
        (held-out evaluation samples from it).
    :param rng_key: random key for initialisation, the steps and the shuffling.
    :param int num_epochs: passes over the data.
    :param data: host arrays (NumPy) with the same leading length ``N``.
    :param int batch_size: rows per step.
    :param tuple held_out: positional model arguments of held-out data, e.g. ``(X_val, y_val)``.
    :param int eval_every: evaluate every this many epochs.
    :param int patience: stop after this many evaluations without improvement.
    :param int num_eval_samples: guide draws per held-out evaluation.
    :param bool drop_last: skip the last ``N mod batch_size`` rows of each permutation
        (they are others in the next epoch), so every step has one compiled shape.
    :param int max_nonfinite_in_a_row: as in :func:`train`.
    :param int steps_per_call: batches compiled into one call (and sent to the device
        together).
    :param bool progress_bar: a tqdm bar with the running loss and held-out score.
    :param kwargs: keyword arguments of the model, for training and evaluation;
        arrays are traced, anything else is a compile-time constant.
    :raises TrainingStopped: after ``max_nonfinite_in_a_row`` skipped steps in a row.
    """
    if not data:
        raise ValueError("train_epochs needs the data arrays, e.g. train_epochs(svi, key, 10, X, y, ...).")
    data = tuple(np.asarray(d) for d in data)
    num_data = data[0].shape[0]
    lengths = [d.shape[0] for d in data]
    if len(set(lengths)) != 1:
        raise ValueError(f"the data arrays must share their leading length, got {lengths}.")
    if not 1 <= batch_size <= num_data:
        raise ValueError(f"batch_size must be in [1, N = {num_data}], got {batch_size}.")
    if num_epochs < 0 or eval_every < 1 or steps_per_call < 1 or max_nonfinite_in_a_row < 1:
        raise ValueError(
            "num_epochs must be >= 0; eval_every, steps_per_call and max_nonfinite_in_a_row >= 1."
        )
    if patience is not None and (held_out is None or patience < 1):
        raise ValueError("patience needs held_out data and must be >= 1.")

    init_key, eval_key, shuffle_key = jax.random.split(rng_key, 3)
    shuffle = np.random.default_rng(_seed_from_key(shuffle_key))
    state = svi.init(init_key, *(jnp.asarray(d[:batch_size]) for d in data), **kwargs)
    arrays = {k: v for k, v in kwargs.items() if isinstance(v, (jax.Array, np.ndarray))}
    static_kwargs = {k: v for k, v in kwargs.items() if k not in arrays}
    full, rest = divmod(num_data, batch_size)
    steps_per_epoch = full + (0 if drop_last or rest == 0 else 1)
    in_a_row, skipped = jnp.asarray(0), jnp.asarray(0)
    runners, losses, evaluations = {}, [], []
    best = (-np.inf, 0, state)
    stopped_early = False

    def run(rows):
        nonlocal state, in_a_row, skipped
        length = rows.shape[0]
        if length not in runners:
            runners[length] = _chunk_runner(svi, max_nonfinite_in_a_row, length, static_kwargs)
        # gather on the host, then send only these batches to the device
        batches = tuple(jnp.asarray(d[rows]) for d in data)
        (state, in_a_row, skipped), (chunk_losses, stopped) = runners[length](
            state, in_a_row, skipped, (), arrays, batches
        )
        chunk_losses = np.asarray(chunk_losses)[~np.asarray(stopped)]
        losses.append(chunk_losses)
        if int(in_a_row) >= max_nonfinite_in_a_row:
            raise TrainingStopped(
                f"training stopped in epoch {epoch}: {max_nonfinite_in_a_row} steps in a row "
                f"gave a non-finite loss or gradient ({int(skipped)} skipped in all).",
                EpochsResult(svi.get_params(state), state, np.concatenate(losses),
                             int(skipped), np.asarray(evaluations).reshape(-1, 2), epoch, False),
            )
        return chunk_losses

    total = num_epochs * steps_per_epoch
    with tqdm(total=total, disable=not progress_bar, desc="SVI epochs") as bar:
        for epoch in range(1, num_epochs + 1):
            order = shuffle.permutation(num_data)
            batched = order[: full * batch_size].reshape(full, batch_size)
            for start in range(0, full, steps_per_call):
                chunk = run(batched[start : start + steps_per_call])
                bar.update(len(chunk))
                finite = chunk[np.isfinite(chunk)]
                if finite.size:
                    bar.set_postfix(epoch=epoch, loss=f"{finite.mean():.4g}",
                                    **({"held_out": f"{best[0]:.4g}"} if evaluations else {}))
            if steps_per_epoch > full:
                bar.update(len(run(order[full * batch_size :][None])))
            if held_out is not None and (epoch % eval_every == 0 or epoch == num_epochs):
                params = svi.get_params(state)
                score = float(held_out_log_likelihood(
                    svi.model, svi.guide, params, *held_out, rng_key=eval_key,
                    num_samples=num_eval_samples, **kwargs,
                ))
                evaluations.append((epoch, score))
                if score > best[0]:
                    best = (score, epoch, state)
                elif patience is not None and epoch - best[1] >= patience * eval_every:
                    stopped_early = True
                    break

    history = np.concatenate(losses) if losses else np.zeros(0)
    evaluations = np.asarray(evaluations, dtype=float).reshape(-1, 2)
    if held_out is None or not evaluations.size:
        return EpochsResult(svi.get_params(state), state, history, int(skipped),
                            evaluations, num_epochs, False)
    _, best_epoch, best_state = best
    return EpochsResult(svi.get_params(best_state), best_state, history, int(skipped),
                        evaluations, best_epoch, stopped_early)
