"""Median time of one SVI step, numpyro_svgp against a plain-JAX SVGP step in the same run.

Usage::

    python benchmarks/step_time.py                  # N in {1e4, 1e5}, M in {64, 256, 1024}
    python benchmarks/step_time.py --n 10000 --m 64 --dtype float32

Model: whitened SVGP, RBF kernel with ARD lengthscales, D = 8, Gaussian likelihood,
full batch, Adam. numpyro_svgp runs ``svi.update`` (``AutoSVGP``, ``SVGP_ELBO``)
under ``jit``; the reference is the same ELBO and gradient written in plain JAX in
this file, also under ``jit``. Each cell: compile, one warm-up step, then
``--repeats`` rounds (more for fast steps, see ``--min-seconds``) of one timed step
per contender (``block_until_ready``), the order rotated every round
(:func:`time_interleaved`); the table gives medians, their ratio, and the quartiles
of the per-round ratios as a measure of the noise. A cell
is skipped when its nominal flops at 25% of the GEMM rate predict more than
``--max-seconds`` per step, or when a warm-up step takes longer than that.

The plain-JAX reference lets JAX derive the gradient. In the matrix-product form
numpyro_svgp differentiates ``K_zx K_xz`` by hand (one O(N M²) product where JAX's
derivative takes two, see ``numpyro_svgp._gaussian._weighted_gram``); a second
reference, "plain JAX + library derivative", uses that derivative too, so that its
ratio is the cost of the NumPyro layer and the input checks alone.

Both sides take the form numpyro_svgp picks: the matrix-product form of the
Gaussian term (``K_zx K_xz`` and ``K_zx y``) in float64 when N ≥ 2M, the per-point
form otherwise (float32 always: see ``numpyro_svgp._gaussian.use_matrix_form``).
numpyro_svgp forms that term in blocks of rows (``numpyro_svgp._blocks``); the
reference takes it whole, as a plain implementation does. The table counts the
minor page faults per step of each: XLA:CPU allocates a step's temporaries afresh
on every call, and whole ``(N, M)`` arrays come back from the kernel as fresh pages.
numpyro_svgp's value checks (NaN/inf data, non-positive hyperparameters, a failed
Cholesky) are ``equinox.error_if``: host callbacks, which make XLA:CPU run the step
synchronously in the calling thread instead of dispatching it asynchronously.
``EQX_ON_ERROR=nan python benchmarks/step_time.py`` measures the step without them
(bad values then turn into NaN instead of raising).

GFLOP/s are nominal (:func:`nominal_flops`), against the GEMM rate measured here on
a 2048² matrix product.
"""

import argparse
import math
import os
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from jax import random
from jax.scipy.linalg import solve_triangular
from numpyro.infer import SVI

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpyro_svgp as ns  # noqa: E402
from numpyro_svgp._gaussian import _weighted_gram as weighted_gram  # noqa: E402

D = 8


def data(n, m, dtype):
    rng = np.random.default_rng(0)
    X = rng.uniform(-2, 2, size=(n, D))
    y = np.sin(X[:, 0]) + 0.5 * np.cos(2 * X[:, 1]) + 0.1 * rng.normal(size=n)
    # Z at data points; with more inducing points than data (M > N), uniform in the box
    Z = X[rng.choice(n, m, replace=False)] if m <= n else rng.uniform(-2, 2, size=(m, D))
    return (jnp.asarray(a, dtype) for a in (X, y, Z))


def svgp_model(lib, Z):
    """The benchmark's model, built with ``lib`` (numpyro_svgp, or another revision of it
    in ``compare_revisions.py``): RBF with ARD lengthscales, ``Z`` trained, Gaussian noise,
    all ``numpyro.param``s; the data plate over the rows of ``X``."""

    def model(X, y=None):
        kernel = lib.kernels.RBF(
            numpyro.param("variance", jnp.ones((), X.dtype), constraint=dist.constraints.positive),
            numpyro.param(
                "lengthscale", jnp.ones(X.shape[1], X.dtype), constraint=dist.constraints.positive
            ),
        )
        f = lib.svgp("f", kernel, X, numpyro.param("Z", Z))
        s2 = numpyro.param(
            "noise_var", jnp.asarray(0.1, X.dtype), constraint=dist.constraints.positive
        )
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f, jnp.sqrt(s2)), obs=y)

    return model


def numpyro_step(X, y, Z, block_rows="auto"):
    model = svgp_model(ns, Z)
    svi = SVI(model, ns.AutoSVGP(model), optax.adam(1e-2), ns.SVGP_ELBO(block_rows=block_rows))
    state = svi.init(random.PRNGKey(0), X, y)
    update = jax.jit(svi.update)

    def step(state):
        return update(state, X, y)

    return step, state


