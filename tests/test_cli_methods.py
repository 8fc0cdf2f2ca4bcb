"""CLI behind the method seam: ``edgead fit --method``, method fit options made from the registry, export flavours
per method, and the demo's method x category table (edgead/cli/fit_cmd.py, edgead/cli/export_cmd.py)."""
import json
import os

import pytest

from conftest import cli_runner
from edgead import methods
from edgead.cli import cli, fit_cmd
from edgead.errors import ConfigError
from edgead.methods.base import Method

FIT = ["--backbone", "resnet18", "--weights", "random", "--size", "64", "--dim", "16"]


_runner = cli_runner


def _fails_in_one_line(args, match):
    """Exit 2, one ``edgead: error:`` line on stderr holding ``match``, no traceback; returns that line."""
    result = _runner().invoke(cli, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("edgead: error:")]
    assert len(lines) == 1 and match in lines[0], result.stderr
    return lines[0]


class _Called(Exception):
    pass


@pytest.fixture()
def toy(monkeypatch):
    """A throwaway ``toy`` method (fit option ``widget_size``, an int) registered, and ``edgead fit`` rebuilt from
    the registry; its fitter stops the fit with a one-line error that shows the options it got."""
    @methods.register_method
    class ToyMethod(Method):
        name = "toy"
        fit_options = {"widget_size": "Size of the widget, in cogs."}
        default_folds = 0

        def parse_fit_options(self, options):
            if "widget_size" in options and not options["widget_size"].isdigit():
                raise ConfigError("--widget-size must be a whole number, got {!r}".format(options["widget_size"]))
            return {key: int(value) for key, value in options.items()}

        def make_fitter(self, backbone, weights, input_hw, dim, seed, batch_size, max_memory, **options):
            raise ConfigError("toy fitter got {}".format(json.dumps(options, sort_keys=True)))

    try:
        monkeypatch.setitem(cli.commands, "fit", fit_cmd.make_fit_command())
        yield ToyMethod
    finally:
        methods.unregister_method("toy")


# ---- --method ---------------------------------------------------------------------------------------

def test_fit_method_padim_round_trip(category, tmp_path):
    out = str(tmp_path / "b.edgead")
    result = _runner().invoke(cli, ["fit", category, "-o", out, "--method", "padim", "--folds", "0", "--json"] + FIT)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["method"] == "padim" and summary["calibration"] is None
    assert json.load(open(os.path.join(out, "model.json")))["method"] == "padim"
    text = _runner().invoke(cli, ["fit", category, "-o", str(tmp_path / "c"), "--folds", "0"] + FIT)  # the default
    assert text.exit_code == 0 and text.stdout.startswith("fitted padim resnet18 on 8 images")
    assert json.load(open(str(tmp_path / "c" / "model.json")))["method"] == "padim"


def test_unknown_method_is_one_line(category, tmp_path):
    line = _fails_in_one_line(["fit", category, "-o", str(tmp_path / "b"), "--method", "nope"] + FIT, "'nope'")
    assert "--method" in line and "padim" in line
    assert not os.path.exists(str(tmp_path / "b"))


def test_fit_help_names_the_methods_and_their_options():
    result = _runner().invoke(cli, ["fit", "--help"])
    assert result.exit_code == 0
    assert "Fit a detector (--method, default padim) on good images" in result.stdout
    flat = " ".join(result.stdout.split())
    assert "--method [{}]".format("|".join(methods.method_names())) in flat  # the choices, from the registry
    for key in methods.fit_option_keys():
        assert methods.option_flag(key) in result.stdout


# ---- method fit options, from the registry ---------------------------------------------------------

def test_method_options_come_from_the_registry_and_only_given_ones_are_passed(toy, category, tmp_path):
    out = str(tmp_path / "b")
    _fails_in_one_line(["fit", category, "-o", out, "--method", "toy", "--widget-size", "7"] + FIT,
                       'toy fitter got {"widget_size": 7}')  # parsed by the method, passed to its fitter
    _fails_in_one_line(["fit", category, "-o", out, "--method", "toy"] + FIT, "toy fitter got {}")
    help_text = _runner().invoke(cli, ["fit", "--help"]).stdout
    assert "--widget-size VALUE" in help_text and "Size of the widget, in cogs. [--method toy]" in help_text
    flat = " ".join(help_text.split())
    assert "--method [{}]".format("|".join(methods.method_names())) in flat and "|toy]" in flat
    assert "Default per method: cflow 5, padim n, patchcore 5," in flat and "toy 0." in flat  # each method's default --folds


def test_an_option_of_another_method_is_one_line_before_anything_runs(toy, category, tmp_path, monkeypatch):
    from edgead import fit

    def started(*args, **kwargs):
        raise AssertionError("the fit started")

    monkeypatch.setattr(fit.PadimFitter, "__init__", started)
    line = _fails_in_one_line(["fit", category, "-o", str(tmp_path / "b"), "--widget-size", "3"] + FIT,
                              "--widget-size applies to --method toy, not padim")
    assert line == "edgead: error: --widget-size applies to --method toy, not padim"
    _fails_in_one_line(["fit", category, "-o", str(tmp_path / "b"), "--method", "toy", "--widget-size", "big"] + FIT,
                       "--widget-size must be a whole number, got 'big'")
    assert not os.path.exists(str(tmp_path / "b"))


