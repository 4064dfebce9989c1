"""On-device agent: cameras -> model bundle -> decisions -> MQTT, through a durable outbox.

Imports no torch. Nothing happens at import time.
"""
