"""DermaScan's domain core: configuration, schema, blob storage, ingest (parsing), submission,
the sweeper, identity, the referral policy, the Celery app (names, queues, sending) and the CLI.

Nothing here imports ``web/`` or ``worker/``; Keras is only imported inside the CLI's model
commands, so the portal never loads it.
"""

__version__ = "0.1.0"
