"""Use a trained model: export it as a self-contained folder, load it in one call, predict brain
responses to new movies and contrast two of them (docs/predict.md).

Layer: above ``evaluation`` (reads checkpoints, the store's feature code, report figures), below
``train``; never imports DeepSpeed.
"""

from giblet_ds.pretrained.bundle import BundleError, FeatureWeightsError, PredictionError
from giblet_ds.pretrained.export import export_model
from giblet_ds.pretrained.features import StimulusFeatures, compute_features
from giblet_ds.pretrained.loading import Prediction, PretrainedModel, load_pretrained
from giblet_ds.pretrained.settings import FeatureSettings

__all__ = [
    "BundleError",
    "FeatureSettings",
    "FeatureWeightsError",
    "Prediction",
    "PredictionError",
    "PretrainedModel",
    "StimulusFeatures",
    "compute_features",
    "export_model",
    "load_pretrained",
]
