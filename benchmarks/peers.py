"""One SVGP training step in numpyro_svgp against the same step in GPflow, GPyTorch and GPJax.

Usage::

    .venv-bench/bin/python benchmarks/peers.py --write      # the default grid, into RESULTS.md
    .venv-bench/bin/python benchmarks/peers.py --n 1000 --m 16 --dtype float64 --rounds 3

The peers are the optional dependencies ``bench`` (``pip install -e ".[bench]"``), best in
a venv of their own (``python3 -m venv .venv-bench``): TensorFlow and PyTorch are large.
Libraries that are not installed are left out with a message (``--libs`` picks them).

**What is measured.** One full-batch Adam step (learning rate 1e-2) on the negative ELBO of
one model, in each library as that library is meant to be used: whitened SVGP, zero mean,
RBF kernel with ARD lengthscales, D = 8, Gaussian likelihood, full-covariance
q(v) = N(m, S Sᵀ), inducing inputs Z trained.

- numpyro_svgp: ``jax.jit(svi.update)`` with ``AutoSVGP``, ``SVGP_ELBO`` and
  ``optax.adam``, on the model of ``step_time.numpyro_step``.
- GPflow: ``gpflow.models.SVGP(whiten=True, q_diag=False)`` with ``SquaredExponential``
  (ARD) and ``Gaussian``; value and gradient of ``training_loss`` and Adam's
  ``apply_gradients`` in one ``tf.function`` (graph mode, without XLA, GPflow's default).
- GPyTorch: ``ApproximateGP`` with ``VariationalStrategy(learn_inducing_locations=True)``
  (whitened) and ``CholeskyVariationalDistribution``, ``ScaleKernel(RBFKernel(ard_num_dims=8))``,
  ``GaussianLikelihood``, ``VariationalELBO(num_data=N)``; ``zero_grad``, loss,
  ``backward`` and ``torch.optim.Adam.step``, eagerly, as GPyTorch runs.
- GPJax: ``WhitenedVariationalGaussian`` over ``Prior(Zero, RBF) * Gaussian``; value and
  gradient of ``-gpjax.objectives.elbo`` and ``optax.adam`` in one ``jax.jit`` (the step of
  ``gpjax.fit``, without its ``lax.scan`` over steps).

numpyro_svgp runs with ``jax_enable_x64`` on in both dtypes, as ``step_time.py`` does (the
float32 data keep it float32); GPJax runs float32 cells with it off, as a float32 user
would: with it on, GPJax's jitter (``jnp.eye`` without a dtype) makes K_zz and all that
follows from it float64.

**The same start.** The data are ``step_time.data(n, m, dtype)``, made once per cell by
the driver and handed to every worker in one file, so all see the same bits. The initial
values are the same: kernel variance 1, lengthscales 1, noise variance 0.1, Z the same
points, q mean 0, S = I. Each library keeps its own transforms (numpyro's ``positive``
is ``exp``, the others use softplus; GPflow's and GPyTorch's noise variance has a lower
bound, GPJax's noise is a standard deviation); the raw values are set so that the
constrained values are these. The jitter on K_zz is numpyro_svgp's default in all four
(1e-6 in float64, 1e-4 in float32). What still differs: GPyTorch and GPJax add that
jitter to the diagonal of q(f)'s covariance at the data as well, which raises their loss
by N·jitter/(2·0.1) at the start; GPyTorch factorises K_zz in float64 even in float32
(its default); Adam's epsilon is 1e-8 everywhere (set so for GPflow's Keras Adam, whose
default is 1e-7), but GPyTorch's loss, and so its gradient, is the ELBO divided by N.

**Correctness columns.** Before timing, every worker evaluates the negative ELBO, the
total over the data and not per point (GPyTorch's times N), at the start (the loss that
the first step returns) and at a second, fixed q (a random m and S, the same for all
libraries). At the start q(v) is the prior, where the ELBO depends neither on Z nor on
K_zz; the second point checks those too. The table gives numpyro_svgp's value and each
peer's relative difference to it; in float64 they should agree to about 1e-6.

**Timing.** One worker process per library (``--worker LIB``, with the driver's
interpreter unless ``--python`` names another), speaking lines of JSON on stdin/stdout.
For each cell every worker builds its step, compiles it (the first step) and runs one
warm-up step; a library whose warm-up step takes longer than ``--max-seconds`` is left out
of that cell (the whole cell when that is numpyro_svgp). Then come ``--rounds`` rounds:
in each the driver asks the workers one after the other, in an order rotated by one every
round, to time K consecutive steps, each waited for (``block_until_ready`` for JAX,
``.numpy()`` of the loss for TensorFlow; torch on the CPU is synchronous). K is chosen per
library from its warm-up step so that one request takes about ``--round-seconds``. Only one
worker runs at a time: the driver stops the others (SIGSTOP) between their requests, since
an idle library's thread pools keep spinning otherwise. Thread settings are each
library's defaults, and are printed; numpyro_svgp's BLAS libraries are held at one thread,
as ``ns.train`` holds them while it trains (``--blas-threads none`` leaves OpenBLAS's own
default; ``benchmarks/threads.py`` compares the two, idle and under load). Run it on an
otherwise idle machine: the thread pools of all four libraries (torch's OpenMP pool most of
all) lose far more than their share of time when another process competes for the cores.

**Reading the table.** One row per cell and library: the median over rounds of the
time per step, the quartiles over rounds, the ratio of the peer's median to
numpyro_svgp's (above 1: the peer is slower), and the two correctness columns. Machine,
versions, date and thread settings are printed above the table, and ``--write`` puts all
of it into ``benchmarks/RESULTS.md`` between ``<!-- peers:begin -->`` and
``<!-- peers:end -->``.
"""

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OURS = "numpyro_svgp"
LIBS = (OURS, "gpflow", "gpytorch", "gpjax")
DEFAULT_CELLS = ((10_000, 64), (100_000, 64), (10_000, 256), (100_000, 256), (1_000, 1024))
LEARNING_RATE = 1e-2
NOISE_VARIANCE = 0.1
BEGIN, END = "<!-- peers:begin -->", "<!-- peers:end -->"


