"""Bundle save/load: JSON + safetensors, validated, atomic, no pickle."""
import json
import os

import pytest
import torch

from edgead.bundle import CONFIG_NAME, WEIGHTS_NAME, load_bundle
from edgead.errors import BundleError

from conftest import random_frames


@pytest.fixture()
def saved(tiny_bundle, tmp_path):
    folder = str(tmp_path / "bundle")
    tiny_bundle.save(folder)
    return folder


def test_roundtrip_gives_identical_scores(tiny_bundle, saved):
    loaded = load_bundle(saved)
    frames = torch.from_numpy(random_frames(2, seed=3))
    with torch.no_grad():
        a = tiny_bundle.model()(frames)
        b = loaded.model()(frames)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    config = json.load(open(os.path.join(saved, CONFIG_NAME)))
    assert config["method"] == "padim" and config["padim"]["n_train"] == 12
    assert len(config["embedding"]["channel_indices"]) == 24 and config["embedding"]["grid"] == [16, 16]
    assert sorted(os.listdir(saved)) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp files left behind


def test_truncated_weights_are_rejected(saved):
    path = os.path.join(saved, WEIGHTS_NAME)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(BundleError, match=WEIGHTS_NAME):
        load_bundle(saved)


def test_corrupt_weights_without_checksum_are_rejected(saved):
    cfg_path = os.path.join(saved, CONFIG_NAME)
    config = json.load(open(cfg_path))
    del config["weights_sha256"]
    json.dump(config, open(cfg_path, "w"))
    open(os.path.join(saved, WEIGHTS_NAME), "wb").write(b"\x00" * 100)
    with pytest.raises(BundleError, match="cannot read safetensors"):
        load_bundle(saved)


def test_invalid_json_and_missing_fields(saved):
    cfg_path = os.path.join(saved, CONFIG_NAME)
    good = open(cfg_path).read()
    open(cfg_path, "w").write(good[:-20])
    with pytest.raises(BundleError, match="invalid JSON"):
        load_bundle(saved)
    config = json.loads(good)
    del config["embedding"]["grid"]
    open(cfg_path, "w").write(json.dumps(config))
    with pytest.raises(BundleError, match="embedding.grid"):
        load_bundle(saved)


def test_mismatched_config_and_weights(saved):
    cfg_path = os.path.join(saved, CONFIG_NAME)
    config = json.load(open(cfg_path))
    config["embedding"]["channel_indices"] = config["embedding"]["channel_indices"][:-1]
    open(cfg_path, "w").write(json.dumps(config))
    with pytest.raises(BundleError, match="padim.mean has shape"):
        load_bundle(saved)


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(BundleError, match="not a bundle folder"):
        load_bundle(str(tmp_path / "nothing"))
    with pytest.raises(BundleError, match=CONFIG_NAME):
        load_bundle(str(tmp_path))


def test_failed_save_keeps_previous_bundle(tiny_bundle, saved, monkeypatch):
    before = open(os.path.join(saved, WEIGHTS_NAME), "rb").read()
    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        tiny_bundle.save(saved)
    assert open(os.path.join(saved, WEIGHTS_NAME), "rb").read() == before
    assert sorted(os.listdir(saved)) == [CONFIG_NAME, WEIGHTS_NAME]
    load_bundle(saved)
