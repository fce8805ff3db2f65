"""Several hosts for real: two processes on localhost joined by jax.distributed (CPU
collectives through gloo), each holding half the rows, train 20 steps of the README's
multi-host recipe; the result is compared with one process holding all the rows."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from .conftest import subprocess_xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run(num_processes, devices_per_process=1):
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": subprocess_xla_flags(
            f"--xla_force_host_platform_device_count={devices_per_process}"
        ),
    }
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.multihost_worker", str(i), str(num_processes), port],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(num_processes)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return json.loads(outputs[0][0].strip().splitlines()[-1])


@pytest.mark.slow
def test_two_processes_with_half_the_rows_each_train_as_one_process_on_all_rows():
    two = _run(2)
    assert two["processes"] == 2 and two["devices"] == 2
    # one process holding all rows, on the same two-device layout: the same program,
    # and a sum of two partial sums is the same in either order
    same_layout = _run(1, devices_per_process=2)
    assert same_layout["processes"] == 1 and same_layout["devices"] == 2
    assert two["losses"] == same_layout["losses"]
    for name, value in two["params"].items():
        np.testing.assert_array_equal(value, same_layout["params"][name], err_msg=name)
    # one process, one device: the sums over rows run in another order
    one = _run(1)
    assert one["devices"] == 1
    assert two["losses"][0] == pytest.approx(one["losses"][0], rel=1e-13)
    for name, value in two["params"].items():
        np.testing.assert_allclose(value, one["params"][name], rtol=0, atol=1e-8, err_msg=name)