def plain_step(X, y, Z, gram_vjp=False):
    """The same whitened SVGP ELBO and Adam step in plain JAX, in the same form
    (matrix-product or per-point) that numpyro_svgp picks for this shape.

    With ``gram_vjp`` the products ``K_zx K_xz`` and ``K_zx y`` of the matrix form
    go through the library's hand-written derivative (one O(N M²) product in the
    backward pass instead of two), so that the difference left is the NumPyro
    layer and the checks alone."""
    dtype, (N, M) = X.dtype, (X.shape[0], Z.shape[0])
    jitter = 1e-6 if dtype == jnp.float64 else 1e-4
    matrix_form = ns._gaussian.use_matrix_form(N, M, dtype)

    def rbf_diff(a, b, var, ls):
        a, b = a / ls, b / ls
        return var * jnp.exp(-0.5 * jnp.sum((a[:, None, :] - b[None, :, :]) ** 2, -1))

    def rbf_gemm(a, b, var, ls):
        c = jax.lax.stop_gradient(b.mean(0))
        a, b = (a - c) / ls, (b - c) / ls
        r2 = jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :] - 2 * a @ b.T
        return var * jnp.exp(-0.5 * jnp.maximum(r2, 0))

    def loss(p, X, y):
        var, ls, s2 = jnp.exp(p["log_var"]), jnp.exp(p["log_ls"]), jnp.exp(p["log_s2"])
        m, S = p["m"], jnp.tril(p["S"])
        L = jnp.linalg.cholesky(
            rbf_diff(p["Z"], p["Z"], var, ls) + jitter * jnp.eye(M, dtype=dtype)
        )
        K_xz = rbf_gemm(X, p["Z"], var, ls)
        kl = 0.5 * (jnp.sum(S**2) + jnp.sum(m**2) - M) - jnp.sum(jnp.log(jnp.abs(jnp.diag(S))))
        if matrix_form:
            if gram_vjp:
                gram, r = weighted_gram(K_xz.T, jnp.ones((), dtype), y)
            else:
                gram, r = K_xz.T @ K_xz, K_xz.T @ y
            T = solve_triangular(L, solve_triangular(L, gram, lower=True).T, lower=True)
            b = solve_triangular(L, r, lower=True)
            sigma = jnp.outer(m, m) + S @ S.T - jnp.eye(M, dtype=dtype)
            quad = jnp.sum(y * y) + N * var - 2 * m @ b + jnp.sum(T * sigma)
            ell = -0.5 * (N * jnp.log(2 * jnp.pi * s2) + quad / s2)
        else:
            if N >= M:  # explicit L^{-1} and a GEMM, as the library does for N >= M
                A = K_xz @ solve_triangular(L, jnp.eye(M, dtype=dtype), lower=True).T
            else:
                A = jax.lax.linalg.triangular_solve(
                    L, K_xz, left_side=False, lower=True, transpose_a=True
                )
            fvar = jnp.maximum(var - jnp.sum(A**2, 1), 0) + jnp.sum((A @ S) ** 2, 1)
            ell = -0.5 * jnp.sum(jnp.log(2 * jnp.pi * s2) + ((y - A @ m) ** 2 + fvar) / s2)
        return kl - ell

    params = {
        "log_var": jnp.zeros((), dtype),
        "log_ls": jnp.zeros(D, dtype),
        "log_s2": jnp.log(jnp.asarray(0.1, dtype)),
        "Z": Z,
        "m": jnp.zeros(M, dtype),
        "S": jnp.eye(M, dtype=dtype),
    }
    return adam_step(loss, params, X, y)


def adam_step(loss, params, *data, learning_rate=1e-2):
    """``(step, state)`` for :func:`time_interleaved`: one jitted Adam step on
    ``loss(params, *data)``, returning the new state and the loss."""
    optimizer = optax.adam(learning_rate)

    # the data are arguments of the compiled step, as in SVI.update, not constants in it
    @jax.jit
    def update(state, *data):
        p, opt_state = state
        value, grads = jax.value_and_grad(loss)(p, *data)
        updates, opt_state = optimizer.update(grads, opt_state)
        return (optax.apply_updates(p, updates), opt_state), value

    def step(state):
        return update(state, *data)

    return step, (params, optimizer.init(params))


def nominal_flops(n, m, dtype):
    """Leading-order flops of one step: K_zx K_xz and its gradient (4 N M²) in the
    matrix-product form; A = K_xz L^{-T}, A S and their gradients (8 N M²) in the
    per-point form."""
    return (4 if ns._gaussian.use_matrix_form(n, m, dtype) else 8) * n * m**2


