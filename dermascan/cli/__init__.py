"""The ``dermascan`` command line.

Model commands (train, evaluate) import Keras inside the command, so ``dermascan web`` and the
other commands never load it. ``worker`` and ``web`` replace this process with Celery / gunicorn.

One module per command group: ``common`` (the group and shared helpers), ``database``,
``processes``, ``studies``, ``accounts``, ``destinations``, ``bundles``, ``model``, ``demo``.
"""

from dermascan.cli import accounts, bundles, database, demo, destinations, model, processes, studies  # noqa: F401  (register the commands)
from dermascan.cli.common import main

__all__ = ["main"]