# ---------------------------------------------------------------------------------------
# Workers: one library each. Each builder takes numpy arrays and returns
# ``(step, check_loss, scale, info)``: ``step()`` runs one training step, waits for it and
# returns its loss (before the update); ``scale`` turns that loss into the total negative
# ELBO; ``check_loss`` is the total negative ELBO at the second q.


def build_numpyro_svgp(X, y, Z, jitter, check_mean, check_tril):
    import jax
    import jax.numpy as jnp
    import optax
    from jax import random
    from numpyro.infer import SVI

    sys.path.insert(0, ROOT)
    import numpyro_svgp as ns

    X, y, Z = (jnp.asarray(a) for a in (X, y, Z))

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import step_time

    model = step_time.svgp_model(ns, Z)  # jitter: ns.default_jitter

    guide = ns.AutoSVGP(model)
    elbo = ns.SVGP_ELBO()
    svi = SVI(model, guide, optax.adam(LEARNING_RATE), elbo)
    state = svi.init(random.PRNGKey(0), X, y)
    update = jax.jit(svi.update)

    (loc_name, tril_name), *_ = guide.whitened_param_names()
    params = dict(svi.get_params(state))
    params[loc_name], params[tril_name] = jnp.asarray(check_mean), jnp.asarray(check_tril)
    check = float(elbo.loss(random.PRNGKey(0), params, model, guide, X, y))

    def step():
        nonlocal state
        state, loss = update(state, X, y)
        return loss.block_until_ready()

    return step, check, 1.0


