"""Peak memory of mini-batch SVGP training from host arrays.

N = 10⁶ points in D = 8 stay in host memory (NumPy); ``ns.train_epochs`` sends
``--steps-per-call`` batches of B = 1024 rows at a time to the device, M = 512
inducing points (k-means on a 10⁵-row subsample), float64. Run it under
``/usr/bin/time -v`` and read "Maximum resident set size"::

    /usr/bin/time -v python benchmarks/memory.py 2>&1 | grep -E "Maximum resident|peak"

The script also prints its own peak RSS (``resource.getrusage``), the size of the
host data and the final loss.
"""

import argparse
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from jax import random
from numpyro.infer import SVI

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpyro_svgp as ns  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=8)
    parser.add_argument("--m", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps-per-call", type=int, default=50)
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)

    rng = np.random.default_rng(0)
    X = rng.uniform(-2.0, 2.0, size=(args.n, args.d))
    y = np.sin(X[:, 0]) * np.cos(X[:, 1]) + 0.3 * X[:, 2] + 0.1 * rng.normal(size=args.n)
    Z0 = ns.kmeans_inducing(
        random.PRNGKey(0), X[rng.choice(args.n, min(args.n, 100_000), replace=False)], args.m
    )

    def model(X, y=None, num_data=None):
        kernel = ns.kernels.RBF(
            numpyro.param("variance", 1.0, constraint=dist.constraints.positive),
            numpyro.param("lengthscale", jnp.ones(args.d), constraint=dist.constraints.positive),
        )
        f = ns.svgp("f", kernel, X, numpyro.param("Z", Z0))
        noise_var = numpyro.param("noise_var", 0.01, constraint=dist.constraints.positive)
        with numpyro.plate("data", num_data, subsample_size=X.shape[0]):
            numpyro.sample("y", dist.Normal(f, jnp.sqrt(noise_var)), obs=y)

    svi = SVI(model, ns.AutoSVGP(model), optax.adam(1e-2), ns.SVGP_ELBO())
    start = time.perf_counter()
    result = ns.train_epochs(
        svi,
        random.PRNGKey(1),
        args.epochs,
        X,
        y,
        batch_size=args.batch,
        num_data=args.n,
        steps_per_call=args.steps_per_call,
        progress_bar=False,
    )
    seconds = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(
        f"N = {args.n}, D = {args.d}, M = {args.m}, B = {args.batch}, float64: "
        f"{len(result.losses)} steps in {seconds:.1f} s, final loss {result.losses[-1]:.6g}"
    )
    print(f"host data {(X.nbytes + y.nbytes) / 2**20:.0f} MiB; peak RSS {peak_gib:.2f} GiB")


if __name__ == "__main__":
    main()
