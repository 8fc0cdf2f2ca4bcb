"""The method seam (edgead/methods): the registry, PaDiM behind it, and what bundle I/O and export look up in it."""
import json
import os

import pytest
import torch

from edgead import methods
from edgead.bundle import Bundle, PadimBundle, load_bundle, weights_file_path
from edgead.errors import BundleError, ConfigError, ExportError
from edgead.methods.base import Method


@pytest.fixture()
def throwaway():
    """A registered ``toy`` method (one fit option, the onnx flavour only), unregistered afterwards."""
    @methods.register_method
    class ToyMethod(Method):
        name = "toy"
        fit_options = {"widget_size": "Size of the widget."}

        def parse_fit_options(self, options):
            parsed = {}
            for key, value in options.items():
                try:
                    parsed[key] = int(value)
                except ValueError:
                    raise ConfigError("--widget-size must be an integer, got {!r}".format(value))
            return parsed

    yield ToyMethod
    methods.unregister_method("toy")


@pytest.fixture(scope="module")
def saved(tiny_bundle, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("methods") / "tiny.edgead")
    tiny_bundle.save(folder)
    return folder


# ---- the registry ----------------------------------------------------------------------------------

def test_unknown_method_is_one_line_listing_the_names():
    with pytest.raises(ConfigError) as info:
        methods.get_method("nope")
    message = str(info.value)
    assert "\n" not in message and message.startswith("unknown method 'nope'; choose one of: ")
    assert "padim" in message.split("choose one of: ")[1].split(", ")


def test_a_decorated_method_registers_and_unregisters(throwaway):
    assert "toy" in methods.method_names() and isinstance(methods.get_method("toy"), throwaway)
    assert methods.get_method("toy").display_name == "toy"  # no title: the name
    assert methods.fit_option_keys()["widget_size"] == ["toy"]
    methods.unregister_method("toy")
    assert "toy" not in methods.method_names()
    with pytest.raises(ConfigError, match="unknown method 'toy'"):
        methods.get_method("toy")
    with pytest.raises(ValueError, match="needs a name"):
        methods.register_method(type("Nameless", (Method,), {}))


def test_padim_is_registered_with_its_entry_points():
    padim = methods.get_method("padim")
    assert "padim" in methods.method_names()
    assert (padim.name, padim.display_name, padim.default_folds) == ("padim", "PaDiM", "n")
    assert padim.export_flavours == ("onnx", "plugin") and padim.lazy_tensors == ("padim.whitening_packed",)
    assert padim.fit_options == {}


def test_fit_options_are_parsed_by_their_method_and_refused_by_the_others(throwaway):
    assert methods.parse_fit_options("toy", {"widget_size": "7"}) == {"widget_size": 7}
    assert methods.parse_fit_options("toy", {}) == {} and methods.parse_fit_options("padim", None) == {}
    with pytest.raises(ConfigError, match="^--widget-size must be an integer, got 'big'$"):
        methods.parse_fit_options("toy", {"widget_size": "big"})
    with pytest.raises(ConfigError, match="^--widget-size applies to --method toy, not padim$"):
        methods.parse_fit_options("padim", {"widget_size": "7"})
    with pytest.raises(ConfigError, match="^--gizmo is not an option of --method toy$"):
        methods.parse_fit_options("toy", {"gizmo": "1"})
    assert methods.option_flag("coreset_ratio") == "--coreset-ratio"


# ---- bundles ----------------------------------------------------------------------------------------

def test_padim_bundle_is_a_bundle_and_saves_its_method_format(tiny_bundle, saved):
    from safetensors import safe_open

    assert isinstance(tiny_bundle, Bundle) and tiny_bundle.method == "padim" and tiny_bundle.input_hw == (64, 64)
    assert set(tiny_bundle.tensors_to_save()) == {"padim.mean", "padim.whitening_packed"}
    with safe_open(weights_file_path(saved), framework="pt") as handle:
        assert handle.metadata()["format"] == "edgead-padim"
        assert {k for k in handle.keys() if not k.startswith("backbone.")} == set(tiny_bundle.tensors_to_save())
    with load_bundle(saved) as loaded:
        assert type(loaded) is PadimBundle and loaded.statistics_in_memory


def test_the_base_bundle_leaves_the_method_parts_abstract(tiny_bundle):
    base = Bundle(tiny_bundle.config, tiny_bundle.backbone_state)
    for call in (base.model, base.frame_embedding, base.tensors_to_save, base.export_front_end):
        with pytest.raises(NotImplementedError):
            call()
    assert base.with_storage_precision("fp16") is base  # nothing stored at reduced precision by default
    with pytest.raises(ValueError, match="precision"):
        base.with_storage_precision("int8")
    assert base.feature_extractor().feature_info.reduction() == [4, 8, 16]


