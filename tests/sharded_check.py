"""Run by tests/test_sharding.py in a subprocess with 4 forced host devices:
prints JSON with single-device and sharded losses and gradients, for one GP and for GP
families (a group plate with its groups split over the devices, and ragged groups with
their rows split)."""

import json
import os
import re
import sys

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

N, M, D = 400, 12, 3


def gaussian(X, y=None):
    kernel = ns.kernels.RBF(
        numpyro.param("variance", 0.9, constraint=dist.constraints.positive),
        numpyro.param("lengthscale", jnp.ones(D), constraint=dist.constraints.positive),
    )
    f = ns.svgp("f", kernel, X, numpyro.param("Z", Z0))
    s2 = numpyro.param("noise_var", 0.1, constraint=dist.constraints.positive)
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Normal(f, jnp.sqrt(s2)), obs=y)


def bernoulli(X, y=None):
    kernel = ns.kernels.Matern32(
        numpyro.param("variance", 0.9, constraint=dist.constraints.positive),
        numpyro.param("lengthscale", 1.0, constraint=dist.constraints.positive),
    )
    f = ns.svgp("f", kernel, X, numpyro.param("Z", Z0))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=f), obs=y)


def family(X, y=None):
    """A GP per group, per-group X (G, n, D), Z and hyperparameters; G is X's leading axis."""
    groups, rows = X.shape[0], X.shape[1]
    positive = dist.constraints.positive
    with numpyro.plate("group", groups, dim=-2):
        kernel = ns.kernels.RBF(
            numpyro.param("variance", jnp.full((groups, 1), 0.9), constraint=positive),
            numpyro.param("lengthscale", jnp.ones((groups, 1, D)), constraint=positive),
        )
        f = ns.svgp("f", kernel, X, numpyro.param("Z", Z_GROUPS))
        s2 = numpyro.param("noise_var", 0.1, constraint=positive)
        with numpyro.plate("data", rows, dim=-1):
            numpyro.sample("y", dist.Normal(f, jnp.sqrt(s2)), obs=y)


def ragged(X, group, y=None):
    """A GP per group on rows of all groups at once: row n belongs to GP group[n]."""
    positive = dist.constraints.positive
    with numpyro.plate("group", GROUPS):
        kernel = ns.kernels.RBF(
            numpyro.param("variance", jnp.full(GROUPS, 0.9), constraint=positive),
            numpyro.param("lengthscale", jnp.ones((GROUPS, D)), constraint=positive),
        )
        f = ns.svgp("f", kernel, X, numpyro.param("Z", Z_GROUPS), group_index=group)
    s2 = numpyro.param("noise_var", 0.1, constraint=positive)
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Normal(f, jnp.sqrt(s2)), obs=y)


rng = np.random.default_rng(0)
X0 = rng.uniform(-2, 2, size=(N, D))
Z0 = jnp.asarray(X0[rng.choice(N, M, replace=False)] + 0.05)
Y_REAL = np.sin(X0[:, 0]) + 0.2 * rng.normal(size=N)
Y_BIN = (Y_REAL > 0).astype(float)
# the same rows as 4 groups of 100 (the plated family), and as rows of 4 groups of
# different sizes in no order (the ragged family)
GROUPS = 4
Z_GROUPS = jnp.asarray(rng.uniform(-2, 2, size=(GROUPS, M, D)))
GROUP_INDEX = rng.permutation(np.repeat(np.arange(GROUPS), [40, 160, 120, 80]))


def loss_and_grads(model, elbo, *data):
    guide = ns.AutoSVGP(model)
    svi = SVI(model, guide, optax.adam(1e-2), elbo)
    state = svi.init(random.PRNGKey(0), *data)
    params = svi.optim.get_params(state.optim_state)
    # perturb q(v) away from its initial value so that every gradient is non-trivial
    params["f_whitened_auto_loc"] = params["f_whitened_auto_loc"] + 0.3

    @jax.jit
    def value_and_grad(params, *data):
        def loss(p):
            constrained = svi.constrain_fn(p)
            return svi.loss.loss(random.PRNGKey(1), constrained, model, guide, *data)

        return jax.value_and_grad(loss)(params)

    # compiled once, ahead of time: the same executable gives the values and the HLO
    compiled = value_and_grad.lower(params, *data).compile()
    value, grads = compiled(params, *data)
    state, step_loss = jax.jit(svi.update)(state, *data)
    after = svi.get_params(state)
    return value, grads, after, compiled.as_text()