def build_gpflow(X, y, Z, jitter, check_mean, check_tril):
    import gpflow
    import tensorflow as tf
    from gpflow.keras import tf_keras

    # GPflow takes its float type and jitter from its config when objects are made
    gpflow.config.set_default_float(X.dtype)
    gpflow.config.set_default_jitter(jitter)
    N, D = X.shape
    kernel = gpflow.kernels.SquaredExponential(variance=1.0, lengthscales=np.ones(D, X.dtype))
    likelihood = gpflow.likelihoods.Gaussian(variance=NOISE_VARIANCE)
    model = gpflow.models.SVGP(
        kernel, likelihood, Z.copy(), num_latent_gps=1, q_diag=False, whiten=True, num_data=N
    )
    data = (tf.constant(X), tf.constant(y[:, None]))
    optimizer = tf_keras.optimizers.Adam(LEARNING_RATE, epsilon=1e-8)

    model.q_mu.assign(check_mean[:, None])
    model.q_sqrt.assign(check_tril[None])
    check = float(model.training_loss(data).numpy())
    model.q_mu.assign(np.zeros((len(Z), 1), X.dtype))
    model.q_sqrt.assign(np.eye(len(Z), dtype=X.dtype)[None])

    variables = model.trainable_variables

    # the data are arguments of the graph, as in jax.jit(svi.update), not constants in it
    @tf.function
    def update(X, Y):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(variables)
            loss = model.training_loss((X, Y))
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables, strict=True))
        return loss

    def step():
        return update(*data).numpy()

    return step, check, 1.0


def build_gpytorch(X, y, Z, jitter, check_mean, check_tril):
    import gpytorch
    import torch

    dtype = {np.dtype("float64"): torch.float64, np.dtype("float32"): torch.float32}[X.dtype]
    X, y, Z = (torch.as_tensor(a) for a in (X, y, Z))
    (N, D), M = X.shape, Z.shape[0]

    class Model(gpytorch.models.ApproximateGP):
        def __init__(self):
            q = gpytorch.variational.CholeskyVariationalDistribution(M)
            strategy = gpytorch.variational.VariationalStrategy(
                self, Z, q, learn_inducing_locations=True, jitter_val=jitter
            )
            super().__init__(strategy)
            self.mean_module = gpytorch.means.ZeroMean()
            self.covar_module = gpytorch.kernels.ScaleKernel(
                gpytorch.kernels.RBFKernel(ard_num_dims=D)
            )

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(
                self.mean_module(x), self.covar_module(x)
            )

    model = Model().to(dtype)
    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(dtype)
    # the setters invert GPyTorch's own transforms (softplus, and the noise's lower bound)
    model.covar_module.outputscale = 1.0
    model.covar_module.base_kernel.lengthscale = torch.ones(D, dtype=dtype)
    likelihood.noise = NOISE_VARIANCE
    strategy = model.variational_strategy
    q = strategy._variational_distribution
    # else the first call "initialises" q from the prior, with noise of std 1e-3 on the mean
    strategy.variational_params_initialized.fill_(1)
    model.train()
    likelihood.train()
    mll = gpytorch.mlls.VariationalELBO(likelihood, model, num_data=N)

    with torch.no_grad():
        q.variational_mean.copy_(torch.as_tensor(check_mean))
        q.chol_variational_covar.copy_(torch.as_tensor(check_tril))
        check = -N * float(mll(model(X), y))
        q.variational_mean.zero_()
        q.chol_variational_covar.copy_(torch.eye(M, dtype=dtype))

    optimizer = torch.optim.Adam(
        [{"params": model.parameters()}, {"params": likelihood.parameters()}], lr=LEARNING_RATE
    )

    def step():
        optimizer.zero_grad()
        loss = -mll(model(X), y)
        loss.backward()
        optimizer.step()
        return loss.detach()

    # VariationalELBO is the ELBO divided by num_data
    return step, check, float(N)


