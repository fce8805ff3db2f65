"""float32 smoke tests, run in a subprocess because the suite enables x64 globally."""

import os
import subprocess
import sys
import textwrap

import pytest

from . import problems
from .conftest import subprocess_xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, numpyro, numpyro.distributions as dist, optax
    from jax import random
    from numpyro.infer import SVI, Predictive
    import numpyro_svgp as ns
    assert not jax.config.jax_enable_x64
    rng = np.random.default_rng(0)
    X = rng.uniform(-3, 3, size=(300, 1)).astype(np.float32)
    y = (np.sin(2 * X[:, 0]) + 0.15 * rng.normal(size=300)).astype(np.float32)
    def model(X, y=None):
        k = ns.kernels.Matern52(
            numpyro.param("variance", 1.0, constraint=dist.constraints.positive),
            numpyro.param("lengthscale", 0.6, constraint=dist.constraints.positive))
        f = ns.svgp(
            "f", k, X, numpyro.param("Z", jnp.linspace(-3, 3, 16, dtype=jnp.float32)[:, None])
        )
        s2 = numpyro.param("noise_var", 0.05, constraint=dist.constraints.positive)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f, jnp.sqrt(s2)), obs=y)
    guide = ns.AutoSVGP(model)
    res = SVI(model, guide, optax.adam(5e-2), ns.SVGP_ELBO()).run(
        random.PRNGKey(0), 1500, X, y, progress_bar=False
    )
    assert res.losses.dtype == jnp.float32, res.losses.dtype
    assert np.all(np.isfinite(res.losses))
    p = res.params
    assert all(v.dtype == jnp.float32 for v in p.values())
    bound = float(ns.titsias_bound(
        ns.kernels.Matern52(p["variance"], p["lengthscale"]), X, y, p["Z"], p["noise_var"]
    ))
    assert -float(res.losses[-1]) <= bound + 1e-3 * abs(bound)
    assert abs(-float(res.losses[-1]) - bound) < 0.01 * abs(bound), (res.losses[-1], bound)
    mean, var = ns.predict_f(model, guide, p, X[:10])
    assert mean.dtype == jnp.float32 and np.all(var > 0)
    assert ns.default_jitter(jnp.float32) == 1e-4
    print("float32 ok", float(res.losses[-1]), bound)
    """
)


@pytest.mark.slow
def test_float32_training_smoke():
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "float32 ok" in run.stdout


@pytest.mark.parametrize("name", list(problems.PROBLEMS))
@pytest.mark.slow
def test_float32_training_is_within_one_percent_of_float64(tmp_path, name):
    """The toy problem, banana classification and an M = 512 regression, one test each
    so that the test workers share them."""
    data = tmp_path / "toy.npz"
    problems.save_toy_data(data)
    runs = {
        flag: subprocess.Popen(
            [sys.executable, "-m", "tests.problems", str(data), name],
            cwd=ROOT,
            # compute-bound fits: at XLA's default optimisation
            env={
                **os.environ,
                "JAX_ENABLE_X64": flag,
                "XLA_FLAGS": subprocess_xla_flags(fast_compile=False),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for flag in ("1", "0")
    }
    results = {}
    for _flag, proc in runs.items():
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
        for line in out.strip().splitlines():
            problem, dtype, elbo = line.split()
            results[problem, dtype] = float(elbo)
    assert {key[0] for key in results} == {name}
    elbo64, elbo32 = results[name, "float64"], results[name, "float32"]
    assert abs(elbo32 - elbo64) <= 0.01 * abs(elbo64), (name, elbo32, elbo64)
