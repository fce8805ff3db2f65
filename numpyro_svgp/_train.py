"""One training loop: SVI steps in compiled chunks, guarded against non-finite steps.

:func:`train` feeds every step the same arguments (the data on the device, or a
model that subsamples itself); :func:`train_epochs` feeds shuffled mini-batches of
host arrays. Both run the same loop: steps run in compiled chunks (``lax.scan``);
a step whose loss or new optimizer state is not finite is skipped, meaning the
parameters and optimizer state stay as they were while the random key moves on,
and is counted. After ``max_nonfinite_in_a_row`` such steps in a row training stops
with :class:`TrainingStopped`, which carries everything up to the last good step.
Every result says whether the loss had levelled off at the end (``converged``, from the
least-squares slope of the last quarter of the losses, ``relative_slope``).

The compiled chunk is a module-level ``jax.jit`` whose static arguments are the
``SVI`` object, the chunk length and the non-array model arguments, so a second call
with the same ``svi`` and shapes reuses the compiled code instead of compiling again.
"""

import contextlib
import ctypes
import functools
import inspect
import os
import platform
import sys
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from numpyro import handlers
from numpyro.infer.svi import SVIState
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from numpyro_svgp._checkpoint import (
    CheckpointError,
    check_writable,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from numpyro_svgp._predict import held_out_log_likelihood

__all__ = ["EpochsResult", "TrainResult", "TrainingStopped", "train", "train_epochs"]

_NO_EVALUATIONS = np.zeros((0, 2))
_NO_EVALUATIONS.setflags(write=False)


class TrainResult(NamedTuple):
    """What :func:`train` and :func:`train_epochs` return."""

    params: dict
    """The constrained params (as ``svi.get_params``): with held-out evaluations,
    those of the best one, else the last."""
    state: SVIState
    """The SVI state those params come from: pass it as ``init_state`` to go on."""
    losses: np.ndarray
    """The loss of every step taken; skipped steps hold their non-finite loss."""
    num_skipped: int
    """How many steps were skipped for a non-finite loss or gradient."""
    held_out: np.ndarray = _NO_EVALUATIONS
    """``(epoch, mean held-out log-likelihood)`` rows, one per evaluation
    (:func:`train_epochs` with ``held_out``)."""
    best_epoch: int | None = None
    """The epoch whose params are returned, counted from 1 (:func:`train_epochs`)."""
    stopped_early: bool = False
    """Whether ``patience`` ran out before ``num_epochs``."""
    converged: bool | None = None
    """``False`` when the loss was still moving at the end: the straight line fitted to
    the last quarter of the losses changes by more than 0.1% of their mean over that
    stretch (``|relative_slope| > 1e-3``), and its slope is more than three standard
    errors from zero, so that the noise of a Monte Carlo or mini-batch loss does not
    count. ``None`` with fewer than 80 losses."""
    relative_slope: float = float("nan")
    r"""The change of the loss over the last quarter of the steps, by the least-squares
    line through those losses, relative to their mean absolute value:
    :math:`\hat\beta\, w / |\bar\ell|` for a window of :math:`w` steps. Negative: still
    falling; about ``-0.01`` means 1% lower per quarter of the run, so more steps pay."""


EpochsResult = TrainResult
"""The result of :func:`train_epochs`: the same type as :class:`TrainResult`."""


# the loss's trend at the end: the last quarter of the steps, at least this many of them
_TREND_SHARE, _TREND_MIN_STEPS = 0.25, 20
# a relative change over that stretch above this, and this many standard errors from zero
_TREND_TOLERANCE, _TREND_STANDARD_ERRORS = 1e-3, 3.0


def _trend(losses: np.ndarray) -> tuple[bool | None, float]:
    """``(converged, relative_slope)`` of a loss history (see :class:`TrainResult`)."""
    width = int(losses.size * _TREND_SHARE)
    if width < _TREND_MIN_STEPS:
        return None, float("nan")
    window = np.asarray(losses[-width:], dtype=np.float64)
    finite = np.isfinite(window)
    if finite.sum() < _TREND_MIN_STEPS // 2:
        return None, float("nan")
    t = np.arange(width, dtype=np.float64)[finite]
    y = window[finite]
    t = t - t.mean()
    centred = y - y.mean()
    spread = float(t @ t)
    slope = float(t @ centred) / spread
    residual = centred - slope * t
    standard_error = np.sqrt(float(residual @ residual) / max(y.size - 2, 1) / spread)
    relative = slope * width / max(abs(float(y.mean())), np.finfo(np.float64).tiny)
    moving = (
        abs(relative) > _TREND_TOLERANCE and abs(slope) > _TREND_STANDARD_ERRORS * standard_error
    )
    return not moving, relative


def _report_trend(result: "TrainResult", progress_bar: bool) -> None:
    """A line under the progress bar when the loss had not levelled off."""
    if not progress_bar or result.converged is not False:
        return
    width = int(result.losses.size * _TREND_SHARE)
    where = "still falling" if result.relative_slope < 0 else "rising"
    tqdm.write(
        f"not converged: the loss is {where} ({100 * result.relative_slope:+.2g}% over the "
        f"last {width} steps, result.relative_slope); train on with init_state=result.",
        file=sys.stderr,
    )


class TrainingStopped(RuntimeError):
    """Training gave up after too many non-finite steps in a row; ``.result`` holds
    the :class:`TrainResult` up to the last good step."""

    def __init__(self, message: str, result: TrainResult):
        super().__init__(message)
        self.result = result


# --- arguments: arrays are traced, everything else is a compile-time constant --------


class _Traced:
    """Marks a traced leaf in the static description of the model's arguments."""

    def __repr__(self):
        return "<traced>"


_TRACED = _Traced()


class _ByIdentity:
    """An unhashable constant argument, compared by identity: the same object reuses
    the compiled chunk, another one compiles anew."""

    def __init__(self, value):
        self.value = value

    def __hash__(self):
        return id(self.value)

    def __eq__(self, other):
        return isinstance(other, _ByIdentity) and other.value is self.value


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


def _split_arguments(args: tuple, kwargs: dict):
    """``(traced leaves, static description)`` of the model's arguments: array leaves
    are traced, other leaves (a Python int, a flag, a name) are fixed at compile time,
    as ``svi.run`` fixes them."""
    leaves, treedef = jax.tree.flatten((args, kwargs))
    traced = [x if _is_array(x) else None for x in leaves]
    static = []
    for x in leaves:
        if _is_array(x):
            static.append(_TRACED)
            continue
        try:
            hash(x)
        except TypeError:
            x = _ByIdentity(x)
        static.append(x)
    return traced, (treedef, tuple(static))


def _join_arguments(traced, spec):
    treedef, static = spec
    leaves = [
        t if s is _TRACED else (s.value if isinstance(s, _ByIdentity) else s)
        for t, s in zip(traced, static, strict=True)
    ]
    return jax.tree.unflatten(treedef, leaves)


def _check_finite(array, what: str) -> None:
    """Refuse a floating array with NaN or inf, naming the first bad row."""
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.inexact) or np.all(np.isfinite(array)):
        return
    bad = ~np.isfinite(array.reshape(array.shape[0], -1) if array.ndim else array[None])
    row = int(np.flatnonzero(bad.any(axis=1))[0])
    count = int(bad.any(axis=1).sum())
    raise ValueError(
        f"{what} has a non-finite value (NaN or inf) at row {row}"
        + (f" ({count} rows in all)" if count > 1 else "")
        + ": drop or impute those rows before training."
    )


