"""Frames stations send back, and their review.

- ``store``: durable store of the low-confidence frames (JPEG files + SQLite index)
- ``ingest``: the MQTT service that fills it (``python -m central ingest``)
- ``api``: the review page and its HTTP API (``python -m central review``)
- ``labels``: reviewed frames -> a dataset the trainer reads, with provenance (``python -m central labels export``)
- ``backgrounds``: the empty-scene frames stations captured -> a background folder for training
  (``python -m central backgrounds export``)
"""
