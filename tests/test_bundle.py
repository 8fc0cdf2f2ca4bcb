"""Bundle save/load: JSON + safetensors, validated, atomic, no pickle."""
import json
import os

import numpy as np
import pytest
import torch

from edgead.bundle import CONFIG_NAME, load_bundle, weights_file_path
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
    assert sorted(os.listdir(saved)) == [CONFIG_NAME, os.path.basename(weights_file_path(saved))]  # no temp files


def test_truncated_weights_are_rejected(saved):
    path = weights_file_path(saved)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(BundleError, match=os.path.basename(path)):
        load_bundle(saved)


def test_bundle_without_checksum_is_refused(saved):
    """The checksum is mandatory: without it a swapped or corrupt weights file would load unnoticed."""
    cfg_path = os.path.join(saved, CONFIG_NAME)
    config = json.load(open(cfg_path))
    del config["weights_sha256"]
    json.dump(config, open(cfg_path, "w"))
    with pytest.raises(BundleError, match="weights_sha256"):
        load_bundle(saved)


def test_garbage_weights_with_matching_checksum_are_rejected(saved):
    import hashlib

    cfg_path = os.path.join(saved, CONFIG_NAME)
    config = json.load(open(cfg_path))
    open(weights_file_path(saved), "wb").write(b"\x00" * 100)
    config["weights_sha256"] = hashlib.sha256(b"\x00" * 100).hexdigest()
    json.dump(config, open(cfg_path, "w"))
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
    config["embedding"]["dim"] -= 1  # consistent model.json, weights of another D
    open(cfg_path, "w").write(json.dumps(config))
    with pytest.raises(BundleError, match="padim.mean has shape"):
        load_bundle(saved)


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(BundleError, match="not a bundle folder"):
        load_bundle(str(tmp_path / "nothing"))
    with pytest.raises(BundleError, match=CONFIG_NAME):
        load_bundle(str(tmp_path))


def test_failed_save_keeps_previous_bundle(tiny_bundle, saved, monkeypatch):
    listing = sorted(os.listdir(saved))
    before = open(weights_file_path(saved), "rb").read()
    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        tiny_bundle.save(saved)
    assert open(weights_file_path(saved), "rb").read() == before
    assert sorted(os.listdir(saved)) == listing
    load_bundle(saved)


def test_weights_and_config_get_the_same_file_mode(saved):
    """safetensors writes 0600; the bundle's files get what open() would give (0666 & ~umask)."""
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(saved):
        assert os.stat(os.path.join(saved, name)).st_mode & 0o777 == 0o666 & ~umask, name


def test_weights_file_is_content_addressed_and_named_in_model_json(saved):
    import hashlib

    config = json.load(open(os.path.join(saved, CONFIG_NAME)))
    digest = hashlib.sha256(open(os.path.join(saved, config["weights_file"]), "rb").read()).hexdigest()
    assert config["weights_sha256"] == digest
    assert config["weights_file"] == "weights-{}.safetensors".format(digest[:16])


def test_bundle_channels_must_be_those_of_the_network(saved):
    """model.json naming other stage channels than the network has would index out of range at run time."""
    cfg_path = os.path.join(saved, CONFIG_NAME)
    config = json.load(open(cfg_path))
    config["backbone"]["channels"] = [64, 128, 300]
    json.dump(config, open(cfg_path, "w"))
    with pytest.raises(BundleError, match="differ from the resnet18 network"):
        load_bundle(saved)


def test_a_save_waits_for_a_bundle_being_read(tiny_bundle, saved, monkeypatch):
    """A reader holds a shared lock from model.json to the end of the weights: a concurrent save (another
    process) waits, so it cannot remove the weights file the reader's model.json names half-way."""
    import subprocess
    import sys
    import time

    from edgead import bundle as bundle_module

    code = ("import sys\nfrom edgead.bundle import load_bundle\nb = load_bundle({0!r})\nb.mean = b.mean + 1.0\n"
            "print('saving', flush=True)\nb.save({0!r})\n").format(saved)
    real_sha256, writers = bundle_module._sha256, []

    def hash_while_a_save_starts(path):
        if not writers:  # model.json is read; now another process saves over this bundle
            writers.append(subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE))
            assert writers[0].stdout.readline() == b"saving\n"
            time.sleep(1.5)  # a tiny save takes < 0.5 s: without the lock it would be done, old weights gone
        return real_sha256(path)

    monkeypatch.setattr(bundle_module, "_sha256", hash_while_a_save_starts)
    assert torch.equal(load_bundle(saved).mean, tiny_bundle.mean)
    assert writers[0].wait(timeout=120) == 0
    monkeypatch.undo()
    assert torch.equal(load_bundle(saved).mean, tiny_bundle.mean + 1.0)


