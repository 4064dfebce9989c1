"""Server-side training, evaluation and model-bundle export.

Nothing happens at import time; ``python -m trainer --help`` lists the commands.
"""
