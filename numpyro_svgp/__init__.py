"""numpyro_svgp: sparse variational Gaussian processes as NumPyro submodels.

The maths lives in small pure functions (:func:`whitened_conditional`,
:func:`predictive_moments`, :func:`expected_log_likelihood`, :func:`kl`,
:func:`titsias_bound`); the NumPyro layer places sites (:func:`svgp`), guides them
(:class:`AutoSVGP`) and estimates the bound (:class:`SVGP_ELBO`).
"""

from numpyro_svgp import kernels
from numpyro_svgp._arviz import to_inference_data
from numpyro_svgp._checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from numpyro_svgp._collapsed import exact_log_marginal_likelihood, titsias_bound
from numpyro_svgp._conditional import (
    Conditional,
    conditional_variance,
    predictive_covariance,
    predictive_moments,
    projection,
    whitened_conditional,
)
from numpyro_svgp._diagnostics import (
    format_integration_report,
    integration_report,
    svgp_diagnostics,
)
from numpyro_svgp._elbo import SVGP_ELBO, kl
from numpyro_svgp._features import (
    FeatureInducingPoints,
    InducingFeatures,
    InducingPoints,
    SphericalHarmonicFeatures,
)
from numpyro_svgp._gaussian import (
    MATRIX_FORM_ROUNDOFF,
    expected_log_likelihood,
    gaussian_expected_log_likelihood,
)
from numpyro_svgp._guide import AutoSVGP
from numpyro_svgp._inducing import greedy_variance_inducing, kmeans_inducing
from numpyro_svgp._linalg import (
    MAX_JITTER_ESCALATIONS,
    cholesky_with_jitter,
    default_jitter,
    jittered_cholesky,
)
from numpyro_svgp._natgrad import natural_gradient
from numpyro_svgp._pathwise import pathwise
from numpyro_svgp._predict import held_out_log_likelihood, predict_f
from numpyro_svgp._predict_y import (
    StandardError,
    YPrediction,
    pointwise_log_likelihood,
    predict_log_density,
    predict_y,
)
from numpyro_svgp._sgpmc import sgpmc
from numpyro_svgp._sharding import data_sharding, shard_data
from numpyro_svgp._svgp import svgp
from numpyro_svgp._train import EpochsResult, TrainingStopped, TrainResult, train, train_epochs

__version__ = "0.1.0"

__all__ = [
    "MAX_JITTER_ESCALATIONS",
    "AutoSVGP",
    "CheckpointError",
    "EpochsResult",
    "FeatureInducingPoints",
    "InducingFeatures",
    "InducingPoints",
    "Conditional",
    "SVGP_ELBO",
    "SphericalHarmonicFeatures",
    "StandardError",
    "TrainResult",
    "TrainingStopped",
    "YPrediction",
    "cholesky_with_jitter",
    "conditional_variance",
    "data_sharding",
    "default_jitter",
    "exact_log_marginal_likelihood",
    "format_integration_report",
    "expected_log_likelihood",
    "gaussian_expected_log_likelihood",
    "MATRIX_FORM_ROUNDOFF",
    "greedy_variance_inducing",
    "held_out_log_likelihood",
    "integration_report",
    "jittered_cholesky",
    "kernels",
    "kmeans_inducing",
    "kl",
    "load_checkpoint",
    "natural_gradient",
    "pathwise",
    "pointwise_log_likelihood",
    "predict_f",
    "predict_log_density",
    "predict_y",
    "predictive_covariance",
    "predictive_moments",
    "projection",
    "save_checkpoint",
    "sgpmc",
    "shard_data",
    "svgp",
    "svgp_diagnostics",
    "titsias_bound",
    "to_inference_data",
    "train",
    "train_epochs",
    "whitened_conditional",
]