def test_edgead_01_bundle_loads_and_resave_switches_to_the_new_layout(tiny_bundle, saved):
    """An edgead 0.1 bundle (weights.safetensors, no weights_file key) loads; saving over it leaves one
    weights file, the new one, and no leftovers."""
    cfg_path = os.path.join(saved, CONFIG_NAME)
    config = json.load(open(cfg_path))
    os.rename(os.path.join(saved, config.pop("weights_file")), os.path.join(saved, "weights.safetensors"))
    json.dump(config, open(cfg_path, "w"))
    old = load_bundle(saved)
    assert torch.equal(old.mean, tiny_bundle.mean)
    old.mean = old.mean + 1.0
    old.save(saved)
    names = sorted(os.listdir(saved))
    assert names == [CONFIG_NAME, os.path.basename(weights_file_path(saved))] and "weights.safetensors" not in names
    assert torch.equal(load_bundle(saved).mean, tiny_bundle.mean + 1.0)


def test_save_removes_what_crashed_saves_left(tiny_bundle, saved):
    leftovers = [".weights.abc123.tmp.safetensors", ".model.x9y8.tmp.json", "weights-0123456789abcdef.safetensors"]
    for name in leftovers:
        open(os.path.join(saved, name), "wb").write(b"partial")
    load_bundle(saved)  # a crashed save's leftovers do not disturb loading
    tiny_bundle.save(saved)
    assert sorted(os.listdir(saved)) == [CONFIG_NAME, os.path.basename(weights_file_path(saved))]


@pytest.mark.parametrize("weights_file", ["../weights.safetensors", "/etc/passwd", "weights-xyz.safetensors", 7])
def test_weights_file_outside_the_bundle_is_refused(saved, weights_file):
    cfg_path = os.path.join(saved, CONFIG_NAME)
    config = json.load(open(cfg_path))
    config["weights_file"] = weights_file
    json.dump(config, open(cfg_path, "w"))
    with pytest.raises(BundleError, match="weights_file"):
        load_bundle(saved)


def test_save_refuses_a_file_or_a_folder_that_is_not_a_bundle(tiny_bundle, tmp_path):
    data = tmp_path / "images"
    data.mkdir()
    (data / "good_000.png").write_bytes(b"not ours")
    with pytest.raises(BundleError, match="not an edgead bundle.*good_000.png"):
        tiny_bundle.save(str(data))
    assert sorted(os.listdir(data)) == ["good_000.png"]
    target = tmp_path / "model.onnx"
    target.write_bytes(b"onnx bytes")
    with pytest.raises(BundleError, match="not a folder"):
        tiny_bundle.save(str(target))
    assert target.read_bytes() == b"onnx bytes"
    with pytest.raises(BundleError, match="is a file"):
        tiny_bundle.save(str(target / "inside" / "bundle"))
    tiny_bundle.save(str(tmp_path / "new" / "parents" / "bundle"))  # missing parents are made, like mkdir -p
    load_bundle(str(tmp_path / "new" / "parents" / "bundle"))


def test_non_finite_config_is_not_saved_and_the_old_bundle_stays(tiny_bundle, saved):
    import copy

    before = open(os.path.join(saved, CONFIG_NAME)).read()
    listing = sorted(os.listdir(saved))
    broken = copy.copy(tiny_bundle)
    broken.mean = tiny_bundle.mean + 1.0
    broken.config = dict(tiny_bundle.config, calibration={"image_threshold": float("nan")})
    with pytest.raises(BundleError, match="not be valid JSON"):
        broken.save(saved)
    broken.config = dict(tiny_bundle.config, postprocess={"blur_sigma": -1.0, "blur_radius": 0})
    with pytest.raises(BundleError, match="blur_sigma"):  # what read_config would refuse is never written
        broken.save(saved)
    broken.config = dict(tiny_bundle.config, embedding=dict(tiny_bundle.config["embedding"], seed=np.int64(3)))
    with pytest.raises(BundleError, match="not be valid JSON"):
        broken.save(saved)
    assert open(os.path.join(saved, CONFIG_NAME)).read() == before and sorted(os.listdir(saved)) == listing
    load_bundle(saved)