def _all_finite(tree) -> jax.Array:
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


@functools.partial(jax.jit, static_argnames=("svi", "max_in_a_row", "length", "spec"))
def _run_chunk(
    state, in_a_row, skipped, traced, batches, active, *, svi, max_in_a_row, length, spec
):
    """Up to ``length`` guarded steps; only the first ``active`` (traced) are taken, so
    one compiled chunk serves runs of any number of steps. With ``batches`` (arrays with
    a leading axis of ``length``), step ``i`` gets ``batches[j][i]`` as the model's
    positional arguments in front of the fixed ones."""
    args, kwargs = _join_arguments(traced, spec)

    @jax.jit  # so that asking for its output's dtype and then calling it trace it once
    def take(carry, batch):
        state, in_a_row, skipped = carry
        new_state, loss = svi.update(state, *(args if batch is None else (*batch, *args)), **kwargs)
        ok = jnp.isfinite(loss) & _all_finite(new_state.optim_state)

        def keep(new, old):
            return jnp.where(ok, new, old)

        optim_state = jax.tree.map(keep, new_state.optim_state, state.optim_state)
        mutable = jax.tree.map(keep, new_state.mutable_state, state.mutable_state)
        # the key moves on after a skipped step, so a Monte-Carlo loss is redrawn
        state = SVIState(optim_state, mutable, new_state.rng_key)
        return (state, jnp.where(ok, 0, in_a_row + 1), skipped + ~ok), loss

    def step(carry, xs):
        index, batch = xs
        # past the run's end, or stopped: no work at all (a cond runs one branch)
        stopped = (carry[1] >= max_in_a_row) | (index >= active)
        # the branch that skips a step returns a NaN loss of the step's dtype
        no_loss = jnp.full((), jnp.nan, take.eval_shape(carry, batch)[1].dtype)
        carry, loss = lax.cond(stopped, lambda c, b: (c, no_loss), take, carry, batch)
        return carry, (loss, stopped)

    return lax.scan(step, (state, in_a_row, skipped), (jnp.arange(length), batches), length=length)