def build_gpjax(X, y, Z, jitter, check_mean, check_tril):
    import equinox as eqx
    import gpjax as gpx
    import jax
    import jax.numpy as jnp
    import optax

    # float32 runs as a float32 user runs GPJax, without x64: with it, GPJax's jitter
    # (jnp.eye without a dtype) turns K_zz, and all that follows from it, into float64
    jax.config.update("jax_enable_x64", X.dtype == np.float64)
    X, Y, Z = jnp.asarray(X), jnp.asarray(y[:, None]), jnp.asarray(Z)
    dtype, D = X.dtype, X.shape[1]
    kernel = gpx.kernels.RBF(lengthscale=jnp.ones(D, dtype), variance=jnp.ones((), dtype))
    prior = gpx.gps.Prior(mean_function=gpx.mean_functions.Zero(), kernel=kernel, jitter=jitter)
    # GPJax's Gaussian likelihood is parametrised by the noise's standard deviation
    likelihood = gpx.likelihoods.Gaussian(obs_stddev=jnp.sqrt(jnp.asarray(NOISE_VARIANCE, dtype)))
    posterior = prior * likelihood

    def family(mean, tril):
        return gpx.variational_families.WhitenedVariationalGaussian(
            model=posterior,
            inducing_inputs=Z,
            variational_mean=jnp.asarray(mean, dtype)[:, None],
            variational_root_covariance=jnp.asarray(tril, dtype),
        )

    def loss(q, X, Y):
        return -gpx.objectives.elbo(q, gpx.Dataset(X=X, y=Y))

    M = Z.shape[0]
    check = float(jax.jit(loss)(family(check_mean, check_tril), X, Y))
    # every array is trained, as in gpjax.fit (Zero's constant is non_trainable: no gradient)
    params, static = eqx.partition(family(np.zeros(M), np.eye(M)), eqx.is_array)
    # Zero's constant is a weakly typed float64, and the updated one is not: without this
    # the second and third steps compile again (and a strong float64 would make a float32
    # step compute in float64)
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    optimizer = optax.adam(LEARNING_RATE)
    state = (params, optimizer.init(params))

    @jax.jit
    def update(state, X, Y):
        params, opt_state = state
        value, grads = jax.value_and_grad(lambda p: loss(eqx.combine(p, static), X, Y))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

    def step():
        nonlocal state
        state, value = update(state, X, Y)
        return value.block_until_ready()

    return step, check, 1.0


BUILDERS = {
    OURS: build_numpyro_svgp,
    "gpflow": build_gpflow,
    "gpytorch": build_gpytorch,
    "gpjax": build_gpjax,
}


def describe(lib):
    """``(versions, thread settings)`` of a library, importing it (and so failing early
    when it is not installed)."""
    if lib in (OURS, "gpjax"):
        import jax

        jax.config.update("jax_enable_x64", True)  # float64 cells need it; float32 data stay so
        xla = f"XLA:CPU default thread pool, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
        if lib == OURS:
            import numpyro

            sys.path.insert(0, ROOT)
            import numpyro_svgp

            on_error = os.environ.get("EQX_ON_ERROR", "raise")
            return (
                f"numpyro_svgp {numpyro_svgp.__version__} (jax {jax.__version__}, "
                f"numpyro {numpyro.__version__})",
                f"{xla}, EQX_ON_ERROR={on_error}, {blas_description()}",
            )
        import gpjax

        return f"gpjax {gpjax.__version__} (jax {jax.__version__})", xla
    if lib == "gpflow":
        import gpflow
        import tensorflow as tf
        import tensorflow_probability as tfp

        threading = tf.config.threading
        return (
            f"gpflow {gpflow.__version__} (tensorflow {tf.__version__}, "
            f"tensorflow-probability {tfp.__version__})",
            f"TF intra-op {threading.get_intra_op_parallelism_threads()}, inter-op "
            f"{threading.get_inter_op_parallelism_threads()} (0: TF's default, all cores)",
        )
    import gpytorch
    import linear_operator
    import torch

    return (
        f"gpytorch {gpytorch.__version__} (torch {torch.__version__}, "
        f"linear_operator {linear_operator.__version__})",
        f"torch intra-op {torch.get_num_threads()}, inter-op {torch.get_num_interop_threads()}",
    )


