"""DermaScan's model package: features, network, ISIC-2024 data, training, metrics,
bundles, batched prediction and Grad-CAM.

Self-contained on purpose: nothing here imports the database, Celery or Flask, and Keras is
only imported by the modules that need it (``network``, ``train``, ``bundle``, ``predictor``,
``gradcam``), so ``model.inference.features`` and ``model.metrics`` are cheap to import anywhere.
"""

__all__ = ["FeatureSpec", "ModelError"]

from model.errors import ModelError
from model.inference.features import FeatureSpec