def test_without_the_method_its_option_does_not_exist(category, tmp_path):
    """No registered method takes --widget-size: click refuses it (one line, exit 2)."""
    _fails_in_one_line(["fit", category, "-o", str(tmp_path / "b"), "--widget-size", "3"] + FIT,
                       "No such option")
    assert "--widget-size" not in _runner().invoke(cli, ["fit", "--help"]).stdout


def test_a_method_option_may_not_shadow_a_generic_one():
    @methods.register_method
    class Clash(Method):
        name = "clash"
        fit_options = {"dim": "another --dim"}

    try:
        with pytest.raises(ValueError, match="'dim', which is not a free option name"):
            fit_cmd.make_fit_command()
    finally:
        methods.unregister_method("clash")


def test_fit_bundle_takes_the_methods_default_folds(toy, category, tmp_path, monkeypatch):
    """folds=None is the method's default_folds (toy's: 0)."""
    from edgead import thresholds

    seen = {}
    original = thresholds.parse_folds
    monkeypatch.setattr(thresholds, "parse_folds", lambda folds: seen.setdefault("folds", original(folds)))
    with pytest.raises(ConfigError, match="toy fitter got"):
        fit_cmd.fit_bundle(category, str(tmp_path / "b"), "resnet18", "random", (64, 64), 16, 0, 4, method="toy")
    assert seen["folds"] == 0


# ---- export flavours per method ---------------------------------------------------------------------

def test_export_refuses_a_flavour_the_bundles_method_does_not_export(category, tmp_path, monkeypatch):
    out = str(tmp_path / "b.edgead")
    assert _runner().invoke(cli, ["fit", category, "-o", out, "--folds", "0"] + FIT).exit_code == 0
    monkeypatch.setattr(methods.get_method("padim").__class__, "export_flavours", ("onnx",))
    line = _fails_in_one_line(["export", out, "-o", str(tmp_path / "m.onnx"), "--mahalanobis", "plugin"],
                              "--mahalanobis plugin: padim models export only the onnx flavour")
    assert line == "edgead: error: --mahalanobis plugin: padim models export only the onnx flavour"
    assert not os.path.exists(str(tmp_path / "m.onnx"))


# ---- demo -----------------------------------------------------------------------------------------

def test_demo_methods_option_is_checked_first(tmp_path):
    line = _fails_in_one_line(["demo", "--out", str(tmp_path / "d"), "--methods", "padim,nope"],
                              "unknown method 'nope'")
    assert "choose one of: " in line and not os.path.exists(str(tmp_path / "d"))
    assert fit_cmd._parse_methods(None) == methods.method_names()
    assert fit_cmd._parse_methods(" padim, padim ,") == ["padim"]
    with pytest.raises(ConfigError, match="at least one method"):
        fit_cmd._parse_methods(" , ")


def test_method_by_category_table_has_a_mean_per_method_and_latency():
    from edgead.evaluate import format_table

    def result(method, category, auroc, ms):
        return {"method": method, "category": category, "n_good": 4, "n_defect": 8, "image_auroc": auroc,
                "pixel_auroc": 0.9, "pro": 0.5, "image_f1_max": 0.8, "fpr": 0.0, "recall": 0.5, "ms_per_frame": ms}

    table = format_table([result("padim", "brick", 0.5, 12.0), result("padim", "grass", 0.7, 14.0),
                          result("patchcore", "brick", 0.9, 30.25)])
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["method", "category"] and lines[0].endswith("ms/frame")
    rows = [line.split() for line in lines[2:]]
    assert rows[0][:2] == ["padim", "brick"] and rows[0][-1] == "12.0"
    assert rows[2][:2] == ["padim", "mean"] and rows[2][2] == "0.600" and rows[2][-1] == "13.0"
    assert rows[3][:2] == ["patchcore", "brick"] and rows[3][-1] == "30.2" and len(rows) == 4  # one row: no mean
    plain = format_table([dict(result("padim", "brick", 0.5, None), method=None)])  # eval: neither column
    assert plain.splitlines()[0].split()[0] == "category" and "ms/frame" not in plain


def test_onnx_latency_is_the_median_of_timed_runs(tmp_path, monkeypatch):
    import numpy as np

    from edgead import evaluate
    from edgead.runtime.engines import ort_engine

    from fake_models import write_fake_model

    model = write_fake_model(tmp_path / "m.onnx", batch=1)
    calls = []
    real_infer = ort_engine.OrtEngine.infer
    monkeypatch.setattr(ort_engine.OrtEngine, "infer", lambda self, frames: calls.append(frames.shape) or
                        real_infer(self, frames))
    frames = np.zeros((3, 64, 64, 3), np.uint8)
    ms = evaluate.onnx_ms_per_frame(model, frames, threads=2, warmup=2, runs=5)
    assert ms > 0 and calls == [(1, 64, 64, 3)] * 7