def handle(lib, message, current):
    """One request to a worker; ``current`` holds the step of the cell being timed."""
    command = message["cmd"]
    if command == "hello":
        versions, threads = describe(lib)
        return {"versions": versions, "threads": threads}
    if command == "release":
        current.clear()
        gc.collect()
        return {}
    if command == "build":
        current.clear()
        gc.collect()
        with np.load(message["data"]) as f:
            arrays = {k: f[k] for k in f.files}
        step, check, scale = BUILDERS[lib](
            arrays["X"],
            arrays["y"],
            arrays["Z"],
            message["jitter"],
            arrays["check_mean"],
            arrays["check_tril"],
        )
        start = time.perf_counter()
        loss = step()  # compiles (JAX, tf.function), and returns the loss at the start
        compile_seconds = time.perf_counter() - start
        start = time.perf_counter()
        step()
        warm_seconds = time.perf_counter() - start
        current["step"] = step
        return {
            "initial_loss": scale * float(loss),
            "check_loss": check,
            "compile_seconds": compile_seconds,
            "warm_seconds": warm_seconds,
        }
    if command == "time":
        step, k = current["step"], message["k"]
        start, cpu = time.perf_counter(), time.process_time()  # CPU: all the process's threads
        for _ in range(k):
            step()
        return {
            "seconds": (time.perf_counter() - start) / k,
            "cpu_seconds": (time.process_time() - cpu) / k,
        }
    raise ValueError(f"unknown command {command!r}")


def train_settings(lib, blas_threads):
    """For numpyro_svgp, a context holding the process settings that ``ns.train`` holds
    while it trains: BLAS at ``blas_threads`` threads (``"none"``: OpenBLAS's own
    default, one per core) and freed memory kept (``keep_memory``). Other libraries: none."""
    if lib != OURS:
        return contextlib.nullcontext()
    sys.path.insert(0, ROOT)
    from numpyro_svgp._train import _process_settings

    return _process_settings(None if blas_threads == "none" else int(blas_threads), True)


def blas_description():
    from threadpoolctl import threadpool_info

    found = [i for i in threadpool_info() if i["user_api"] == "blas"]
    return ", ".join(f"{i['prefix']} {i['num_threads']} threads" for i in found) or "no BLAS"


def worker(lib, blas_threads="none"):
    with train_settings(lib, blas_threads):
        serve(lib)


def serve(lib):
    # the replies get the real stdout to themselves; whatever the libraries print goes to
    # stderr, where it cannot break a line of the protocol
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # gpflow's import
    current = {}
    for line in sys.stdin:
        try:
            reply = handle(lib, json.loads(line), current)
        except Exception as error:  # reported to the driver, which leaves the library out
            traceback.print_exc()
            reply = {"error": f"{type(error).__name__}: {error}".splitlines()[0][:300]}
        replies.write(json.dumps(reply) + "\n")


# ---------------------------------------------------------------------------------------
# Driver


class Worker:
    def __init__(self, lib, python, blas_threads="1"):
        env = dict(os.environ)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
        self.lib = lib
        command = [python, os.path.abspath(__file__), "--worker", lib]
        self.process = subprocess.Popen(
            command + ["--blas-threads", blas_threads],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=env,
        )

    def ask(self, **message):
        # A worker runs only while it answers, and is stopped (SIGSTOP) the rest of the
        # time: an idle library's thread pools otherwise keep spinning and polling (all
        # four workers showed 20-40 % of a core each while only one was asked to compute),
        # which slowed whichever library was being timed.
        self._signal(signal.SIGCONT)
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            return {"error": "worker exited"}
        line = self.process.stdout.readline()
        self._signal(signal.SIGSTOP)
        return json.loads(line) if line else {"error": "worker exited"}

    def _signal(self, sig):
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def close(self):
        self._signal(signal.SIGCONT)
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def check_q(m, dtype):
    """The second point of the correctness check: a fixed q(v) = N(mean, tril trilᵀ) away
    from the prior, with a positive diagonal (so that every library reads it alike)."""
    rng = np.random.default_rng(1)
    mean = 0.5 * rng.standard_normal(m)
    tril = np.tril(rng.standard_normal((m, m)), -1) * 0.3 / math.sqrt(m)
    tril += np.diag(rng.uniform(0.5, 1.0, m))
    return mean.astype(dtype), tril.astype(dtype)


