"""CLI: fit / eval / export / compare / demo end to end on tiny data, and one-line errors (exit 2)."""
import json
import os

import pytest
from click.testing import CliRunner

from edgead.cli import cli



def _run(args):
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def bundle_dir(category, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("models") / "widget.edgead")
    result = _run(["fit", category, "-o", out, "--backbone", "resnet18", "--weights", "random", "--size", "64",
                   "--dim", "16", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    calibration = summary["calibration"]
    assert summary["n_train"] == 8 and calibration["source"] == "normal-oos"
    provenance = summary["calibration_provenance"]
    assert provenance["method"] == "padim-leave-one-out"
    assert (provenance["folds"], provenance["quantile"], provenance["n_normal"], provenance["rank"]) == (8, 0.995, 8, 8)
    assert calibration["image_threshold"] == calibration["pixel_threshold"] == provenance["normal_score_max"] > 0
    # numbers and the source only: edgead 0.1 runtimes on devices still read new exports
    assert all(isinstance(v, float) for k, v in calibration.items() if k != "source")
    return out


def test_fit_stores_out_of_sample_thresholds_and_export_carries_them(bundle_dir, tmp_path):
    """model.json and the ONNX metadata hold the same thresholds and provenance; run prints it at start."""
    from edgead.runtime import modelinfo

    config = json.load(open(os.path.join(bundle_dir, "model.json")))
    onnx_path = str(tmp_path / "m.onnx")
    assert _run(["export", bundle_dir, "-o", onnx_path, "--precision", "fp32"]).exit_code == 0
    info = modelinfo.load_model_info(onnx_path)
    assert info["calibration"] == config["calibration"]
    assert info["calibration_provenance"] == config["calibration_provenance"]
    runner = CliRunner(mix_stderr=False) if "mix_stderr" in CliRunner.__init__.__code__.co_varnames else CliRunner()
    result = runner.invoke(cli, ["run", onnx_path, "--source", "synthetic://?frames=2", "--json"])
    assert result.exit_code == 0, result.output
    stderr = result.stderr if result.stderr else result.output
    assert "leave-one-out out-of-sample scores of 8 normal images, quantile 0.995" in stderr
    assert "expected false-positive rate 11.1%" in stderr  # rank 8 of 8: 1 / 9


def test_fit_warns_once_when_covariance_is_rank_deficient(category, tmp_path):
    runner = CliRunner(mix_stderr=False) if "mix_stderr" in CliRunner.__init__.__code__.co_varnames else CliRunner()
    result = runner.invoke(cli, ["fit", category, "-o", str(tmp_path / "b"), "--backbone", "resnet18", "--weights",
                                 "random", "--size", "64", "--dim", "16", "--folds", "0"])
    assert result.exit_code == 0, result.output
    stderr = result.stderr if result.stderr else result.output
    assert stderr.count("rank <= 7 < 16") == 1 and "17 images make it full rank" in stderr
    assert json.load(open(str(tmp_path / "b" / "model.json")))["calibration"] is None


def test_eval_prints_table_writes_json_and_overlays(bundle_dir, category, tmp_path):
    out = str(tmp_path / "eval")
    result = _run(["eval", bundle_dir, category, "--out", out, "--calibrate"])
    assert result.exit_code == 0, result.output
    assert "image AUROC" in result.output
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["n_good"] == 3 and metrics["n_defect"] == 3
    assert metrics["image_auroc"] == pytest.approx(1.0)  # magenta blobs on blurred noise: trivially separable
    assert 0.0 <= metrics["pro"] <= 1.0
    assert len(os.listdir(os.path.join(out, "overlays", "spot"))) == 3
    assert "FPR@thr" in result.output and "recall@thr" in result.output
    # rates at the stored out-of-sample threshold, measured before --calibrate replaced it
    assert metrics["threshold_source"] == "normal-oos"
    assert 0.0 <= metrics["fpr"] <= 1.0 and metrics["recall"] == pytest.approx(1.0)
    config = json.load(open(os.path.join(bundle_dir, "model.json")))
    assert config["calibration"]["image_threshold"] == pytest.approx(metrics["calibration"]["image_threshold"])
    assert config["calibration_provenance"]["method"] == "validation-f1max"
    assert config["calibration_provenance"]["n_good"] == 3 and config["calibration_provenance"]["n_defect"] == 3


def test_export_then_compare_within_tolerance(bundle_dir, category, tmp_path):
    onnx_path = str(tmp_path / "m.onnx")
    result = _run(["export", bundle_dir, "-o", onnx_path, "--precision", "fp32", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["tensorrt_problems"] == []
    result = _run(["compare", bundle_dir, onnx_path, "--images", os.path.join(category, "test", "spot"), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert rows[0]["map"]["max_rel"] <= 1e-4 and rows[0]["score"]["max_rel"] <= 1e-4


@pytest.mark.parametrize("args,needle", [
    (["fit", "{empty}", "-o", "{tmp}/b"], "no images"),
    (["fit", "{category}", "-o", "{tmp}/b", "--backbone", "vgg"], "unknown backbone"),
    (["fit", "{category}", "-o", "{tmp}/b", "--size", "60", "--weights", "random"], "multiple of 16"),
    (["eval", "{tmp}/missing", "{category}"], "not a bundle folder"),
    (["export", "{tmp}/missing", "-o", "{tmp}/x.onnx"], "not a bundle folder"),
    (["fit", "{category}", "-o", "{tmp}/b", "--weights", "{tmp}/nope.pth"], "nope.pth"),
    (["fit", "{category}", "-o", "{tmp}/b", "--folds", "1"], "--folds must be n"),
    (["fit", "{category}", "-o", "{tmp}/b", "--quantile", "1.5"], "--quantile must be a number in (0, 1)"),
])
def test_bad_input_exits_2_with_one_line(args, needle, category, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [a.format(empty=empty, tmp=tmp_path, category=category) for a in args]
    result = CliRunner(mix_stderr=False).invoke(cli, args) if "mix_stderr" in CliRunner.__init__.__code__.co_varnames \
        else CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    message = result.stderr if hasattr(result, "stderr") and result.stderr else result.output
    lines = [line for line in message.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgead: error:") and needle in lines[0], message
    assert "Traceback" not in message


def test_corrupt_training_image_names_the_file(category, tmp_path):
    import shutil

    broken = str(tmp_path / "broken")
    shutil.copytree(category, broken)
    bad = os.path.join(broken, "train", "good", "005.png")
    open(bad, "wb").write(b"\x89PNG garbage")
    result = CliRunner().invoke(cli, ["fit", broken, "-o", str(tmp_path / "b"), "--weights", "random",
                                      "--backbone", "resnet18", "--size", "64"])
    assert result.exit_code == 2 and "005.png" in result.output
    assert not os.path.exists(str(tmp_path / "b" / "model.json"))


@pytest.mark.slow
def test_demo_quick_runs_end_to_end(tmp_path):
    out = str(tmp_path / "demo")
    result = _run(["demo", "--out", out, "--categories", "brick", "--size", "64", "--quick"])
    assert result.exit_code == 0, result.output
    assert "image AUROC" in result.output and "ONNX Runtime vs torch" in result.output
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    from edgead.methods import method_names

    names = method_names()  # every registered method, one row each (one category)
    assert metrics["methods"] == names and [r["method"] for r in metrics["results"]] == names
    assert all(r["category"] == "brick" and r["ms_per_frame"] > 0 for r in metrics["results"])
    table = result.output[result.output.index("method     category"):].splitlines()
    assert table[0].endswith("ms/frame") and [row.split()[0] for row in table[2:2 + len(names)]] == names
    for name in names:
        assert os.listdir(os.path.join(out, "eval", name, "brick", "overlays"))
        assert os.path.isfile(os.path.join(out, "models", name, "brick.onnx"))
        assert os.path.isfile(os.path.join(out, "models", name, "brick", "model.json"))
        assert metrics["compare"][name]["rows"][0]["map"]["max_rel"] < 1e-2
