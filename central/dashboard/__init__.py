"""Central dashboard: one MQTT subscription for the whole warehouse, served as a live web page.

``python -m central dashboard`` (docs/dashboard.md). ``state`` is the pure model built from the
messages, ``feed`` the MQTT subscriber, ``server`` the HTTP page, JSON snapshot and
Server-Sent Events stream. Imports no torch; nothing happens at import time.
"""
