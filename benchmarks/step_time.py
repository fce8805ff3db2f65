"""Median time of one SVI step, numpyro_svgp against a plain-JAX SVGP step in the same run.

Usage::

    python benchmarks/step_time.py                  # N in {1e4, 1e5}, M in {64, 256, 1024}
    python benchmarks/step_time.py --n 10000 --m 64 --dtype float32

Model: whitened SVGP, RBF kernel with ARD lengthscales, D = 8, Gaussian likelihood,
full batch, Adam. numpyro_svgp runs ``svi.update`` (``AutoSVGP``, ``SVGP_ELBO``)
under ``jit``; the reference is the same ELBO and gradient written in plain JAX in
this file, also under ``jit``. Each cell: compile, one warm-up step, then the median
of ``--repeats`` timed steps with ``block_until_ready``. A cell is skipped when its
nominal flops at 10% of the GEMM rate predict more than ``--max-seconds`` per step,
or when its warm-up step takes longer than that.

GFLOP/s are nominal: 9·N·M² flops per step (triangular solve, the (A S) product and
their gradients), against the GEMM rate measured here on a 2048² matrix product.
"""

import argparse
import os
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

D = 8


def data(n, m, dtype):
    rng = np.random.default_rng(0)
    X = rng.uniform(-2, 2, size=(n, D))
    y = np.sin(X[:, 0]) + 0.5 * np.cos(2 * X[:, 1]) + 0.1 * rng.normal(size=n)
    Z = X[rng.choice(n, m, replace=False)]
    return (jnp.asarray(a, dtype) for a in (X, y, Z))


def numpyro_step(X, y, Z):
    def model(X, y=None):
        kernel = ns.kernels.RBF(
            numpyro.param("variance", 1.0, constraint=dist.constraints.positive),
            numpyro.param("lengthscale", jnp.ones(D, X.dtype), constraint=dist.constraints.positive),
        )
        f = ns.svgp("f", kernel, X, numpyro.param("Z", Z))
        s2 = numpyro.param("noise_var", 0.1, constraint=dist.constraints.positive)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f, jnp.sqrt(s2)), obs=y)

    svi = SVI(model, ns.AutoSVGP(model), optax.adam(1e-2), ns.SVGP_ELBO())
    state = svi.init(random.PRNGKey(0), X, y)
    update = jax.jit(svi.update)

    def step(state):
        return update(state, X, y)

    return step, state


def plain_step(X, y, Z):
    """The same whitened SVGP ELBO and Adam step in plain JAX."""
    dtype, M = X.dtype, Z.shape[0]
    jitter = 1e-6 if dtype == jnp.float64 else 1e-4

    def rbf(a, b, var, ls):
        a, b = a / ls, b / ls
        d2 = jnp.sum((a[:, None, :] - b[None, :, :]) ** 2, -1)
        return var * jnp.exp(-0.5 * d2)

    def loss(p):
        var, ls, s2 = jnp.exp(p["log_var"]), jnp.exp(p["log_ls"]), jnp.exp(p["log_s2"])
        L = jnp.linalg.cholesky(rbf(p["Z"], p["Z"], var, ls) + jitter * jnp.eye(M, dtype=dtype))
        W = solve_triangular(L, rbf(p["Z"], X, var, ls), lower=True)
        S = jnp.tril(p["S"])
        mean = W.T @ p["m"]
        fvar = jnp.maximum(var - jnp.sum(W**2, 0), 0) + jnp.sum((W.T @ S) ** 2, 1)
        ell = -0.5 * jnp.sum(jnp.log(2 * jnp.pi * s2) + ((y - mean) ** 2 + fvar) / s2)
        kl = 0.5 * (jnp.sum(S**2) + jnp.sum(p["m"] ** 2) - M) - jnp.sum(jnp.log(jnp.abs(jnp.diag(S))))
        return kl - ell

    params = {"log_var": jnp.zeros((), dtype), "log_ls": jnp.zeros(D, dtype),
              "log_s2": jnp.log(jnp.asarray(0.1, dtype)), "Z": Z,
              "m": jnp.zeros(M, dtype), "S": jnp.eye(M, dtype=dtype)}
    optimizer = optax.adam(1e-2)

    @jax.jit
    def step(state):
        p, opt_state = state
        value, grads = jax.value_and_grad(loss)(p)
        updates, opt_state = optimizer.update(grads, opt_state)
        return (optax.apply_updates(p, updates), opt_state), value

    return step, (params, optimizer.init(params))


def time_steps(step, state, repeats, max_seconds):
    state, loss = step(state)  # compile
    jax.block_until_ready(loss)
    start = time.perf_counter()
    state, loss = step(state)  # warm up, and a first look at the cost
    jax.block_until_ready(loss)
    if time.perf_counter() - start > max_seconds:
        return None
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, loss = step(state)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - start)
        if times[0] > max_seconds:
            return None
    return statistics.median(times)


def gemm_gflops(dtype, size=2048, repeats=5):
    a = jnp.asarray(np.random.default_rng(0).normal(size=(size, size)), dtype)
    matmul = jax.jit(lambda a: a @ a)
    jax.block_until_ready(matmul(a))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a))
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def main(argv=None):
    parser = argparse.ArgumentParser(description="SVGP step time")
    parser.add_argument("--n", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--m", type=int, nargs="*", default=[64, 256, 1024])
    parser.add_argument("--dtype", nargs="*", default=["float64", "float32"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--max-seconds", type=float, default=2.0)
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} cores")
    print("| dtype | N | M | numpyro_svgp ms | plain JAX ms | ratio | nominal GFLOP/s | GEMM peak GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype_name in args.dtype:
        dtype = jnp.dtype(dtype_name)
        peak = gemm_gflops(dtype)
        for n in args.n:
            for m in args.m:
                if 9 * n * m**2 / (0.1 * peak * 1e9) > args.max_seconds:
                    print(f"| {dtype_name} | {n} | {m} | skipped (predicted > {args.max_seconds} s/step "
                          "at 10% of the GEMM rate) | | | | |")
                    continue
                X, y, Z = data(n, m, dtype)
                ours = time_steps(*numpyro_step(X, y, Z), args.repeats, args.max_seconds)
                plain = time_steps(*plain_step(X, y, Z), args.repeats, args.max_seconds)
                if ours is None or plain is None:
                    print(f"| {dtype_name} | {n} | {m} | skipped (> {args.max_seconds} s/step) | | | | |")
                    continue
                gflops = 9 * n * m**2 / ours / 1e9
                print(f"| {dtype_name} | {n} | {m} | {1e3 * ours:.1f} | {1e3 * plain:.1f} | "
                      f"{ours / plain:.2f} | {gflops:.1f} | {peak:.1f} |")
                sys.stdout.flush()


if __name__ == "__main__":
    main()
