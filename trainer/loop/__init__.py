"""The retraining loop on the central side.

- ``store``: durable store of the low-confidence frames stations send back (JPEG files + SQLite index)
- ``ingest``: the MQTT service that fills it (``python -m trainer ingest``)
- ``api``: the review page and its HTTP API (``python -m trainer review``)
- ``dataset``: reviewed frames -> a dataset the trainer reads, with provenance (``python -m trainer labels export``)
- ``retrain``: the next version from base + reviewed data, gated against the current one
- ``rollout``: publish, serve, canary -> rest, rollback over MQTT
"""
