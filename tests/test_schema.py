"""The one declared schema of model.json and the ONNX metadata (runtime/schemas/model.schema.json, runtime/schema.py).

One test per problem of the hostile-input review: each names the exception class and the one-line message
(the file and the JSON path of the problem). CLI tests check exit code 2, ``edgead: error:`` and no traceback.
"""
import copy
import json
import os
import shutil

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from edgead.bundle import CONFIG_NAME, load_bundle, read_config
from edgead.cli import cli
from edgead.errors import BundleError, ConfigError, DataError, ExportError, ModelFileError
from edgead.runtime import modelinfo, schema

from conftest import random_frames
from fake_models import FAKE_CALIBRATION, build_fake_model, fake_metadata, write_fake_model


@pytest.fixture(scope="module")
def clean_bundle(tiny_bundle, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("schema") / "clean.edgead")
    tiny_bundle.save(folder)
    return folder


@pytest.fixture()
def bundle_dir(clean_bundle, tmp_path):
    """A fresh copy of a saved tiny bundle (resnet18, 64x64, D = 24, channels 64+128+256) to tamper with."""
    folder = str(tmp_path / "bottle.edgead")
    shutil.copytree(clean_bundle, folder)
    return folder


def _tamper(folder, mutate):
    path = os.path.join(folder, CONFIG_NAME)
    with open(path) as fh:
        config = json.load(fh)
    mutate(config)
    with open(path, "w") as fh:
        fh.write(json.dumps(config))  # NaN / Infinity written as JSON's non-standard literals
    return path


def _bundle_error(folder, mutate):
    path = _tamper(folder, mutate)
    with pytest.raises(BundleError) as info:
        load_bundle(folder)
    message = str(info.value)
    assert "\n" not in message and message.startswith(path + ": "), message
    return message


def _meta_error(mutate, name="m.onnx"):
    meta = copy.deepcopy(fake_metadata())
    mutate(meta)
    with pytest.raises(ModelFileError) as info:
        modelinfo.parse_metadata(json.dumps(meta), name)
    message = str(info.value)
    assert "\n" not in message and message.startswith(name + ": "), message
    return message


def _set(section, **values):
    return lambda c: c[section].update(values)


def _cli(args):
    return CliRunner().invoke(cli, args)