def time_interleaved(contenders, repeats, max_seconds, min_seconds=0.0):
    """Seconds per step of each ``name -> (step, state)``, timed in rounds.

    Each contender is compiled and warmed up, then every round runs one step of
    each, in an order rotated by one every round, so that slow drift of the machine
    and any cost of switching between compiled programs (the first program in a
    round was measured here to run up to 5% slower) fall on every contender alike.
    There are ``repeats`` rounds, or more where the steps are fast: enough for each
    contender to run ``min_seconds`` in all, so that millisecond steps get hundreds of
    samples. Returns ``{name: [seconds, ...]}`` in round order and
    ``{name: [minor page faults, ...]}`` alike, or ``None`` when a warm-up step takes
    longer than ``max_seconds``.
    """
    names, states, slowest = list(contenders), {}, 0.0
    for name, (step, state) in contenders.items():
        state, loss = step(state)  # compile
        jax.block_until_ready(loss)
        start = time.perf_counter()
        state, loss = step(state)  # warm up, and a first look at the cost
        jax.block_until_ready(loss)
        slowest = max(slowest, time.perf_counter() - start)
        if slowest > max_seconds:
            return None
        states[name] = state
    times, faults = {name: [] for name in names}, {name: [] for name in names}
    for round_ in range(max(repeats, math.ceil(min_seconds / slowest))):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            step = contenders[name][0]
            faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            states[name], loss = step(states[name])
            jax.block_until_ready(loss)
            times[name].append(time.perf_counter() - start)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
    return times, faults


def gemm_gflops(dtype, size=2048, repeats=9):
    """The GEMM rate on a ``size``² product: the fastest of ``repeats`` (a peak, and
    the skip rule's yardstick, so one slow repeat must not move it)."""
    a = jnp.asarray(np.random.default_rng(0).normal(size=(size, size)), dtype)
    matmul = jax.jit(lambda a: a @ a)
    jax.block_until_ready(matmul(a))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a))
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times) / 1e9


def main(argv=None):
    parser = argparse.ArgumentParser(description="SVGP step time")
    parser.add_argument("--n", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--m", type=int, nargs="*", default=[64, 256, 1024])
    parser.add_argument("--dtype", nargs="*", default=["float64", "float32"])
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--max-seconds", type=float, default=2.0)
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=3.0,
        help="run at least this long per contender and cell (more rounds for fast steps)",
    )
    parser.add_argument(
        "--block-rows",
        default="auto",
        help="numpyro_svgp's SVGP_ELBO(block_rows=...): 'auto', 'none' or rows per block",
    )
    args = parser.parse_args(argv)
    choice = args.block_rows.lower()
    block_rows = "auto" if choice == "auto" else None if choice == "none" else int(choice)
    jax.config.update("jax_enable_x64", True)
    on_error = os.environ.get("EQX_ON_ERROR", "raise")
    print(
        f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} cores, "
        f"EQX_ON_ERROR={on_error}, block_rows={block_rows!r}"
    )
    print(
        "| dtype | N | M | numpyro_svgp ms | plain JAX ms | ratio | paired ratios, quartiles "
        "| plain JAX + library derivative ms | ratio | nominal GFLOP/s | GEMM peak GFLOP/s "
        "| page faults per step, numpyro_svgp / plain |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for dtype_name in args.dtype:
        dtype = jnp.dtype(dtype_name)
        peak = gemm_gflops(dtype)
        for n in args.n:
            for m in args.m:
                cell = f"| {dtype_name} | {n} | {m} |"
                if nominal_flops(n, m, dtype) / (0.25 * peak * 1e9) > args.max_seconds:
                    print(
                        f"{cell} skipped (predicted > {args.max_seconds} s/step at 25% of the "
                        "GEMM rate) | | | | | | | | |"
                    )
                    continue
                X, y, Z = data(n, m, dtype)
                contenders = {
                    "ours": numpyro_step(X, y, Z, block_rows),
                    "plain": plain_step(X, y, Z),
                }
                if ns._gaussian.use_matrix_form(n, m, dtype):
                    contenders["plain_vjp"] = plain_step(X, y, Z, gram_vjp=True)
                timed = time_interleaved(
                    contenders, args.repeats, args.max_seconds, args.min_seconds
                )
                if timed is None:
                    print(f"{cell} skipped (> {args.max_seconds} s/step) | | | | | | | | |")
                    continue
                times, faults = timed
                ours, plain = (statistics.median(times[k]) for k in ("ours", "plain"))
                paired = np.quantile(np.divide(times["ours"], times["plain"]), [0.25, 0.75])
                if "plain_vjp" in times:
                    plain_vjp = statistics.median(times["plain_vjp"])
                    vjp_cells = f"{1e3 * plain_vjp:.1f} | {ours / plain_vjp:.2f}"
                else:
                    vjp_cells = "(same program) | "
                gflops = nominal_flops(n, m, dtype) / ours / 1e9
                page_faults = " / ".join(
                    f"{statistics.median(faults[k]):.0f}" for k in ("ours", "plain")
                )
                print(
                    f"{cell} {1e3 * ours:.1f} | {1e3 * plain:.1f} | {ours / plain:.2f} | "
                    f"{paired[0]:.2f}–{paired[1]:.2f} | {vjp_cells} | "
                    f"{gflops:.1f} | {peak:.1f} | "
                    f"{page_faults} |"
                )
                sys.stdout.flush()


if __name__ == "__main__":
    main()
