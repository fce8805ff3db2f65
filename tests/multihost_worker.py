"""One process of a data-parallel fit: ``python -m tests.multihost_worker PROCESS_ID
NUM_PROCESSES PORT``. With several processes each joins ``jax.distributed`` on localhost
(CPU collectives through gloo) and holds only its own rows; it prints the first loss and
the params after 20 Adam steps as JSON (process 0). Run by tests/test_multihost.py."""

import json
import sys

import jax

jax.config.update("jax_enable_x64", True)
PROCESS_ID, NUM_PROCESSES, PORT = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if NUM_PROCESSES > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"localhost:{PORT}", num_processes=NUM_PROCESSES, process_id=PROCESS_ID
    )

import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
import optax  # noqa: E402
from jax import random  # noqa: E402
from numpyro.infer import SVI  # noqa: E402

import numpyro_svgp as ns  # noqa: E402

N = 200
rng = np.random.default_rng(0)
X = rng.uniform(-3, 3, size=(N, 1))
y = np.sin(2 * X[:, 0]) + 0.1 * rng.normal(size=N)
Z = np.linspace(-3, 3, 10)[:, None]
positive = dist.constraints.positive


def model(X, y=None):
    kernel = ns.kernels.RBF(
        numpyro.param("variance", 1.0, constraint=positive),
        numpyro.param("lengthscale", 1.0, constraint=positive),
    )
    f = ns.svgp("f", kernel, X, numpyro.param("Z", Z))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Normal(f, numpyro.param("noise", 0.3, constraint=positive)), obs=y)


# this process's rows only, as on a real host; the global arrays span every process
rows = slice(PROCESS_ID * N // NUM_PROCESSES, (PROCESS_ID + 1) * N // NUM_PROCESSES)
sharding = ns.data_sharding()
X_global = jax.make_array_from_process_local_data(sharding, X[rows], (N, 1))
y_global = jax.make_array_from_process_local_data(sharding, y[rows], (N,))
svi = SVI(model, ns.AutoSVGP(model), optax.adam(0.05), ns.SVGP_ELBO())
state = svi.init(random.PRNGKey(0), X[:8], y[:8])  # the params' shapes need no data rows
update = jax.jit(svi.update)
losses = []
for _ in range(20):
    state, loss = update(state, X_global, y_global)
    losses.append(float(loss))
params = {
    name: np.asarray(value.addressable_data(0)).tolist()
    for name, value in svi.get_params(state).items()
}
if PROCESS_ID == 0:
    print(
        json.dumps(
            {
                "devices": jax.device_count(),
                "processes": jax.process_count(),
                "losses": losses,
                "params": params,
            }
        )
    )
