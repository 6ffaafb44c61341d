"""The inference room: everything a serving process needs to score a study with a bundle, and
nothing of training. It imports NumPy, Pillow, ONNX Runtime and onnx — Keras only in the modules that score
or draw with the Keras network, and only when asked to (a serving install has no Keras) — never
``model.training``; the worker, the core, ``edge/`` and the CLI's serving commands
import the model only through here (and ``model.metrics``, ``model.errors``).

- ``bundle``: the bundle folder, its manifest and checksums (``read_manifest`` needs no Keras)
- ``predictor``: batched scoring (pre_process → predict → post_process) on Keras or ONNX Runtime
- ``loader``: a bundle as a serving process's predictor, on the runtime it is asked for
- ``runtimes``: the ONNX file on ONNX Runtime or OpenVINO (used where it matches ONNX Runtime)
- ``data``: decoding and resizing images; the ISIC-2024 folder layout
- ``field``: a circular field of view's dark surround filled before the network (where a bundle asks)
- ``camera``: an exposure or colour cast outside the development images' range moved to its edge, after the
  quality measures and before the network (where a bundle asks)
- ``features``: the metadata feature spec (records → the network's metadata vector)
- ``calibration``: calibration maps (raw score → probability) and the reliability measures
- ``missing``: the maps for studies sent without some metadata
- ``diagnosis``: the seven classes of the differential, their labels and SNOMED CT codes
- ``network``: the fusion network and its custom layers (training builds it; a bundle loads it)
- ``gate``: the not-assessable verdict, from ``quality`` (image checks) and ``ood`` (feature distance, lesion check)
- ``quality``: exposure, contrast, blur, noise, colour and size checks on the model's input
- ``ood``: the feature distance and the is-this-dermoscopy check, on the network's image features
- ``change``: the lesion change measure between two visits
- ``reference``: the development data's profile and the drift measures monitoring compares with
- ``gradcam``: Grad-CAM heat maps (log-odds, finer cell, flip-averaged), on ONNX Runtime or Keras
- ``backprop``: Grad-CAM's gradient as an ONNX graph (the bundle's ONNX file extended backwards)
- ``heatmap``: the PNG overlays every heat map is drawn as
"""
