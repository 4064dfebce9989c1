"""Dataset layout the trainer reads and the central side writes (reviewed frames, labels export).

A dataset is class folders ``<root>/<class>/*.png|jpg`` (the folder name from ``folder_name``), or a
``path,label`` CSV, with the class names in order in ``labels.json`` beside it when they are known.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

LABELS_FILE = "labels.json"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}   # what a dataset or camera folder reads
MASK_SUFFIX = ".mask.png"     # ``<stem>.mask.png`` beside an image: the item's mask (station views), never a sample


def is_sample_image(path: Path) -> bool:
    """A sample's image file: an image that is not an item mask (``MASK_SUFFIX``) lying beside one."""
    return (path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.lower().endswith(MASK_SUFFIX)
            and path.is_file())


def folder_name(label: str) -> str:
    """A class folder name for ``label``: characters a file system may refuse become ``_``. Never empty, never
    ``.`` or ``..`` (the folder itself, its parent), never a hidden name (the trainer skips dot folders): a name
    that would start with ``.`` gets a ``_`` in front."""
    name = re.sub(r"[^A-Za-z0-9._ -]+", "_", label).strip() or "class"
    return "_" + name if name.startswith(".") else name


CLASS_NAME_MAX = 128    # the review page's label limit; decision payloads allow 256


def class_name_problem(name: object) -> str | None:
    """What makes ``name`` unfit to travel as a class name in manifests and every decision's payload, or
    None. One rule for the trainer's datasets, enrolment and the review page's labels."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, expected text"
    if any(unicodedata.category(c) == "Cs" for c in name):     # a lone surrogate: no UTF-8 encoding exists
        return "is not valid UTF-8; rename it"
    if not name.strip() or any(unicodedata.category(c) == "Cc" for c in name):
        return "is empty or holds control characters"
    if len(name) > CLASS_NAME_MAX:
        return f"is {len(name)} characters long, more than {CLASS_NAME_MAX}"
    return None