BLOCK_ROWS = 20  # the forced blocks: 20 blocks of 20 rows, 5 rows of each per device

CASES = (
    # name, model, y, rows per block (None: as chosen), matrix-product form allowed
    ("gaussian", gaussian, Y_REAL, None, True),
    ("bernoulli", bernoulli, Y_BIN, None, True),
    ("gaussian_blocked", gaussian, Y_REAL, BLOCK_ROWS, True),
    ("gaussian_blocked_per_point", gaussian, Y_REAL, BLOCK_ROWS, False),
)


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(v)) for v in jax.tree.leaves(tree)])


def compare(single, sharded):
    return {
        "loss": [float(single[0]), float(sharded[0])],
        "grad_max_abs_diff": float(np.max(np.abs(flat(single[1]) - flat(sharded[1])))),
        "grad_max_abs": float(np.max(np.abs(flat(single[1])))),
        "step_max_abs_diff": float(np.max(np.abs(flat(single[2]) - flat(sharded[2])))),
    }


def families(out):
    """The plated family with its groups split over the devices (shard_data splits the
    leading axis: a device holds whole groups), and the ragged family with its rows and
    their group indices split."""
    elbo = ns.SVGP_ELBO()
    rows = N // GROUPS
    X, y = X0.reshape(GROUPS, rows, D), Y_REAL.reshape(GROUPS, rows)
    single = loss_and_grads(family, elbo, jnp.asarray(X), jnp.asarray(y))
    Xs, ys = ns.shard_data(X, y)
    sharded = loss_and_grads(family, elbo, Xs, ys)
    out["family"] = {
        **compare(single, sharded),
        "input_sharding": str(Xs.sharding.spec),
        "all_reduce": "all-reduce" in sharded[3],
        # K_xz of one group per device, and nothing with all the groups' rows
        "per_device_rows": any(
            block in sharded[3] for block in (f"[1,{rows},{M}]", f"[1,{M},{rows}]")
        ),
        "full_rows_anywhere": re.search(rf"\[{GROUPS},{rows},{M}\]", sharded[3]) is not None,
    }
    data = (X0, GROUP_INDEX, Y_REAL)
    single = loss_and_grads(ragged, elbo, *(jnp.asarray(a) for a in data))
    placed = ns.shard_data(*data)
    sharded = loss_and_grads(ragged, elbo, *placed)
    out["ragged"] = {**compare(single, sharded), "input_sharding": str(placed[1].sharding.spec)}


def main():
    out = {"devices": len(jax.devices()), "x64": bool(jax.config.jax_enable_x64)}
    for name, model, y, rows, matrix_form in CASES:
        # N = 400 is one block by default: force blocks to see that they stay split
        elbo = ns.SVGP_ELBO(
            block_rows="auto" if rows is None else rows,
            gaussian_form="auto" if matrix_form else "per_point",
        )
        X, yy = jnp.asarray(X0), jnp.asarray(y)
        single = loss_and_grads(model, elbo, X, yy)
        Xs, ys = ns.shard_data(X0, y)
        sharded = loss_and_grads(model, elbo, Xs, ys)
        per_device = N // len(jax.devices()) if rows is None else rows // len(jax.devices())
        out[name] = {
            **compare(single, sharded),
            "input_sharding": str(Xs.sharding.spec),
            "all_reduce": "all-reduce" in sharded[3],
            # K_xz (per-point form) or K_zx (matrix-product form) in blocks of N/4 points,
            # or of a quarter of each forced block
            "per_device_rows": any(
                block in sharded[3] for block in (f"[{per_device},{M}]", f"[{M},{per_device}]")
            ),
            "full_rows_anywhere": re.search(rf"[\[,]{N}[,\]]", sharded[3]) is not None,
        }
    families(out)
    try:
        ns.shard_data(X0[:398], Y_REAL[:398])
    except ValueError as error:
        out["uneven_error"] = str(error)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
