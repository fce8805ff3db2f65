"""Conversion of SVI output to an arviz ``InferenceData``.

SVI has no chains, so every sample array gets a leading chain axis of length 1.
Dimension names come from the model when it is given: batch axes are named after
the plates that made them, the whitened axis of an svgp site is
``"{name}_inducing"``, and an svgp output shares the dims of the first plated
site of the same shape (the likelihood over the same points), so ``f`` and ``y``
line up on one ``data`` axis.
"""

from typing import TYPE_CHECKING

import jax.numpy as jnp
import numpy as np
from numpyro.handlers import seed, trace

from numpyro_svgp._predict_y import pointwise_log_likelihood
from numpyro_svgp._svgp import svgp_site

if TYPE_CHECKING:
    # arviz (with xarray, pandas and matplotlib) takes seconds to import: only on use
    import arviz

__all__ = ["to_inference_data"]


def arviz_major() -> int:
    """The installed arviz's major version: 0 (``InferenceData``) or 1 (an xarray
    ``DataTree``, a different ``from_dict`` and the ``arviz-stats`` functions)."""
    import arviz

    return int(arviz.__version__.split(".")[0])


def _site_dims(model, args, kwargs) -> dict[str, list[str]]:
    model_trace = trace(seed(model, 0)).get_trace(*args, **kwargs)
    dims: dict[str, list[str]] = {}
    plated_dims: dict[tuple, list[str]] = {}
    outputs: dict[str, tuple] = {}
    for name, site in model_trace.items():
        if site["type"] != "sample":
            continue
        shape = jnp.shape(site["value"])
        names = [f"{name}_dim_{i}" for i in range(len(shape))]
        batch_ndim = len(shape) - site["fn"].event_dim
        for frame in site["cond_indep_stack"]:
            names[batch_ndim + frame.dim] = frame.name
        info = svgp_site(site)
        if info is not None:
            names[-1] = f"{info.output}_inducing"
            outputs[info.output] = jnp.shape(model_trace[info.output]["value"])
        dims[name] = names
        if site["cond_indep_stack"] and info is None:
            plated_dims.setdefault(shape, names)
    for output, shape in outputs.items():
        if shape in plated_dims:
            dims[output] = plated_dims[shape]
    return dims


def to_inference_data(
    posterior_samples: dict,
    *,
    posterior_predictive: dict | None = None,
    observed_data: dict | None = None,
    model=None,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    coords: dict | None = None,
    dims: dict | None = None,
    log_likelihood: bool = False,
    params: dict | None = None,
) -> "arviz.InferenceData":
    r"""Package SVI results for arviz: an :class:`arviz.InferenceData`, or with arviz 1.x
    the :class:`xarray.DataTree` that takes its place.

    Example::

        post = guide.sample_posterior(key, svi_result.params, sample_shape=(500,))
        pred = Predictive(model, guide=guide, params=svi_result.params, num_samples=500)(key, X)
        idata = ns.to_inference_data(
            post, posterior_predictive={"y": pred["y"], "f": pred["f"]},
            observed_data={"y": y}, model=model, model_args=(X,))
        az.summary(idata, var_names=["lengthscale"])
        az.plot_hdi(X[:, 0], idata.posterior_predictive["y"])

    Model comparison (PSIS-LOO, WAIC)::

        post = guide.sample_posterior(key, svi_result.params, sample_shape=(1000,))
        idata = ns.to_inference_data(post, model=model, model_args=(X, y),
                                     log_likelihood=True, params=svi_result.params)
        az.loo(idata)

    :param dict posterior_samples: site name to draws with a leading sample axis,
        e.g. from :meth:`AutoSVGP.sample_posterior` or ``Predictive(guide)``.
    :param dict posterior_predictive: site name to draws with a leading sample
        axis, e.g. from ``Predictive(model, guide=guide, params=...)``.
    :param dict observed_data: site name to observed values (no sample axis).
    :param model: the NumPyro model; if given, dims are named from its plates
        and svgp sites by tracing ``model(*model_args, **model_kwargs)``.
    :param dict coords: arviz coords, e.g. ``{"data": X[:, 0]}``.
    :param dict dims: arviz dims; override the ones derived from the model.
    :param bool log_likelihood: add a ``log_likelihood`` group: for each observed site and
        posterior draw, :math:`\log p(y_n \mid v_s, \theta_s)` with :math:`f_n` integrated
        over its conditional given the draw (see
        :func:`~numpyro_svgp.pointwise_log_likelihood`). ``posterior_samples`` must then
        hold every latent site, the whitened ones included, and ``model_args`` /
        ``model_kwargs`` the observations.
    :param dict params: the model's ``numpyro.param`` values (the SVI params), for
        ``log_likelihood``.
    :return: an :class:`arviz.InferenceData` (arviz 0.x) or an :class:`xarray.DataTree`
        (arviz 1.x) with groups ``posterior``, ``posterior_predictive``,
        ``observed_data`` and ``log_likelihood`` as given.
    """
    if log_likelihood and model is None:
        raise ValueError("to_inference_data(log_likelihood=True) needs the model (model=...).")
    derived = {} if model is None else _site_dims(model, model_args, model_kwargs or {})
    all_dims = {**derived, **(dims or {})}

    def with_chain(samples):
        return None if samples is None else {k: np.asarray(v)[None] for k, v in samples.items()}

    if not posterior_samples:
        raise ValueError("posterior_samples is empty.")
    sizes = {np.shape(v)[0] for v in posterior_samples.values()}
    if posterior_predictive:
        sizes |= {np.shape(v)[0] for v in posterior_predictive.values()}
    if len(sizes) > 1:
        raise ValueError(
            f"all sample arrays need the same number of draws on axis 0, got {sorted(sizes)}."
        )
    groups = {
        "posterior": with_chain(posterior_samples),
        "posterior_predictive": with_chain(posterior_predictive),
        "observed_data": None
        if observed_data is None
        else {k: np.asarray(v) for k, v in observed_data.items()},
        "log_likelihood": with_chain(
            pointwise_log_likelihood(
                model, posterior_samples, *model_args, params=params, **(model_kwargs or {})
            )
        )
        if log_likelihood
        else None,
    }
    present = {group: data for group, data in groups.items() if data is not None}
    used = {name for data in present.values() for name in data}
    # arviz (with xarray, pandas and matplotlib) takes seconds to import: only on use
    import arviz as az

    used_dims = {name: d for name, d in all_dims.items() if name in used}
    if arviz_major() >= 1:
        # arviz 1.x takes the groups as one dict and returns an xarray DataTree
        return az.from_dict(present, coords=coords, dims=used_dims)
    return az.from_dict(**present, coords=coords, dims=used_dims)
