"""DermaScan's Celery worker, one module per job:

- ``celery_app``: the entry point (the app, the process hooks that start the pulse and the warm-up)
- ``tasks``: the task bodies, each a few lines calling the room that does the work
- ``scoring``: a score task — claim, score in pieces, write in one transaction
- ``leases``: the studies this process's running tasks hold, and the heartbeat that renews them
- ``runtime``: this process's predictor (``model.inference``), its bundle and the shadow bundles
- ``warm``: every batch shape once before taking work, then Grad-CAM
- ``heatmaps``: heat maps of referred studies, after scoring
- ``metrics``: the worker's Prometheus metrics

Imports Keras (through ``model.inference``) inside the worker child processes only, never at
import time in the parent."""