def cells(args):
    if args.n is None and args.m is None:
        grid = DEFAULT_CELLS
    else:
        ns_ = args.n or sorted({n for n, _ in DEFAULT_CELLS})
        ms_ = args.m or sorted({m for _, m in DEFAULT_CELLS})
        grid = [(n, m) for n in ns_ for m in ms_]
    return [(dtype, n, m) for dtype in args.dtype for n, m in grid]


def machine():
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    system = f"{platform.platform()}, Python {platform.python_version()}"
    return f"{cpu}, {os.cpu_count()} cores, {system}"


def thread_env():
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "XLA_FLAGS")
    set_ = [f"{k}={os.environ[k]}" for k in names if k in os.environ]
    return ", ".join(set_) if set_ else "none of OMP/MKL/OPENBLAS_NUM_THREADS, XLA_FLAGS set"


HEADER = (
    "| dtype | N | M | library | ms per step, median | quartiles | ratio to numpyro_svgp "
    "| −ELBO at the start: ours, rel. diff | −ELBO at a second q: ours, rel. diff |"
)
RULE = "|---|---|---|---|---|---|---|---|---|"


def loss_cell(lib, value, ours):
    """numpyro_svgp's loss itself, a peer's relative difference to it."""
    return f"{ours:.6e}" if lib == OURS else f"{(value - ours) / abs(ours):+.1e}"


def run_cell(workers, dtype_name, n, m, args, tmp):
    """Rows of the table for one cell."""
    import jax
    import step_time

    import numpyro_svgp as ns

    jax.config.update("jax_enable_x64", True)  # else data(..., "float64") would be float32
    X, y, Z = (np.asarray(a) for a in step_time.data(n, m, dtype_name))
    check_mean, check_tril = check_q(m, X.dtype)
    path = os.path.join(tmp, "cell.npz")
    np.savez(path, X=X, y=y, Z=Z, check_mean=check_mean, check_tril=check_tril)
    jitter = ns.default_jitter(X.dtype)

    cell = f"| {dtype_name} | {n} | {m} |"
    built, rows = {}, {}
    for lib, w in workers.items():
        reply = w.ask(cmd="build", data=path, jitter=jitter)
        if "error" in reply:
            rows[lib] = f"{cell} {lib} | error: {reply['error']} | | | | |"
        elif reply["warm_seconds"] > args.max_seconds:
            rows[lib] = (
                f"{cell} {lib} | skipped ({reply['warm_seconds']:.1f} s > "
                f"{args.max_seconds} s per step) | | | | |"
            )
            w.ask(cmd="release")
        else:
            built[lib] = reply
        if lib == OURS and lib not in built:
            break
    if OURS not in built:
        for w in workers.values():
            w.ask(cmd="release")
        return list(rows.values())

    names = list(built)
    k = {
        lib: max(1, min(10_000, math.ceil(args.round_seconds / built[lib]["warm_seconds"])))
        for lib in names
    }
    times = {lib: [] for lib in names}
    for round_ in range(args.rounds):
        shift = round_ % len(names)
        for lib in names[shift:] + names[:shift]:
            reply = workers[lib].ask(cmd="time", k=k[lib])
            times[lib].append(reply.get("seconds", math.nan))
    for w in workers.values():
        w.ask(cmd="release")

    ours_median = float(np.median(times[OURS]))
    initial, check = built[OURS]["initial_loss"], built[OURS]["check_loss"]
    for lib in names:
        q1, median, q3 = np.quantile(times[lib], [0.25, 0.5, 0.75])
        reply = built[lib]
        ratio = "1" if lib == OURS else f"{median / ours_median:.2f}"
        rows[lib] = (
            f"{cell} {lib} | {1e3 * median:.3g} | {1e3 * q1:.3g}–{1e3 * q3:.3g} | {ratio} | "
            f"{loss_cell(lib, reply['initial_loss'], initial)} | "
            f"{loss_cell(lib, reply['check_loss'], check)} |"
        )
    return [rows[lib] for lib in workers if lib in rows]


