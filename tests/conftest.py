"""Tests run in float64; the float32 smoke tests switch precision locally.

Tests marked ``slow`` (long trainings, float32-against-float64 fits, examples,
subprocess runs) are skipped unless ``--run-slow`` is given: ``pytest -q`` is the
quick check, ``pytest -q --run-slow`` the full suite that CI runs.
"""

import fcntl
import json
import os
import shutil
import tempfile
import uuid

# One OpenBLAS thread per process (a user's setting is kept). The suite runs two test
# workers on two cores, and XLA's CPU LAPACK calls (Cholesky, triangular solves) go
# through SciPy's OpenBLAS, whose threads then compete with XLA's own: the M = 512 fit
# of tests/test_float32.py took 195 s of CPU with the default threads and 127 s with
# one. It must be in the environment before NumPy loads OpenBLAS; the subprocesses
# inherit it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)

# Test programs are small and most are compiled once, so XLA's backend (LLVM) optimisation
# costs more time than it saves: level 0 took a fifth off the quick suite. It is a setting
# of the test run, not of the library. A level the user set is kept; the compute-bound
# float32 fits (tests/test_float32.py) drop it for XLA's default. It must be in the
# environment before the backend starts, and it reaches the subprocesses through it.
FAST_COMPILE = "--xla_backend_optimization_level=0"
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()


def subprocess_xla_flags(*extra: str, fast_compile: bool = True) -> str:
    """``XLA_FLAGS`` for a test's subprocess: this run's flags plus ``extra``, without
    the test run's optimisation level where ``fast_compile`` is false."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    if not fast_compile:
        flags = [flag for flag in flags if flag != FAST_COMPILE]
    return " ".join([*flags, *extra])


# One persistent compilation cache per test run, shared by the xdist workers and the
# subprocesses they start (through the environment): NumPyro's initialisation runs the
# model outside jit, and every process would otherwise compile the same few hundred
# single-primitive programs again. A user's JAX_COMPILATION_CACHE_DIR is left alone.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or os.environ.setdefault(
    "NUMPYRO_SVGP_TEST_RUN", uuid.uuid4().hex
)
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"numpyro_svgp_test_cache_{_RUN}"
    )
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_configure(config):
    # xdist's workers take the controller's run id, so that the controller finds (and
    # removes) the files they share
    if config.pluginmanager.hasplugin("xdist") and config.option.testrunuid is None:
        config.option.testrunuid = _RUN


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


_SHARED = os.path.join(tempfile.gettempdir(), f"numpyro_svgp_test_shared_{_RUN}")


def once_per_run(name: str, compute):
    """``compute()`` (JSON-serialisable) once per test run, shared by the xdist workers:
    the first worker to ask computes it while the others wait for its result."""
    os.makedirs(_SHARED, exist_ok=True)
    path = os.path.join(_SHARED, f"{name}.json")
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(path):
            result = compute()
            with open(path + ".tmp", "w") as f:
                json.dump(result, f)
            os.replace(path + ".tmp", path)
        with open(path) as f:
            return json.load(f)


def pytest_sessionfinish(session):
    # the controller (or a run without xdist) removes the run's files; workers leave them
    if "PYTEST_XDIST_WORKER" not in os.environ:
        shutil.rmtree(_SHARED, ignore_errors=True)
        if _OWN_CACHE:
            shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