class _Loop:
    """One training run: the SVI state, the guard counters and the loss history."""

    def __init__(self, svi, state, max_in_a_row: int, args: tuple, kwargs: dict, losses=()):
        self.svi, self.state, self.max_in_a_row = svi, state, max_in_a_row
        self.traced, self.spec = _split_arguments(args, kwargs)
        self.losses = [np.asarray(x) for x in losses]
        previous = np.concatenate(self.losses) if self.losses else np.zeros(0)
        self.in_a_row = jnp.asarray(0)
        self.skipped = jnp.asarray(int(np.sum(~np.isfinite(previous))))
        self.step = previous.size
        self.trend, self.trend_at = float("nan"), 0

    def run(self, length: int, steps: int, batches=None) -> np.ndarray:
        """Run ``steps <= length`` steps in the compiled chunk of ``length`` (the
        same program for any ``steps``); return the losses of those taken."""
        (self.state, self.in_a_row, self.skipped), (losses, stopped) = _run_chunk(
            self.state,
            self.in_a_row,
            self.skipped,
            self.traced,
            batches,
            jnp.asarray(steps),
            svi=self.svi,
            max_in_a_row=self.max_in_a_row,
            length=length,
            spec=self.spec,
        )
        losses = np.asarray(losses)[~np.asarray(stopped)]
        self.losses.append(losses)
        self.step += losses.size
        return losses

    def history(self) -> np.ndarray:
        return np.concatenate(self.losses) if self.losses else np.zeros(0)

    def result(self, state=None, **extra) -> TrainResult:
        state = self.state if state is None else state
        losses = self.history()
        converged, relative_slope = _trend(losses)
        return TrainResult(
            self.svi.get_params(state),
            state,
            losses,
            int(self.skipped),
            **extra,
            converged=converged,
            relative_slope=relative_slope,
        )

    def raise_if_stopped(self, where: str = "", **extra) -> None:
        # a step is only ever stopped once in_a_row has reached the limit
        if int(self.in_a_row) >= self.max_in_a_row:
            raise TrainingStopped(
                f"training stopped at step {self.step}{where}: {self.max_in_a_row} steps in a "
                f"row gave a non-finite loss or gradient ({int(self.skipped)} skipped in all). "
                "The state is the last good one (TrainingStopped.result). Look for a "
                "noise variance or lengthscale collapsing towards 0, inducing inputs "
                "piling up, or float32 with a badly conditioned K_zz.",
                self.result(**extra),
            )

    def show(self, bar, losses, **postfix) -> None:
        bar.update(losses.size)
        finite = losses[np.isfinite(losses)]
        if finite.size and not bar.disable:
            # the trend reads the whole history: refreshed when it has grown by 2%, so
            # that short chunks do not make the bar's cost quadratic in the steps
            if self.step >= self.trend_at:
                self.trend = _trend(self.history())[1]
                self.trend_at = self.step + self.step // 50
            trend = {} if np.isnan(self.trend) else {"trend": f"{self.trend:+.1e}"}
            bar.set_postfix(
                loss=f"{finite.mean():.4g}", skipped=int(self.skipped), **trend, **postfix
            )


class _Checkpoints:
    """Saves to ``path``; a failed save warns and training goes on."""

    def __init__(self, path):
        self.path = path
        self.last: int | None = None

    def save(self, loop: "_Loop", **more) -> None:
        try:
            save_checkpoint(self.path, loop.state, loop.step, loop.history(), **more)
        except OSError as err:
            held = (
                f"it holds step {self.last} of this run"
                if self.last is not None
                else "none was written in this run"
            )
            warnings.warn(
                f"could not write the checkpoint {os.fspath(self.path)!r} at step {loop.step} "
                f"({err}); training goes on and returns its result, but {held}.",
                RuntimeWarning,
                stacklevel=3,
            )
        else:
            self.last = loop.step


def _initial_state(svi, rng_key, init_state, args, kwargs) -> SVIState:
    if init_state is None:
        return svi.init(rng_key, *args, **kwargs)
    if isinstance(init_state, TrainResult):
        return init_state.state
    if not isinstance(init_state, SVIState):
        raise TypeError(
            f"init_state must be an SVIState (e.g. result.state) or a TrainResult, "
            f"got {type(init_state).__name__}."
        )
    return init_state