def run_head(script, argv, versions, threads, *more):
    """The lines above a results table: the command, date, machine, versions, threads
    and ``more``."""
    command = f"python benchmarks/{script} " + " ".join(map(shlex.quote, shown(argv)))
    return [
        f"`{command.strip()}`, {datetime.date.today().isoformat()}.",
        "",
        f"Machine: {machine()}.",
        f"Versions: {'; '.join(dict.fromkeys(versions))}.",
        f"Threads: {thread_env()}; " + "; ".join(threads) + ".",
        *more,
        "",
    ]


def shown(argv):
    """The command-line arguments that shape the table (not where it is written)."""
    argv, kept = list(sys.argv[1:] if argv is None else argv), []
    while argv:
        a = argv.pop(0)
        if a == "--results":
            argv = argv[1:]
        elif a != "--write" and not a.startswith("--results="):
            kept.append(a)
    return kept


def write_section(path, title, head, reading, table, header=None, begin=BEGIN, end=END):
    """Put a section (``title``, the ``head`` lines, the ``reading`` sentence, the
    table) between the markers ``begin`` and ``end`` of ``path``, in place of the one
    there, or at its end."""
    header = header or [HEADER, RULE]
    section = "\n".join([begin, title, "", *head, reading, "", *header, *table, end])
    text = open(path).read() if os.path.exists(path) else ""
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        text = before + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section + "\n"
    with open(path, "w") as f:
        f.write(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=LIBS, help=argparse.SUPPRESS)
    parser.add_argument(
        "--blas-threads",
        default="1",
        help="numpyro_svgp's BLAS threads: 1 as ns.train holds them, or none (OpenBLAS's own)",
    )
    parser.add_argument(
        "--n", type=int, nargs="+", help="data sizes; with --n or --m the grid is all pairs"
    )
    parser.add_argument("--m", type=int, nargs="+", help="numbers of inducing points")
    parser.add_argument("--dtype", nargs="+", default=["float64", "float32"])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--libs", nargs="+", choices=LIBS, default=list(LIBS), help="numpyro_svgp is always in"
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=3.0,
        help="leave a library out of a cell when its warm-up step takes longer",
    )
    parser.add_argument(
        "--round-seconds",
        type=float,
        default=0.25,
        help="about how long one library runs in one round (K steps)",
    )
    parser.add_argument("--python", default=sys.executable, help="the workers' interpreter")
    parser.add_argument("--write", action="store_true", help="rewrite the section in --results")
    parser.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.blas_threads)

    libs = [OURS] + [lib for lib in LIBS if lib in args.libs and lib != OURS]
    workers, versions, threads = {}, [], []
    for lib in libs:  # started together: the imports (TensorFlow's is slow) overlap
        workers[lib] = Worker(lib, args.python, args.blas_threads)
    try:
        for lib in libs:
            reply = workers[lib].ask(cmd="hello")
            if "error" in reply:
                print(f"{lib} left out: {reply['error']}", file=sys.stderr)
                workers.pop(lib).close()
                if lib == OURS:
                    return 1
                continue
            versions.append(reply["versions"])
            threads.append(f"{lib}: {reply['threads']}")

        head = run_head("peers.py", argv, versions, threads)
        print("\n".join(head))
        print(HEADER)
        print(RULE)
        sys.stdout.flush()
        table = []
        with tempfile.TemporaryDirectory() as tmp:
            for dtype_name, n, m in cells(args):
                rows = run_cell(workers, dtype_name, n, m, args, tmp)
                print("\n".join(rows))
                sys.stdout.flush()
                table += rows
    finally:
        for w in workers.values():
            w.close()

    if args.write:
        write_section(
            args.results,
            "## One SVGP step against GPflow, GPyTorch and GPJax (`benchmarks/peers.py`)",
            head,
            "Times are medians over rounds of each library's time per step, ratios are the "
            "peer's median over numpyro_svgp's (above 1: the peer is slower), the loss "
            "columns are numpyro_svgp's total −ELBO and each peer's relative difference to "
            "it (see the module docstring).",
            table,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
