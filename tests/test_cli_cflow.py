"""CFLOW through the whole command line: fit -> model.json -> eval -> export -> compare -> run (the runtime streams
a CFLOW export unchanged), and its option errors (one line, exit 2, nothing written)."""
import json
import os

import numpy as np
import pytest

from conftest import assert_fit_refused_in_one_line, cli_runner
from edgead.cli import cli

FIT = ["--method", "cflow", "--backbone", "resnet18", "--weights", "random", "--size", "64", "--epochs", "2",
       "--fiber-batch", "128", "--coupling-blocks", "2"]


def _ok(args):
    result = cli_runner().invoke(cli, args)
    assert result.exit_code == 0, (result.output, result.stderr, result.exception)
    return result


@pytest.fixture(scope="module")
def fitted(category, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cf") / "widget.edgead")
    result = _ok(["fit", category, "-o", out, "--folds", "2", "--json"] + FIT)
    return out, json.loads(result.stdout)


def test_fit_writes_a_cflow_bundle_with_its_training_record(fitted):
    out, summary = fitted
    assert summary["method"] == "cflow" and summary["n_train"] == 8
    config = json.load(open(os.path.join(out, "model.json")))
    cflow = config["cflow"]
    assert config["backbone"]["out_indices"] == [2, 3, 4] and cflow["coupling_blocks"] == 2
    assert cflow["epochs"] == 2 and cflow["fiber_batch"] == 128 and cflow["n_heldout"] == 4 and cflow["n_train"] == 4
    assert cflow["training"]["epochs_run"] <= 2 and summary["training"]["seconds_per_epoch"] > 0
    assert config["calibration_provenance"]["method"] == "cflow-held-out-fold"


def test_eval_export_compare_and_run(fitted, category, tmp_path):
    out, _ = fitted
    metrics = json.loads(_ok(["eval", out, category, "--json"]).stdout)
    assert metrics["n_good"] == 3 and metrics["n_defect"] == 3 and 0.0 <= metrics["image_auroc"] <= 1.0
    onnx_path = str(tmp_path / "widget.onnx")
    exported = json.loads(_ok(["export", out, "-o", onnx_path, "--batch", "dynamic", "--json"]).stdout)
    assert exported["tensorrt_problems"] == [] and "Tanh" in exported["ops"]
    images = os.path.join(category, "test", "spot")
    compared = json.loads(_ok(["compare", out, onnx_path, "--images", images, "--frames", "3", "--json"]).stdout)
    assert compared and all(row["score"]["max_rel"] <= 1e-4 for row in compared if "fp16" in row["reference"])
    ran = _ok(["run", onnx_path, "--source", images, "--json", "--providers", "cpu"]).stdout
    records = [json.loads(line) for line in ran.splitlines() if line.startswith("{")]
    scores = [r["score"] for r in records if "score" in r]
    assert len(scores) == 3 and all(np.isfinite(scores))


@pytest.mark.parametrize("args,message", [
    (["--epochs", "0"], "--epochs must be an integer in 1..10000"),
    (["--learning-rate", "x"], "--learning-rate must be a number in (0, 1]"),
    (["--folds", "n"], "--folds n (leave-one-out) does not apply to --method cflow"),
    (["--dim", "10"], "CFLOW models every channel"),
    (["--neighbors", "3"], "--neighbors applies to --method patchcore, not cflow"),
])
def test_bad_cflow_options_are_one_line(category, tmp_path, args, message):
    out = str(tmp_path / "x.edgead")
    assert_fit_refused_in_one_line(cli_runner().invoke(cli, ["fit", category, "-o", out] + FIT + args), message, out)


def test_padim_refuses_cflow_options(category, tmp_path):
    result = cli_runner().invoke(cli, ["fit", category, "-o", str(tmp_path / "x.edgead"), "--weights", "random",
                                       "--epochs", "3"])
    assert result.exit_code == 2 and "--epochs applies to --method cflow, not padim" in result.stderr


def test_val_trains_on_every_image_and_takes_its_thresholds(category, tmp_path):
    """--val: no fold is held out (the flows train on all 8 images for --epochs), and the F1-max thresholds of the
    labelled split are stored instead."""
    out = str(tmp_path / "v.edgead")
    summary = json.loads(_ok(["fit", category, "-o", out, "--val", category, "--json"] + FIT).stdout)
    config = json.load(open(os.path.join(out, "model.json")))
    assert config["cflow"]["n_train"] == 8 and config["cflow"]["n_heldout"] == 0
    assert summary["training"]["epochs_run"] == 2 and not summary["training"]["early_stopping"]
    assert config["calibration_provenance"]["method"] == "validation-f1max"


def test_max_memory_too_small_is_refused_before_embedding(category, tmp_path):
    result = cli_runner().invoke(cli, ["fit", category, "-o", str(tmp_path / "m.edgead"), "--max-memory", "600M",
                                       "--folds", "0"] + FIT)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert "CFLOW on resnet18 at 64x64 on 8 images needs about" in result.stderr and "fit widget" not in result.stderr
