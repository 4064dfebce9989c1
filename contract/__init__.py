"""The contract between the station, the trainer and the central side (ARCHITECTURE.md sections 3-5).

Torch-free, and it imports nothing else of ours: the model bundle and its ``InputSpec``
(``bundle``, ``preprocess``), the MQTT topics and payload schemas (``messages``), how to reach the
broker (``broker``), and secrets read from files (``secrets``). ``agent``, ``trainer`` and
``central`` all stand on it.
"""
