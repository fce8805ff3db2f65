"""Time to the first result: import, first and second fit, against a plain NumPyro model.

Every measurement runs in a fresh Python process (so nothing is cached in memory);
the cases are interleaved over ``--repeats`` rounds and the medians reported.

- ``import``: ``import numpyro`` against ``import numpyro_svgp`` (which imports numpyro).
- ``svi.run``: the main example (``examples/standard_svgp.py``: N = 500, M = 20,
  AutoSVGP + SVGP_ELBO + Adam, float64) against a plain NumPyro model of the same size
  (AutoMultivariateNormal over a 20-dimensional latent, 500 Gaussian observations,
  Trace_ELBO + Adam): the first ``svi.run(800)`` (compilation included) and a
  second one in the same process.
- ``ns.train``: the same two models through ``ns.train(svi, key, 800, ...)``, first
  and second call.

Usage::

    python benchmarks/compile_time.py --repeats 5

The persistent compilation cache is not used unless ``--cache DIR`` is given. The
children run with ``PYTHONDONTWRITEBYTECODE`` unset, so imports read cached bytecode as
an installed package does (after a first warm-up round that is not counted).
``--cases import_numpyro import_svgp`` times a subset.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, sys, time
case, cache = sys.argv[1], sys.argv[2]
start = time.perf_counter()
if case == "import_numpyro":
    import numpyro
    print(json.dumps({"import": time.perf_counter() - start}))
    raise SystemExit
import numpyro_svgp as ns
if case == "import_svgp":
    print(json.dumps({"import": time.perf_counter() - start}))
    raise SystemExit
import jax
if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, numpyro, numpyro.distributions as dist, optax
from jax import random
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoMultivariateNormal
sys.path.insert(0, "examples")
from standard_svgp import make_data, make_model

kind, how = case.split("/")
if kind == "svgp":
    key, X, y, Z_init = make_data()
    model = make_model(Z_init)
    svi = SVI(model, ns.AutoSVGP(model), optax.adam(5e-2), ns.SVGP_ELBO())
else:
    key = random.PRNGKey(0)
    X = random.normal(random.PRNGKey(1), (500, 20))
    y = X @ random.normal(random.PRNGKey(2), (20,)) + 0.1 * random.normal(random.PRNGKey(3), (500,))

    def model(X, y=None):
        w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([20]).to_event(1))
        s = numpyro.param("noise", 0.5, constraint=dist.constraints.positive)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(X @ w, s), obs=y)

    svi = SVI(model, AutoMultivariateNormal(model), optax.adam(5e-2), Trace_ELBO())

times = []
for _ in range(2):
    t = time.perf_counter()
    if how == "run":
        result = svi.run(key, 800, X, y, progress_bar=False)
    else:
        result = ns.train(svi, key, 800, X, y, progress_bar=False)
    jax.block_until_ready(result.params)
    times.append(time.perf_counter() - t)
print(json.dumps({"first": times[0], "second": times[1]}))
"""

CASES = ["import_numpyro", "import_svgp", "plain/run", "svgp/run", "plain/train", "svgp/train"]


def run_child(case: str, cache: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, case, cache],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per case")
    parser.add_argument("--cache", default="", help="persistent compilation cache folder")
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    args = parser.parse_args(argv)
    results = {case: [] for case in args.cases}
    for case in ("import_numpyro", "import_svgp"):  # warm-up: writes the bytecode caches
        run_child(case, args.cache)
    for round_ in range(args.repeats):
        for case in args.cases:
            results[case].append(run_child(case, args.cache))
        print(f"round {round_ + 1}/{args.repeats} done", file=sys.stderr)

    def median(case, key):
        return statistics.median(r[key] for r in results[case])

    print(f"Medians over {args.repeats} fresh processes per case.\n")
    if {"import_numpyro", "import_svgp"} <= set(args.cases):
        imp_np, imp_ns = median("import_numpyro", "import"), median("import_svgp", "import")
        print("| what | numpyro | numpyro_svgp | difference |")
        print("|---|---|---|---|")
        print(f"| import, s | {imp_np:.2f} | {imp_ns:.2f} | {imp_ns - imp_np:+.2f} |\n")
    if any("/" in case for case in args.cases):
        print("| fit of 800 steps | plain NumPyro, s | SVGP example, s | ratio |")
        print("|---|---|---|---|")
    for how, label in (("run", "svi.run"), ("train", "ns.train")):
        if not {f"plain/{how}", f"svgp/{how}"} <= set(args.cases):
            continue
        for which in ("first", "second"):
            plain, ours = median(f"plain/{how}", which), median(f"svgp/{how}", which)
            print(f"| {which} `{label}` | {plain:.2f} | {ours:.2f} | {ours / plain:.2f} |")


if __name__ == "__main__":
    main()