def _assert_one_line_error(result, *needles):
    """Exit 2, no traceback, and the error is one line starting ``edgead: error:`` (warnings such as the random
    weights banner may precede it)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("edgead: error: "), result.output
    assert result.output.rstrip("\n").splitlines()[-1] == errors[0], result.output
    for needle in needles:
        assert needle in errors[0], result.output


# --- the schema itself ------------------------------------------------------------------------------

def test_schema_is_valid_json_schema_2020_12_with_two_entry_points():
    from jsonschema import Draft202012Validator

    document = schema.load_schema()
    Draft202012Validator.check_schema(document)
    assert {"bundle", "metadata", "core"} <= set(document["$defs"])
    assert document["$defs"]["bundle"]["required"][:3] == ["format_version", "method", "weights_sha256"]


def test_valid_bundle_and_exported_metadata_pass(clean_bundle, tiny_bundle):
    config = read_config(clean_bundle)
    assert config["embedding"]["dim"] == len(config["embedding"]["channel_indices"]) == 24
    meta = json.loads(json.dumps(dict(config, export={"mahalanobis": "onnx", "precision": "fp16", "batch": "dynamic",
                                                       "opset": 17, "input_dtype": "uint8"})))
    assert schema.validate(meta, "metadata", "m.onnx", ModelFileError) is meta


def test_edgead_01_metadata_still_loads(tmp_path):
    """edgead 0.1 exports: no arch, no calibration_provenance, no input_dtype/resize/channel_order, the in-sample
    train_p995 as the only calibration number, no weights_sha256 (metadata never needs it)."""
    meta = fake_metadata(calibration={"train_p995": 12.5, "train_score_max": 20.0, "source": "train"})
    del meta["export"]["input_dtype"], meta["input"]["resize"], meta["input"]["channel_order"]
    meta["backbone"] = {"name": "efficientnet_lite0", "out_indices": [1, 2, 3]}
    info = modelinfo.parse_metadata(json.dumps(meta), "old.onnx")
    assert info["input"]["resize"] == "area"
    sparse = {"format_version": 1, "method": "padim", "input": {"height": 64, "width": 64}}
    assert modelinfo.parse_metadata(json.dumps(sparse), "older.onnx")["calibration"] is None


# --- NaN, booleans, huge numbers ------------------------------------------------------------------------

def test_nan_threshold_in_model_json_is_refused(bundle_dir):
    message = _bundle_error(bundle_dir, lambda c: c.update(calibration={"image_threshold": float("nan"),
                                                                         "source": "normal-oos"}))
    assert "model.json: calibration.image_threshold must be a finite number, got NaN" in message


def test_nan_threshold_in_onnx_metadata_is_refused(tmp_path):
    path = write_fake_model(tmp_path / "nan.onnx", calibration=dict(FAKE_CALIBRATION, image_threshold=float("nan")))
    with pytest.raises(ModelFileError, match=r"nan\.onnx: calibration\.image_threshold must be a finite number, "
                                             r"got NaN$"):
        modelinfo.load_model_info(path)
    assert "got -Infinity" in _meta_error(lambda m: m["calibration"].update(score_min=float("-inf")))


def test_boolean_threshold_is_refused(bundle_dir):
    message = _bundle_error(bundle_dir, lambda c: c.update(calibration={"image_threshold": True}))
    assert message.endswith("calibration.image_threshold must be a finite number or null, got true")
    assert "calibration.pixel_threshold must be a finite number or null, got false" in _meta_error(
        lambda m: m["calibration"].update(pixel_threshold=False))
    assert "input.height must be an integer, got true" in _meta_error(lambda m: m["input"].update(height=True))


def test_number_beyond_float64_is_refused(bundle_dir):
    path = os.path.join(bundle_dir, CONFIG_NAME)
    text = open(path).read().replace('"blur_sigma": 4.0', '"blur_sigma": 1e400')
    open(path, "w").write(text)
    with pytest.raises(BundleError, match=r"model\.json: postprocess\.blur_sigma must be a finite number, got 1e400"):
        read_config(bundle_dir)
    assert "calibration.score_max must be a number within float64 range, got an integer of 401 digits" in _meta_error(
        lambda m: m["calibration"].update(score_max=10 ** 400))


def test_integer_fields_refuse_floats():
    assert "input.width must be an integer, got 64.0" in _meta_error(lambda m: m["input"].update(width=64.0))


# --- input normalisation ----------------------------------------------------------------------------------

def test_zero_std_is_refused_at_bundle_load_and_in_metadata(bundle_dir):
    message = _bundle_error(bundle_dir, _set("input", std=[0.229, 0, 0.225]))
    assert message.endswith("model.json: input.std[1] must be > 0, got 0")
    assert "input.std[2] must be > 0, got -0.5" in _meta_error(lambda m: m["input"].update(std=[0.5, 0.5, -0.5]))
    assert "input.std[0] must be >= 1e-06, got 1e-30" in _meta_error(lambda m: m["input"].update(std=[1e-30, 1, 1]))


def test_mean_and_std_must_be_three_numbers(bundle_dir):
    message = _bundle_error(bundle_dir, _set("input", mean=[0.5, 0.5]))
    assert message.endswith("input.mean must be a list of exactly 3 items, got a list of 2 items")
    assert "input.std[1] must be a finite number, got \"x\"" in _meta_error(
        lambda m: m["input"].update(std=[0.5, "x", 0.5]))


# --- fit --dim ---------------------------------------------------------------------------------------------

def _image_folder(tmp_path, n=3):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, frame in enumerate(random_frames(n, seed=5)):
        cv2.imwrite(str(folder / "{}.png".format(i)), frame)
    return str(folder)


def test_fit_dim_larger_than_backbone_is_a_config_error_before_the_fit():
    from edgead.fit import PadimFitter, make_config
    from edgead.weights import load_backbone

    with pytest.raises(ConfigError, match=r"--dim 5000 is larger than the 448 channels backbone resnet18 has .*"
                                          r"use --dim 448 or less"):
        PadimFitter("resnet18", "random", (64, 64), dim=5000)
    for bad in (0, -5):
        with pytest.raises(ConfigError, match=r"--dim must be >= 1 .*got {}$".format(bad)):
            PadimFitter("resnet18", "random", (64, 64), dim=bad)
    extractor, _ = load_backbone("resnet18", "random", seed=0, input_hw=(64, 64))
    assert make_config("resnet18", "random", extractor, (64, 64), 448, 0)["embedding"]["dim"] == 448


@pytest.mark.parametrize("dim", ["5000", "0", "-5"])
def test_fit_cli_bad_dim_exits_2_with_one_line(tmp_path, dim):
    out = tmp_path / "out.edgead"
    result = _cli(["fit", _image_folder(tmp_path), "-o", str(out), "--backbone", "resnet18", "--weights", "random",
                   "--size", "64", "--dim", dim])
    if dim == "5000":
        _assert_one_line_error(result, "--dim 5000 is larger than the 448 channels", "use --dim 448 or less")
    else:  # the option's own range check (click usage error) or the library's ConfigError: exit 2, no traceback
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert "--dim" in result.output and dim in result.output, result.output
    assert not out.exists()


# --- channel indices and shapes -------------------------------------------------------------------------------

@pytest.mark.parametrize("index, problem", [(448, "must be < 448 (the sum of backbone.channels), got 448"),
                                            (-1, "must be >= 0, got -1"),
                                            ("dup", "must not repeat a channel")])
def test_out_of_range_channel_indices_are_caught_at_bundle_load(bundle_dir, index, problem):
    def mutate(config):
        indices = config["embedding"]["channel_indices"]
        indices[5] = indices[4] if index == "dup" else index

    message = _bundle_error(bundle_dir, mutate)
    assert "model.json: embedding.channel_indices[5] " + problem in message


@pytest.mark.parametrize("mutate, needle", [
    (_set("embedding", dim=23), "embedding.dim must equal len(embedding.channel_indices) = 24, got 23"),
    (_set("backbone", strides=[4, 8]),
     "backbone channels, strides and out_indices must have the same length, got 3 channels, 2 strides, 3 out_indices"),
    (_set("backbone", strides=[4, 6, 16]), "backbone.strides[1] must be a multiple of backbone.strides[0] = 4, got 6"),
    (_set("embedding", grid=[8, 8]), "embedding.grid must be [16, 16] (input height, width // backbone.strides[0]), "
                                     "got [8, 8]"),
    (_set("embedding", grid=[16]), "embedding.grid must be a list of exactly 2 items, got a list of 1 item"),
    (_set("input", height=72), "input.height must be a multiple of the deepest stride 16 (backbone.strides[-1]), "
                               "got 72"),
    (_set("input", width=100000), "input.width must be <= 8192, got 100000"),
    (_set("input", height=0), "input.height must be >= 1, got 0"),
    (_set("postprocess", blur_sigma=-1.0), "postprocess.blur_sigma must be >= 0, got -1.0"),
    (_set("postprocess", blur_sigma=float("inf")), "postprocess.blur_sigma must be a finite number, got Infinity"),
    (lambda c: c.update(calibration={"image_threshold": 1.0, "source": 3}),
     "calibration.source must be a string or null, got 3"),
    (lambda c: c.update(calibration={"image_threshold": "high"}),
     "calibration.image_threshold must be a finite number or null, got \"high\""),
    (lambda c: c.update(calibration_provenance={"rank": "x"}),
     "calibration_provenance.rank must be a finite number or null, got \"x\""),
    (lambda c: c.update(calibration_provenance={"method": 3}),
     "calibration_provenance.method must be a string or null, got 3"),
    (lambda c: c.update(format_version=2), "format_version 2 is not supported by this edgead (it reads 1)"),
    (lambda c: c.update(method="cflow"), "lacks key 'cflow'"),
    (lambda c: c.update(method="patchcore"), "lacks key 'patchcore'"),  # a PaDiM model.json is no PatchCore one
    (lambda c: c.pop("padim"), "lacks key 'padim'"),
    (lambda c: c["embedding"].pop("channel_indices"), "lacks key 'embedding.channel_indices'"),
    (lambda c: c.pop("embedding"), "lacks key 'embedding'"),
    (lambda c: c["input"].pop("std"), "lacks key 'input.std'"),
    (lambda c: c.update(backbone=[]), "backbone must be an object, got a list of 0 items"),
])
def test_shape_and_field_consistency_at_bundle_load(bundle_dir, mutate, needle):
    assert "model.json: " + needle in _bundle_error(bundle_dir, mutate)


@pytest.mark.parametrize("mutate, needle", [
    (lambda m: m.pop("weights_sha256"), "lacks key 'weights_sha256'"),
    (lambda m: m.update(weights_sha256="ABC"), "weights_sha256 must be a string matching ^[0-9a-f]{64}$, got \"ABC\""),
    (lambda m: m.update(weights_file="../x.safetensors"), "weights_file must be a string matching"),
])
def test_weights_checksum_is_mandatory_and_names_are_checked(bundle_dir, mutate, needle):
    assert "model.json: " + needle in _bundle_error(bundle_dir, mutate)


@pytest.mark.parametrize("mutate, needle", [
    (lambda m: m["embedding"].update(channel_indices=[0, 1, 3]), "embedding.channel_indices[2] must be < 3"),
    (lambda m: m["embedding"].update(dim=4), "embedding.dim must equal len(embedding.channel_indices) = 3, got 4"),
    (lambda m: m["embedding"].update(grid=[8, 8]), "embedding.grid must be [16, 16]"),
    (lambda m: m["export"].update(batch=0), "export.batch must be an integer >= 1 or \"dynamic\", got 0"),
    (lambda m: m.update(method="knn"), "method must be one of \"padim\", \"patchcore\", \"cflow\", got \"knn\""),
    (lambda m: m.update(calibration={"image_threshold": 1.0, "a\nb": "x"}),
     "calibration[\"a\\nb\"] must be a finite number or null, got \"x\""),
])
def test_metadata_consistency(mutate, needle):
    assert "m.onnx: " + needle in _meta_error(mutate)


# --- per-method requirements (allOf if/then on "method") ------------------------------------------------------

def _patchcore_config(clean_bundle):
    """A valid PatchCore model.json: the tiny bundle's, turned into PatchCore's (stages 2, 3: strides 8, 16)."""
    config = read_config(clean_bundle)
    del config["padim"]
    config["method"] = "patchcore"
    config["backbone"].update(out_indices=[2, 3], strides=[8, 16], channels=[128, 256])
    config["embedding"] = {"dim": 128, "seed": 0, "grid": [8, 8], "aggregation": 3, "projection": "adaptive_avg"}
    config["patchcore"] = {"coreset_ratio": 0.1, "coreset_size": 77, "projection_dim": 128, "neighbors": 9,
                           "n_train": 12, "n_patches": 768}
    return config


def _schema_error(config, entry="bundle", where="model.json"):
    with pytest.raises(BundleError) as info:
        schema.validate(config, entry, where, BundleError)
    message = str(info.value)
    assert "\n" not in message and message.startswith(where + ": "), message
    return message


def test_a_valid_patchcore_config_passes_both_entry_points(clean_bundle):
    config = _patchcore_config(clean_bundle)
    assert schema.validate(config, "bundle", "model.json", BundleError) is config
    meta = dict(copy.deepcopy(config), export={"mahalanobis": "onnx", "precision": "fp16", "batch": 1, "opset": 17})
    assert schema.validate(meta, "metadata", "m.onnx", ModelFileError) is meta
    config["embedding"].update(projection="none", dim=384)  # D = 128 + 256 channels, no projection
    schema.validate(config, "bundle", "model.json", BundleError)


@pytest.mark.parametrize("mutate, needle", [
    (lambda c: c["patchcore"].pop("coreset_size"), "lacks key 'patchcore.coreset_size'"),
    (lambda c: c.pop("patchcore"), "lacks key 'patchcore'"),
    (lambda c: c["embedding"].pop("projection"), "lacks key 'embedding.projection'"),
    (lambda c: c["embedding"].pop("aggregation"), "lacks key 'embedding.aggregation'"),
    (lambda c: c["embedding"].pop("dim"), "lacks key 'embedding.dim'"),
    (lambda c: c["patchcore"].update(coreset_ratio=0), "patchcore.coreset_ratio must be > 0, got 0"),
    (lambda c: c["patchcore"].update(coreset_ratio=1.5), "patchcore.coreset_ratio must be <= 1, got 1.5"),
    (lambda c: c["patchcore"].update(neighbors=0), "patchcore.neighbors must be >= 1, got 0"),
    (lambda c: c["patchcore"].update(projection_dim=64.0), "patchcore.projection_dim must be an integer, got 64.0"),
    (lambda c: c["patchcore"].update(n_patches=-1), "patchcore.n_patches must be >= 0, got -1"),
    (lambda c: c["embedding"].update(aggregation="3"), "embedding.aggregation must be an integer, got \"3\""),
    (lambda c: c["embedding"].update(projection="pca"),
     "embedding.projection must be one of \"none\", \"adaptive_avg\", got \"pca\""),
    (lambda c: c["embedding"].update(dim=385),
     "embedding.dim must be at most sum(backbone.channels) = 384 when embedding.projection is adaptive_avg, got 385"),
    (lambda c: c["embedding"].update(projection="none"),
     "embedding.dim must be equal to sum(backbone.channels) = 384 when embedding.projection is none, got 128"),
    (lambda c: c["patchcore"].update(coreset_size=769), "patchcore.coreset_size must be <= patchcore.n_patches = 768"),
    (lambda c: c["embedding"].update(grid=[16, 16]), "embedding.grid must be [8, 8]"),  # input // strides[0] = 8
])
def test_patchcore_requirements_are_one_line_naming_the_path(clean_bundle, mutate, needle):
    config = _patchcore_config(clean_bundle)
    mutate(config)
    assert "model.json: " + needle in _schema_error(config)


def test_patchcore_needs_no_channel_indices_and_padim_needs_no_patchcore(clean_bundle):
    config = _patchcore_config(clean_bundle)
    assert "channel_indices" not in config["embedding"]
    padim = read_config(clean_bundle)
    assert "patchcore" not in padim and schema.validate(padim, "bundle", "model.json", BundleError) is padim
    padim["patchcore"] = {"coreset_size": "many"}  # what a section may hold is checked whatever the method
    assert "patchcore.coreset_size must be an integer" in _schema_error(padim)


# --- hostile JSON -------------------------------------------------------------------------------------------------

DEEP = "[" * 100000 + "]" * 100000


@pytest.mark.parametrize("content, needle", [
    (DEEP.encode(), "model.json: invalid JSON (nested too deeply)"),
    (('{"format_version": 1, "x": ' + "[" * 100 + "]" * 100 + "}").encode(), "model.json: x[0][0][0][0][0]... nests more than 32 levels deep"),
    (b"\xff\xfe\x00{}", "model.json: invalid JSON (not UTF-8 text"),
    (b"[1, 2]", "model.json: the top level must be an object, got a list of 2 items"),
    (b"", "model.json: invalid JSON (Expecting value"),
    (b"{\"x\": " + b"9" * 400 + b"}", "model.json: x must be a number within float64 range, got an integer of "
                                    "400 digits"),
])
def test_hostile_model_json_is_one_line_bundle_error(bundle_dir, content, needle):
    with open(os.path.join(bundle_dir, CONFIG_NAME), "wb") as fh:
        fh.write(content)
    with pytest.raises(BundleError) as info:
        load_bundle(bundle_dir)
    assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("text, needle", [
    (DEEP, "m.onnx: 'edgead' metadata is not valid JSON (nested too deeply)"),
    (b"\xc3\x28", "m.onnx: 'edgead' metadata is not valid JSON (not UTF-8 text"),
    ("7", "m.onnx: the top level must be an object, got 7"),
    ('{"format_version": 1, "method": "padim", "input": {"height": 1e400, "width": 8}}',
     "m.onnx: input.height must be a finite number, got 1e400 (beyond float64)"),
])
def test_hostile_metadata_is_one_line_model_file_error(text, needle):
    with pytest.raises(ModelFileError) as info:
        modelinfo.parse_metadata(text, "m.onnx")
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_deeply_nested_metadata_inside_a_real_onnx_file_and_sidecar(tmp_path):
    import onnx

    model = build_fake_model(metadata=False)
    onnx.helper.set_model_props(model, {"edgead": DEEP})
    path = tmp_path / "deep.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ModelFileError, match=r"deep\.onnx: 'edgead' metadata is not valid JSON \(nested too deeply\)"):
        modelinfo.load_model_info(path)
    (tmp_path / "m.engine").write_bytes(b"engine")
    (tmp_path / "m.engine.json").write_bytes(b"\xff" + DEEP.encode())
    with pytest.raises(ModelFileError, match=r"m\.engine\.json: .*not UTF-8"):
        modelinfo.load_model_info(tmp_path / "m.engine")


# --- export and the device CLI --------------------------------------------------------------------------------------

def test_export_cli_refuses_a_tampered_bundle_and_writes_nothing(bundle_dir, tmp_path):
    config_path = _tamper(bundle_dir, lambda c: c["embedding"]["channel_indices"].__setitem__(0, 10 ** 6))
    out = tmp_path / "m.onnx"
    result = _cli(["export", bundle_dir, "-o", str(out), "--precision", "fp32"])
    _assert_one_line_error(result, config_path + ": embedding.channel_indices[0] must be < 448")
    assert not out.exists()


def test_export_validates_the_metadata_it_writes(tiny_bundle, tmp_path):
    """An in-memory bundle (never read from disk) with a NaN threshold or zero std never becomes a model file."""
    from edgead.exporters import onnx_export

    out = tmp_path / "m.onnx"
    for section, values, needle in [
        ("calibration", {"image_threshold": float("nan")}, "calibration.image_threshold must be a finite number"),
        ("input", dict(tiny_bundle.config["input"], std=[1.0, 0.0, 1.0]), "input.std[1] must be > 0, got 0.0"),
    ]:
        bad = copy.copy(tiny_bundle)
        bad.config = dict(tiny_bundle.config, **{section: values})
        bad.path = "bad.edgead"
        with pytest.raises(ExportError) as info:
            onnx_export.export_onnx(bad, out, precision="fp32")
        assert str(info.value).startswith("bad.edgead (ONNX metadata): " + needle), str(info.value)
        assert not out.exists()


@pytest.mark.parametrize("command", [["run", "--source", "synthetic://?frames=2"], ["bench", "--frames", "2"]])
def test_run_and_bench_refuse_a_nan_threshold(tmp_path, command):
    path = write_fake_model(tmp_path / "nan.onnx", calibration=dict(FAKE_CALIBRATION, image_threshold=float("nan")))
    result = _cli([command[0], path] + command[1:])
    _assert_one_line_error(result, "nan.onnx: calibration.image_threshold must be a finite number, got NaN")


# --- masks ----------------------------------------------------------------------------------------------------------

def test_mask_of_another_size_than_its_image_is_a_data_error(tmp_path):
    from edgead.data import MvtecCategory

    root = tmp_path / "widget"
    for sub in ("train/good", "test/good", "test/spot", "ground_truth/spot"):
        (root / sub).mkdir(parents=True)
    frame = random_frames(1, seed=1)[0]
    for sub in ("train/good/000.png", "test/good/000.png", "test/spot/000.png"):
        cv2.imwrite(str(root / sub), frame)
    mask_path = root / "ground_truth" / "spot" / "000_mask.png"
    cv2.imwrite(str(mask_path), np.zeros((32, 48), np.uint8))
    with pytest.raises(DataError) as info:
        MvtecCategory(str(root)).test_samples()
    message = str(info.value)
    assert message.startswith(str(mask_path) + ": mask is 32x48 (HxW) but its image ")
    assert "000.png is 64x64" in message and "\n" not in message
    cv2.imwrite(str(mask_path), np.zeros((64, 64), np.uint8))
    assert MvtecCategory(str(root)).test_samples()[1].mask_path == str(mask_path)


def test_duplicate_keys_are_refused_and_a_bom_is_skipped():
    from edgead.errors import BundleError
    from edgead.runtime import schema

    with pytest.raises(BundleError, match='key "weights_sha256" appears twice'):
        schema.loads('{"weights_sha256": "a", "weights_sha256": "b"}', "m/model.json", BundleError)
    assert schema.loads(b'\xef\xbb\xbf{"a": 1}', "m/model.json", BundleError) == {"a": 1}
