"""Data parallelism: on 4 forced CPU devices, the loss, gradients and one SVI step
with X, y split along N equal the single-device ones, and the compiled program
really works on N/4 rows per device (no all-gather of the data); the same for GP
families, split by groups or by rows."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import numpyro_svgp as ns

from .conftest import once_per_run, subprocess_xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sharded_check():
    env = {
        **os.environ,
        "XLA_FLAGS": subprocess_xla_flags("--xla_force_host_platform_device_count=4"),
        "JAX_ENABLE_X64": "1",
        "JAX_PLATFORMS": "cpu",
    }
    run = subprocess.run(
        [sys.executable, "-m", "tests.sharded_check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def report():
    # one run of the four-device subprocess for all workers
    return once_per_run("sharded_check", _sharded_check)


# "family": a plated family with its groups split over the devices (each holds whole
# groups); "ragged": a ragged family with its rows and their group indices split
@pytest.mark.parametrize(
    "likelihood",
    ["gaussian", "bernoulli", "gaussian_blocked", "gaussian_blocked_per_point", "family", "ragged"],
)
@pytest.mark.slow
def test_sharded_loss_gradients_and_step_equal_single_device(report, likelihood):
    assert report["devices"] == 4 and report["x64"]
    r = report[likelihood]
    single, sharded = r["loss"]
    assert sharded == pytest.approx(single, rel=1e-12)
    assert r["grad_max_abs"] > 1.0
    assert r["grad_max_abs_diff"] <= 1e-12 * r["grad_max_abs"]
    assert r["step_max_abs_diff"] <= 1e-12
    assert r["input_sharding"] == "P('data',)"


@pytest.mark.parametrize(
    "likelihood", ["gaussian", "bernoulli", "gaussian_blocked", "gaussian_blocked_per_point"]
)
@pytest.mark.slow
def test_data_term_is_split_along_n(report, likelihood):
    r = report[likelihood]
    assert r["per_device_rows"]  # K_xz or K_zx in blocks of N/4 points
    assert not r["full_rows_anywhere"]  # nothing of length N is gathered
    assert r["all_reduce"]  # sums over N meet the replicated O(M^3) part


@pytest.mark.slow
def test_shard_data_refuses_uneven_splits_and_mismatched_arrays(report):
    import jax

    assert "N = 398 data points cannot be split evenly over 4 devices" in report["uneven_error"]
    devices = jax.devices()[:1]
    with pytest.raises(ValueError, match="leading"):
        ns.shard_data(np.zeros((4, 2)), np.zeros(5), devices=devices)
    with pytest.raises(ValueError, match="at least one array"):
        ns.shard_data()
    X = ns.shard_data(np.zeros((3, 2)), devices=devices)
    assert X.shape == (3, 2)


@pytest.mark.slow
def test_a_plated_family_is_split_by_groups(report):
    r = report["family"]
    assert r["per_device_rows"]  # K_xz of one group per device
    assert not r["full_rows_anywhere"]  # no array with every group's rows
    assert r["all_reduce"]  # the groups' sums meet the shared noise's gradient
