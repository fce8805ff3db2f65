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

__all__ = ["TrainResult", "TrainingStopped", "train"]


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
    flags) are fixed at compile time, array arguments are traced."""

    @jax.jit
    def run(state, in_a_row, skipped, args, kwargs):
        kwargs = {**kwargs, **static_kwargs}

        def step(carry, _):
            state, in_a_row, skipped = carry
            stopped = in_a_row >= max_in_a_row
            new_state, loss = svi.update(state, *args, **kwargs)
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

        return lax.scan(step, (state, in_a_row, skipped), None, length=length)

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