def test_storage_precision_rounds_the_padim_whitening_only(tiny_bundle):
    assert tiny_bundle.with_storage_precision("fp32") is tiny_bundle
    rounded = tiny_bundle.with_storage_precision("fp16")
    assert torch.equal(rounded.whitening_packed, tiny_bundle.whitening_packed.half().float())
    assert not torch.equal(rounded.whitening_packed, tiny_bundle.whitening_packed)
    assert rounded.mean is tiny_bundle.mean and rounded.config is tiny_bundle.config


def test_lazy_loading_leaves_exactly_the_methods_lazy_tensors_on_disk(saved, monkeypatch):
    with load_bundle(saved, lazy_statistics=True) as lazy:
        assert not lazy.statistics_in_memory
    monkeypatch.setattr(methods.get_method("padim").__class__, "lazy_tensors", ())
    with load_bundle(saved, lazy_statistics=True) as eager:
        assert eager.statistics_in_memory  # a method without lazy tensors loads everything


def test_a_method_this_edgead_does_not_have_is_one_line(saved, monkeypatch):
    monkeypatch.setattr(methods, "_REGISTRY", {})
    monkeypatch.setattr(methods, "_BUILTIN_MODULES", ())
    for lazy in (False, True):
        with pytest.raises(BundleError) as info:
            load_bundle(saved, lazy_statistics=lazy)
        assert str(info.value) == "{}: unknown method 'padim'; choose one of: (none registered)".format(
            os.path.join(saved, "model.json"))


def test_unknown_method_in_model_json_is_refused_by_the_schema(saved, tmp_path):
    import shutil

    folder = str(tmp_path / "b")
    shutil.copytree(saved, folder)
    path = os.path.join(folder, "model.json")
    config = json.load(open(path))
    config["method"] = "toy"
    json.dump(config, open(path, "w"))
    with pytest.raises(BundleError) as info:
        load_bundle(folder)
    assert str(info.value) == '{}: method must be one of "padim", "patchcore", "cflow", got "toy"'.format(path)


def test_backbone_checks_use_the_recorded_out_indices(tiny_bundle, tmp_path):
    """check_backbone builds model.json's stages: recorded out_indices [2, 3] give strides [8, 16], which differ
    from the recorded [4, 8, 16] of this PaDiM bundle, and the message names both."""
    from edgead.bundle import check_backbone

    config = json.loads(json.dumps(tiny_bundle.config))
    assert check_backbone(PadimBundle(config, tiny_bundle.backbone_state, None, None), "f", "w")
    config["backbone"]["out_indices"] = [2, 3]
    with pytest.raises(BundleError, match=r"strides \[4, 8, 16\] differ .* strides \[8, 16\]"):
        check_backbone(PadimBundle(config, tiny_bundle.backbone_state, None, None), "f", "w")
    state = dict(tiny_bundle.backbone_state)
    state.pop(sorted(state)[0])
    with pytest.raises(BundleError, match="^w: backbone weights do not fit resnet18"):
        check_backbone(PadimBundle(tiny_bundle.config, state, None, None), "f", "w")


# ---- export -----------------------------------------------------------------------------------------

def test_export_refuses_a_flavour_the_method_does_not_export(tiny_bundle, throwaway):
    from edgead.exporters import onnx_export

    toy = PadimBundle(dict(tiny_bundle.config, method="toy"), tiny_bundle.backbone_state, tiny_bundle.mean,
                      tiny_bundle.whitening_packed)
    with pytest.raises(ExportError) as info:
        onnx_export.build_onnx(toy, "plugin")
    assert str(info.value) == "--mahalanobis plugin: toy models export only the onnx flavour"


def test_export_names_the_method_and_imports_the_heads_custom_domain(tiny_bundle):
    from edgead.exporters import onnx_export

    model, _ = onnx_export.build_onnx_streamed(tiny_bundle, "plugin", "fp32")
    assert model.graph.name == "edgead_padim_resnet18"
    assert model.doc_string.startswith("edgead PaDiM (resnet18, 64x64)")
    assert {(o.domain, o.version) for o in model.opset_import} >= {("", 17), ("edgead", 1)}
    assert onnx_export.metadata_text(onnx_export.read_metadata(model))  # the metadata names the method
    assert onnx_export.read_metadata(model)["method"] == "padim"
