"""Torch-free services on the central host: ``python -m central <verb>``.

- ``review``: ingest of the frames stations send back, their store, the review page and API, labels export
- ``rollout``: publish, serve bundles, canary rollout and rollback over MQTT
- ``dashboard``: the live warehouse page from the stations' MQTT topics

Stands on ``contract`` only; it never imports ``trainer`` or torch (tests/central checks this).
"""