@contextlib.contextmanager
def _blas_threads(n: int | None):
    """Hold the BLAS libraries of this process at ``n`` threads (``None``: as they are).

    XLA:CPU runs its LAPACK calls (Cholesky, triangular solves) through SciPy's
    OpenBLAS, whose threads then compete with XLA's own thread pool for the same cores,
    and spin while they wait, which costs most when another process is busy too.
    """
    if n is None:
        yield
        return
    # the limit reaches only libraries already loaded: load the one XLA:CPU calls
    import scipy.linalg.cython_lapack  # noqa: F401

    with threadpool_limits(limits=n, user_api="blas"):
        yield


# glibc's mallopt parameters (malloc.h) and their defaults
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


@contextlib.contextmanager
def _kept_memory(keep: bool):
    """While training, glibc's malloc serves every allocation from its heap and keeps
    what is freed there (``mallopt``), instead of mapping large blocks afresh.

    XLA:CPU allocates a step's temporaries anew at every call; blocks larger than
    malloc's mmap threshold (at most 32 MB) are mapped and unmapped each time, and each
    new page then faults and is zeroed by the kernel, every step. On return both settings
    go back to glibc's defaults (a value set by the user before is not read back: glibc
    offers no way to), and the memory kept is given back (``malloc_trim``). Not glibc:
    nothing is done.
    """
    if not keep or platform.libc_ver()[0] != "glibc":
        yield
        return
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)


@contextlib.contextmanager
def _process_settings(blas_threads: int | None, keep_memory: bool):
    """The process settings :func:`train` holds while it trains."""
    with _blas_threads(blas_threads), _kept_memory(keep_memory):
        yield


def _check_run_options(checkpoint, checkpoint_every, resume, init_state) -> None:
    """The checkpoint and warm-start options that ``train`` and ``train_epochs`` share."""
    if checkpoint_every is not None and (checkpoint is None or checkpoint_every < 1):
        raise ValueError("checkpoint_every needs a checkpoint path and must be >= 1.")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs a checkpoint path.")
    if resume and init_state is not None:
        raise ValueError("give init_state or resume=True, not both.")


def _check_process_settings(blas_threads, keep_memory) -> None:
    n = blas_threads
    if n is not None and (not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1):
        raise ValueError(
            f"blas_threads must be None (leave BLAS's threads as they are) or an "
            f"integer >= 1, got {n!r}."
        )
    if not isinstance(keep_memory, bool):
        raise ValueError(f"keep_memory must be True or False, got {keep_memory!r}.")


def _check_counts(**counts) -> None:
    for name, (value, least) in counts.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}.")


def _own_keywords(function) -> list[str]:
    return [
        p.name for p in inspect.signature(function).parameters.values() if p.kind is p.KEYWORD_ONLY
    ]


def _check_model_keywords(svi, kwargs: dict, function) -> None:
    """Refuse a keyword that is neither the training function's nor the model's: it
    would reach the model and fail inside it (or be taken for a model argument)."""
    if not kwargs:
        return
    try:
        parameters = inspect.signature(svi.model).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a C callable): the model says
        return
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return
    accepted = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for name in kwargs:
        if name not in accepted:
            raise TypeError(
                f"{function.__name__}() got the keyword argument {name!r}, which is neither "
                f"one of its own ({', '.join(_own_keywords(function))}) nor one the model "
                f"takes ({', '.join(accepted) or 'none'}); other keywords are passed to "
                "the model."
            )


