"""Tests run in float64; the float32 smoke tests switch precision locally.

Tests marked ``slow`` (long trainings, float32-against-float64 fits, examples,
subprocess runs) are skipped unless ``--run-slow`` is given: ``pytest -q`` is the
quick check, ``pytest -q --run-slow`` the full suite that CI runs.
"""

import jax
import pytest

jax.config.update("jax_enable_x64", True)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
