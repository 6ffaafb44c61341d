"""The training room: everything that makes or checks a bundle. It stands on ``model.inference``
(the network it trains, the bundle format it writes, the predictor it evaluates) and nothing of
the application; no serving process imports it.

- ``config``: a training run's settings and the patient-grouped split (folds, calibration set)
- ``folds``: training one fold network (resumable), test-time flips, cross-validation and its summary
- ``threshold``: the referral threshold rule, in one place
- ``assemble``: a bundle from finished networks: calibration, threshold, gate, change measure, manifest
- ``gate_fit``: fitting the not-assessable gate and the lesion change measure
- ``train``: ``dermascan train`` end to end (cross-validate, then assemble)
- ``combine``: one bundle from several training runs on the same split
- ``distill``: one student network taught by an ensemble
- ``warm_start``: a new network starting from the weights of an earlier one of the same backbone
- ``evaluate``: a bundle on any ISIC-2024 folder
- ``export``: edge packages (ONNX, LiteRT; fp32, int8) with their own check
- ``gate_data``: the non-lesion images the gate is fitted and checked on
- ``missing_fit``: a bundle's maps for missing metadata, fitted on its held-out rows
- ``diagnosis_fit``: a bundle's differential head refitted on its network's fused features and a pooled
  earlier cell
- ``camera_fit``: a bundle's camera clamp, its ranges taken on the development images
- ``heatmaps``: how well heat maps point at the lesion (pointing game, concentration), with a gallery
"""
