"""Dataset layout the trainer reads and the central side writes (reviewed frames, labels export).

A dataset is class folders ``<root>/<class>/*.png|jpg`` (the folder name from ``folder_name``), or a
``path,label`` CSV, with the class names in order in ``labels.json`` beside it when they are known.
"""

from __future__ import annotations

import re
from pathlib import Path

LABELS_FILE = "labels.json"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}   # what a dataset or camera folder reads


def folder_name(label: str) -> str:
    """A class folder name for ``label``: characters a file system may refuse become ``_``."""
    return re.sub(r"[^A-Za-z0-9._ -]+", "_", label).strip() or "class"
