"""DermaScan at the edge: score a lesion image on a tablet or a handheld dermoscope, without
TensorFlow, a database or a network.

An edge package is a folder ``dermascan export`` writes from a bundle (an ONNX or LiteRT file and
a manifest that carries the metadata encoding, the calibration map, the threshold, the flips
setting and the not-assessable gate). :class:`edge.scorer.EdgeScorer` (``scorer``) scores with it
exactly as the server's Predictor scores with the bundle; ``dermascan-edge score`` (``cli``) is the
command. Imports: numpy,
Pillow, and onnxruntime or ai-edge-litert — plus DermaScan's own pure-Python parts (the
metadata rules, the gate's arithmetic), nothing of the server.
"""
