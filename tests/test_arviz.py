"""arviz conversion: groups, dims from plates and svgp sites, summary and HDI plots."""

import arviz as az
import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from jax import random  # noqa: E402
from numpyro.infer import SVI, Predictive  # noqa: E402

import numpyro_svgp as ns  # noqa: E402
from numpyro_svgp._arviz import arviz_major  # noqa: E402

from .helpers import toy_data  # noqa: E402

# arviz 1.x (Python >= 3.12) returns an xarray DataTree and moved the plots to arviz-plots
ARVIZ_1 = arviz_major() >= 1


@pytest.mark.slow
def test_to_inference_data_with_dims_summary_and_hdi():
    X, y = toy_data(80, seed=8)
    Z_init = np.linspace(-3, 3, 6)[:, None]

    def model(X, y=None):
        lengthscale = numpyro.sample("lengthscale", dist.LogNormal(0.0, 1.0))
        f = ns.svgp("f", ns.kernels.RBF(1.0, lengthscale), X, numpyro.param("Z", Z_init))
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f, 0.2), obs=y)

    guide = ns.AutoSVGP(model)
    svi = SVI(model, guide, optax.adam(3e-2), ns.SVGP_ELBO())
    result = svi.run(random.PRNGKey(0), 300, X, y, progress_bar=False)
    post = guide.sample_posterior(random.PRNGKey(1), result.params, sample_shape=(200,))
    pred = Predictive(model, guide=guide, params=result.params, num_samples=200)(
        random.PRNGKey(2), X
    )
    idata = ns.to_inference_data(
        post,
        posterior_predictive={"y": pred["y"], "f": pred["f"]},
        observed_data={"y": y},
        model=model,
        model_args=(X,),
    )
    groups = set(idata.children) if ARVIZ_1 else set(idata.groups())
    assert groups == {"posterior", "posterior_predictive", "observed_data"}
    assert idata.posterior["f_whitened"].dims == ("chain", "draw", "f_inducing")
    assert idata.posterior["lengthscale"].dims == ("chain", "draw")
    assert idata.posterior_predictive["y"].dims == ("chain", "draw", "data")
    assert idata.posterior_predictive["f"].dims == ("chain", "draw", "data")
    assert idata.observed_data["y"].dims == ("data",)
    np.testing.assert_array_equal(idata.observed_data["y"], y)

    summary = az.summary(idata, var_names=["lengthscale", "f_whitened"], kind="stats")
    assert summary.shape[0] == 1 + 6
    assert np.isclose(
        summary.loc["lengthscale", "mean"], float(np.mean(post["lengthscale"])), atol=1e-3
    )
    if ARVIZ_1:
        interval = np.asarray(az.hdi(idata.posterior_predictive["f"], prob=0.9))
        assert interval.shape == (X.shape[0], 2) and np.all(interval[:, 0] < interval[:, 1])
    else:
        ax = az.plot_hdi(X[:, 0], idata.posterior_predictive["f"], hdi_prob=0.9)
        assert ax is not None
        matplotlib.pyplot.close("all")


def test_to_inference_data_rejects_mismatched_draws():
    with pytest.raises(ValueError, match="same number of draws"):
        ns.to_inference_data({"a": np.zeros(10)}, posterior_predictive={"y": np.zeros((5, 3))})