def train(
    svi,
    rng_key,
    num_steps: int,
    *args,
    init_state: SVIState | TrainResult | None = None,
    max_nonfinite_in_a_row: int = 20,
    steps_per_call: int = 100,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    progress_bar: bool = True,
    blas_threads: int | None = 1,
    keep_memory: bool = True,
    **kwargs,
) -> TrainResult:
    """Run ``num_steps`` SVI steps with non-finite-step guards and optional checkpoints.

    Example::

        svi = SVI(model, ns.AutoSVGP(model), optax.adam(5e-2), ns.SVGP_ELBO())
        result = ns.train(svi, key, 5000, X, y, checkpoint="fit.ckpt", checkpoint_every=500)
        # after a crash, the same call with resume=True continues from fit.ckpt and
        # reproduces the uninterrupted run bit for bit
        more = ns.train(svi, key, 1000, X, y, init_state=result)   # 1000 steps more

    A second call with the same ``svi`` and argument shapes reuses the compiled steps.

    :param svi: a :class:`numpyro.infer.SVI`.
    :param rng_key: the random key (as for ``svi.run``); unused with ``init_state``.
    :param int num_steps: number of steps; with ``resume``, the total including those
        of the checkpoint.
    :param args: the model's arguments; arrays are traced, anything else (a Python
        int, a flag) is a compile-time constant, as in ``svi.run``.
    :param init_state: go on from this state (an ``SVIState``, or the
        :class:`TrainResult` of an earlier call) instead of ``svi.init``.
    :param int max_nonfinite_in_a_row: stop after this many consecutive skipped steps.
    :param int steps_per_call: steps compiled into one call (progress-bar granularity).
    :param checkpoint: a file to save the full state (params, optimizer state, step,
        rng key, loss history) to, atomically. A trial write before the first step
        refuses a folder that cannot hold it; a save that fails later (a full disk)
        warns, and training goes on.
    :param int checkpoint_every: save every this many steps (and at the end); default:
        only at the end.
    :param bool resume: continue from ``checkpoint`` if the file exists.
    :param bool progress_bar: show a tqdm bar with the running loss.
    :param blas_threads: threads of the BLAS libraries (SciPy's and NumPy's OpenBLAS)
        while training; ``None`` leaves them as they are. XLA:CPU's LAPACK calls run in
        SciPy's OpenBLAS, whose threads compete with XLA's, so the default is one. The
        setting is restored on return.
    :param bool keep_memory: on glibc (Linux), keep the memory that the steps free for
        the next steps instead of returning it to the system and mapping it again, which
        costs a page fault per page per step for temporaries above malloc's mmap
        threshold (32 MB at most, e.g. the backward pass at M = 1024). Given back on
        return.
    :param kwargs: the model's keyword arguments, split as ``args`` are; a keyword the
        model does not take is refused by name.
    :return: a :class:`TrainResult`; ``converged`` and ``relative_slope`` say whether
        the loss had levelled off (also shown on the progress bar, as ``trend``, with a
        line at the end when it had not).
    :raises TrainingStopped: after ``max_nonfinite_in_a_row`` skipped steps in a row.
    """
    _check_counts(
        num_steps=(num_steps, 0),
        steps_per_call=(steps_per_call, 1),
        max_nonfinite_in_a_row=(max_nonfinite_in_a_row, 1),
    )
    _check_run_options(checkpoint, checkpoint_every, resume, init_state)
    _check_process_settings(blas_threads, keep_memory)
    _check_model_keywords(svi, kwargs, train)
    for i, a in enumerate(args):
        if _is_array(a) and np.ndim(a):
            _check_finite(a, f"positional argument {i} of the model")
    for k, a in kwargs.items():
        if _is_array(a) and np.ndim(a):
            _check_finite(a, f"keyword argument {k!r} of the model")

    with _process_settings(blas_threads, keep_memory):
        state = _initial_state(svi, rng_key, init_state, args, kwargs)
        losses = []
        if resume and checkpoint is not None and os.path.exists(checkpoint):
            state, step, previous = load_checkpoint(checkpoint, like=state)
            if step > num_steps:
                raise ValueError(f"the checkpoint is at step {step}, past num_steps={num_steps}.")
            print(
                f"resuming from {os.fspath(checkpoint)!r} at step {step} of {num_steps}",
                file=sys.stderr,
            )
            losses = [previous]
        loop = _Loop(svi, state, max_nonfinite_in_a_row, args, kwargs, losses)
        checkpoints = None
        if checkpoint is not None:
            check_writable(checkpoint, loop.state, loop.step, loop.history())
            checkpoints = _Checkpoints(checkpoint)
        every = checkpoint_every or num_steps or 1
        # one chunk length whatever num_steps is, so that runs of other lengths reuse it
        length = min(steps_per_call, checkpoint_every or steps_per_call)

        with tqdm(total=num_steps, initial=loop.step, disable=not progress_bar, desc="SVI") as bar:
            while loop.step < num_steps:
                step = loop.step
                boundary = min(
                    (step // steps_per_call + 1) * steps_per_call,
                    (step // every + 1) * every,
                    num_steps,
                )
                loop.show(bar, loop.run(length, boundary - step))
                loop.raise_if_stopped()
                if checkpoints is not None and (loop.step % every == 0 or loop.step == num_steps):
                    checkpoints.save(loop)
        result = loop.result()
    _report_trend(result, progress_bar)
    return result


def _seed_from_key(rng_key) -> int:
    return int(jax.random.randint(rng_key, (), 0, np.iinfo(np.int32).max))


def _is_one(scale) -> bool:
    """Whether a site's scale leaves its log-likelihood as it is: ``None`` or one. A
    scale the model computes from traced values cannot be read and is taken as set."""
    if scale is None:
        return True
    try:
        return bool(jnp.all(jnp.asarray(scale) == 1))
    except jax.errors.ConcretizationTypeError:
        return False


def _check_batch_plates(model, batch: tuple, kwargs: dict, batch_size: int, num_data: int):
    """Refuse an observed site whose plate has the batch size as its full size and which
    is not scaled up (the model was not told ``N``, so its ELBO is one batch's) when
    the plate is subsampled; warn when it is not (a full-data model fed batches)."""
    if batch_size == num_data:
        return
    plates: dict[str, tuple] = {}
    unscaled: list[tuple[str, str]] = []

    def record(*batch):
        trace = handlers.trace(handlers.seed(model, rng_seed=0)).get_trace(*batch, **kwargs)
        plates.update(
            (name, site["args"]) for name, site in trace.items() if site["type"] == "plate"
        )
        for name, site in trace.items():
            if site["type"] != "sample" or not site.get("is_observed"):
                continue
            if not _is_one(site.get("scale")):
                continue
            unscaled.extend(
                (frame.name, name)
                for frame in site["cond_indep_stack"]
                if plates.get(frame.name, (None,))[0] == batch_size
            )
        return 0

    jax.eval_shape(record, *batch)  # shapes only: the plates' sizes are Python ints
    for plate, _ in unscaled:
        if plates[plate][1] is not None:
            raise ValueError(
                f"train_epochs: the plate {plate!r} is subsampled but its size is the batch "
                f"size, {batch_size}, not the N = {num_data} rows of the data, so the ELBO "
                f"would be one batch's and the posterior too wide. Give the model N, e.g. "
                f"num_data={num_data} for a plate of size `num_data or size`."
            )
    for plate, site in unscaled[:1]:
        warnings.warn(
            f"train_epochs: the observed site {site!r} is in the plate {plate!r} of the "
            f"batch size, {batch_size}, and is not scaled by N / batch_size = {num_data} / "
            f"{batch_size}, so the ELBO is one batch's. Use numpyro.plate({plate!r}, N, "
            "subsample_size=batch_size) with N the number of rows.",
            stacklevel=3,
        )


def _epochs_facts(num_data, batch_size, steps_per_epoch) -> dict:
    return {
        "loop": "train_epochs",
        "num_data": int(num_data),
        "batch_size": int(batch_size),
        "steps_per_epoch": int(steps_per_epoch),
    }


def train_epochs(
    svi,
    rng_key,
    num_epochs: int,
    *data,
    batch_size: int,
    init_state: SVIState | TrainResult | None = None,
    held_out: tuple | None = None,
    eval_every: int = 1,
    patience: int | None = None,
    num_eval_samples: int = 100,
    drop_last: bool = True,
    max_nonfinite_in_a_row: int = 20,
    steps_per_call: int = 50,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    progress_bar: bool = True,
    blas_threads: int | None = 1,
    keep_memory: bool = True,
    **kwargs,
) -> TrainResult:
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
            with numpyro.plate("data", num_data or X.shape[0], subsample_size=X.shape[0]):
                numpyro.sample("y", dist.Normal(f, noise), obs=y)

        result = ns.train_epochs(svi, key, 20, X, y, batch_size=1024, num_data=len(X),
                                 held_out=(X_val, y_val), patience=3)

    An observed site left unscaled in a plate whose size is the batch size is refused if
    the plate is subsampled (``num_data`` forgotten) and warned of if not: in both the
    ELBO would be one batch's. (A model may scale the site itself, with
    ``numpyro.handlers.scale``.)

    Steps run in the loop of :func:`train` (non-finite steps skipped, at most
    ``max_nonfinite_in_a_row`` in a row). With ``held_out``, every ``eval_every``
    epochs the :func:`~numpyro_svgp.held_out_log_likelihood` of those arguments is
    computed (same key every time, so evaluations are comparable); the params of the
    best evaluation are returned, and with ``patience`` training stops after that
    many evaluations without improvement.

    :param svi: a :class:`numpyro.infer.SVI` whose guide can ``sample_posterior``
        (e.g. an :class:`~numpyro_svgp.AutoSVGP`) when ``held_out`` is given.
    :param rng_key: random key for initialisation, the steps and the shuffling.
    :param int num_epochs: passes over the data; with ``resume``, the total including
        those of the checkpoint.
    :param data: host arrays (NumPy) with the same leading length ``N``; checked once
        for NaN and inf.
    :param int batch_size: rows per step.
    :param init_state: go on from this state (an ``SVIState``, or an earlier
        :class:`TrainResult`) instead of ``svi.init``.
    :param tuple held_out: positional model arguments of held-out data, e.g. ``(X_val, y_val)``.
    :param int eval_every: evaluate every this many epochs.
    :param int patience: stop after this many evaluations without improvement.
    :param int num_eval_samples: guide draws per held-out evaluation.
    :param bool drop_last: skip the last ``N mod batch_size`` rows of each permutation
        (they are others in the next epoch), so every step has one compiled shape.
    :param int max_nonfinite_in_a_row: as in :func:`train`.
    :param int steps_per_call: batches compiled into one call (and sent to the device
        together).
    :param checkpoint: as in :func:`train`; the file also keeps the shuffling's state,
        the held-out evaluations and the best state so far, so that a resumed run takes
        the same batches, evaluations and early-stopping decisions as one that was not
        interrupted, bit for bit.
    :param int checkpoint_every: save every this many steps (mid-epoch too), at the end
        and on stopping early; default: at the end only.
    :param bool resume: continue from ``checkpoint`` if the file exists; it must come
        from ``train_epochs`` with the same ``N`` and batches per epoch, and the same
        ``rng_key`` and data should be given.
    :param bool progress_bar: a tqdm bar with the running loss, its ``trend`` (as in
        :func:`train`) and the held-out score.
    :param blas_threads: as in :func:`train`.
    :param bool keep_memory: as in :func:`train`.
    :param kwargs: keyword arguments of the model, for training and evaluation;
        arrays are traced, anything else is a compile-time constant. A keyword the model
        does not take is refused by name.
    :return: a :class:`TrainResult` with ``held_out``, ``best_epoch`` and
        ``stopped_early``, and ``converged`` as in :func:`train`.
    :raises TrainingStopped: after ``max_nonfinite_in_a_row`` skipped steps in a row.
    """
    if not data:
        raise ValueError(
            "train_epochs needs the data arrays, e.g. train_epochs(svi, key, 10, X, y, ...)."
        )
    data = tuple(np.asarray(d) for d in data)
    for i, d in enumerate(data):
        if d.ndim == 0:
            raise ValueError(f"data[{i}] must have a leading axis of rows, got a scalar.")
    num_data = data[0].shape[0]
    lengths = [d.shape[0] for d in data]
    if len(set(lengths)) != 1:
        raise ValueError(f"the data arrays must share their leading length, got {lengths}.")
    _check_counts(
        num_epochs=(num_epochs, 0),
        eval_every=(eval_every, 1),
        steps_per_call=(steps_per_call, 1),
        max_nonfinite_in_a_row=(max_nonfinite_in_a_row, 1),
    )
    if not isinstance(batch_size, (int, np.integer)) or not 1 <= batch_size <= num_data:
        raise ValueError(f"batch_size must be in [1, N = {num_data}], got {batch_size}.")
    if patience is not None and (held_out is None or patience < 1):
        raise ValueError("patience needs held_out data and must be >= 1.")
    _check_run_options(checkpoint, checkpoint_every, resume, init_state)
    _check_process_settings(blas_threads, keep_memory)
    _check_model_keywords(svi, kwargs, train_epochs)
    for i, d in enumerate(data):
        _check_finite(d, f"data[{i}]")
    for i, d in enumerate(held_out or ()):
        if _is_array(d) and np.ndim(d):
            _check_finite(d, f"held_out[{i}]")

    with _process_settings(blas_threads, keep_memory):
        init_key, eval_key, shuffle_key = jax.random.split(rng_key, 3)
        shuffle = np.random.default_rng(_seed_from_key(shuffle_key))
        first = tuple(jnp.asarray(d[:batch_size]) for d in data)
        state = _initial_state(svi, init_key, init_state, first, kwargs)
        _check_batch_plates(svi.model, first, kwargs, batch_size, num_data)
        full, rest = divmod(num_data, batch_size)
        steps_per_epoch = full + (0 if drop_last or rest == 0 else 1)
        total = num_epochs * steps_per_epoch
        facts = _epochs_facts(num_data, batch_size, steps_per_epoch)
        evaluations: list[tuple[int, float]] = []
        best = (-np.inf, 0, state)
        stopped_early = False
        losses = []
        if resume and checkpoint is not None and os.path.exists(checkpoint):
            state, step, previous, extra, saved_best = read_checkpoint(checkpoint, like=state)
            if extra.get("loop") != "train_epochs":
                raise CheckpointError(
                    f"{os.fspath(checkpoint)} was not written by train_epochs: it has no "
                    "epoch order to resume (ns.train resumes it)."
                )
            for name, value in facts.items():
                if extra.get(name) != value:
                    raise CheckpointError(
                        f"{os.fspath(checkpoint)} was written with {name}={extra.get(name)}, "
                        f"but this run has {name}={value}: its batches would not be the "
                        "same."
                    )
            if step > total:
                raise ValueError(
                    f"the checkpoint is at step {step}, past num_epochs={num_epochs} "
                    f"({total} steps)."
                )
            shuffle.bit_generator.state = extra["shuffle"]
            evaluations = [(int(e), float(v)) for e, v in extra["evaluations"]]
            if saved_best is not None:
                best = (float(extra["best_score"]), int(extra["best_epoch"]), saved_best)
            stopped_early = bool(extra["stopped_early"])
            print(
                f"resuming from {os.fspath(checkpoint)!r} at step {step} of {total} "
                f"(epoch {min(step // steps_per_epoch + 1, num_epochs)} of {num_epochs})",
                file=sys.stderr,
            )
            losses = [previous]
        loop = _Loop(svi, state, max_nonfinite_in_a_row, (), kwargs, losses)
        checkpoints = None
        if checkpoint is not None:
            check_writable(checkpoint, loop.state, loop.step, loop.history())
            checkpoints = _Checkpoints(checkpoint)
        every = checkpoint_every or total or 1

        def save(shuffled) -> None:
            # `shuffled`: the shuffling's state before the permutation of the epoch that
            # holds the next step, so that a resumed run draws that permutation again
            assert checkpoints is not None
            checkpoints.save(
                loop,
                extra={
                    **facts,
                    "shuffle": shuffled,
                    "evaluations": evaluations,
                    "best_score": float(best[0]) if evaluations else None,
                    "best_epoch": best[1],
                    "stopped_early": stopped_early,
                },
                best=best[2] if evaluations else None,
            )

        length = min(steps_per_call, max(full, 1))

        def run(rows, epoch):
            # gather on the host, then send only these batches to the device; a short last
            # chunk is padded (its extra steps are not taken) to reuse the compiled one
            steps = rows.shape[0]
            if rows.shape[1] == batch_size and steps < length:
                rows = np.concatenate([rows, np.repeat(rows[-1:], length - steps, axis=0)])
            losses = loop.run(rows.shape[0], steps, tuple(jnp.asarray(d[rows]) for d in data))
            loop.raise_if_stopped(
                f" (epoch {epoch})",
                best_epoch=epoch,
                held_out=np.asarray(evaluations, dtype=float).reshape(-1, 2),
            )
            return losses

        done = loop.step % steps_per_epoch  # steps of the first epoch already taken
        with tqdm(
            total=total, initial=loop.step, disable=not progress_bar, desc="SVI epochs"
        ) as bar:
            for epoch in range(loop.step // steps_per_epoch + 1, num_epochs + 1):
                if stopped_early:
                    break
                before = shuffle.bit_generator.state
                order = shuffle.permutation(num_data)
                batched = order[: full * batch_size].reshape(full, batch_size)
                postfix = {
                    "epoch": epoch,
                    **({"held_out": f"{best[0]:.4g}"} if evaluations else {}),
                }
                while done < full:
                    # chunks end at multiples of steps_per_call within the epoch and at
                    # checkpoints, so that a resumed run cuts them where this one did
                    base = loop.step - done
                    stop = min(
                        (done // steps_per_call + 1) * steps_per_call,
                        (loop.step // every + 1) * every - base,
                        full,
                    )
                    loop.show(bar, run(batched[done:stop], epoch), **postfix)
                    done = stop
                    if (
                        checkpoints is not None
                        and loop.step % every == 0
                        and done < steps_per_epoch
                    ):
                        save(before)
                if steps_per_epoch > full:
                    loop.show(bar, run(order[full * batch_size :][None], epoch), **postfix)
                done = 0
                if held_out is not None and (epoch % eval_every == 0 or epoch == num_epochs):
                    score = float(
                        held_out_log_likelihood(
                            svi.model,
                            svi.guide,
                            svi.get_params(loop.state),
                            *held_out,
                            rng_key=eval_key,
                            num_samples=num_eval_samples,
                            **kwargs,
                        )
                    )
                    evaluations.append((epoch, score))
                    if score > best[0]:
                        best = (score, epoch, loop.state)
                    elif patience is not None and epoch - best[1] >= patience * eval_every:
                        stopped_early = True
                if checkpoints is not None and (
                    loop.step % every == 0 or epoch == num_epochs or stopped_early
                ):
                    save(shuffle.bit_generator.state)

    table = np.asarray(evaluations, dtype=float).reshape(-1, 2)
    if held_out is None or not table.size:
        result = loop.result(held_out=table, best_epoch=num_epochs)
    else:
        _, best_epoch, best_state = best
        result = loop.result(
            best_state, held_out=table, best_epoch=best_epoch, stopped_early=stopped_early
        )
    _report_trend(result, progress_bar)
    return result
