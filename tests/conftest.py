"""Tests run in float64; the float32 smoke tests switch precision locally."""

import jax

jax.config.update("jax_enable_x64", True)
