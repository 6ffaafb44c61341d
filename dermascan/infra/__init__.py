"""Infrastructure: what every room stands on and no room's rules live in — the database engine and
sessions (``db``), the typed schema (``schema``) and its migrations (``migrate``), the
content-addressed blob store for images and heat maps (``blobs``: a folder or S3-compatible object
storage) and the broker app (``broker``: the Celery app, queue names, routing, sending tasks by
name). It imports only ``dermascan.config`` and ``dermascan.errors``: a change of database, store or
broker stays in this room."""
