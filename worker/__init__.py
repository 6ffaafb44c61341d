"""DermaScan's Celery worker: the task bodies (batched scoring, heat maps, the sweeper,
completion callbacks) and the entry point. Imports Keras (through ``model``) inside the worker
child processes only, never at import time in the parent."""
