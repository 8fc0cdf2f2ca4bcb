"""PatchCore through the whole command line: fit -> model.json -> eval -> export -> compare -> run (the runtime is
method-agnostic), and its option errors (one line, exit 2)."""
import json
import os

import numpy as np
import pytest

from conftest import assert_fit_refused_in_one_line, cli_runner
from edgead.cli import cli

FIT = ["--method", "patchcore", "--backbone", "resnet18", "--weights", "random", "--size", "64", "--folds", "4"]


_runner = cli_runner


def _ok(args):
    result = _runner().invoke(cli, args)
    assert result.exit_code == 0, (result.output, result.stderr, result.exception)
    return result


@pytest.fixture(scope="module")
def fitted(category, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pc") / "widget.edgead")
    result = _ok(["fit", category, "-o", out, "--coreset-ratio", "0.5", "--neighbors", "3", "--json"] + FIT)
    return out, json.loads(result.stdout)


def test_fit_writes_a_patchcore_bundle(fitted):
    out, summary = fitted
    assert summary["method"] == "patchcore"
    config = json.load(open(os.path.join(out, "model.json")))
    assert config["method"] == "patchcore" and config["backbone"]["out_indices"] == [2, 3]
    pc = config["patchcore"]
    assert pc["neighbors"] == 3 and pc["n_train"] == 8 and pc["n_patches"] == 8 * 64
    assert pc["coreset_size"] == 256 and pc["coreset_ratio"] == 0.5
    assert config["embedding"]["dim"] == 256 and config["embedding"]["projection"] == "adaptive_avg"
    assert config["calibration_provenance"]["method"] == "patchcore-leave-fold-out"
    assert config["calibration_provenance"]["folds"] == 4 and config["calibration"]["image_threshold"] > 0


def test_eval_export_compare_and_run(fitted, category, tmp_path):
    out, _ = fitted
    metrics = json.loads(_ok(["eval", out, category, "--json"]).stdout)
    assert metrics["n_good"] == 3 and metrics["n_defect"] == 3 and 0.0 <= metrics["image_auroc"] <= 1.0
    onnx_path = str(tmp_path / "widget.onnx")
    exported = json.loads(_ok(["export", out, "-o", onnx_path, "--batch", "dynamic", "--json"]).stdout)
    assert exported["tensorrt_problems"] == [] and "TopK" in exported["ops"] and "GatherND" in exported["ops"]
    images = os.path.join(category, "test", "spot")
    compared = json.loads(_ok(["compare", out, onnx_path, "--images", images, "--frames", "3", "--json"]).stdout)
    assert compared and all(row["map"]["max_rel"] <= 1e-4 for row in compared if "fp16" in row["reference"])
    ran = _ok(["run", onnx_path, "--source", images, "--json", "--providers", "cpu"]).stdout
    records = [json.loads(line) for line in ran.splitlines() if line.startswith("{")]
    scores = [r["score"] for r in records if "score" in r]
    assert len(scores) == 3 and all(np.isfinite(scores))


@pytest.mark.parametrize("args,message", [
    (["--coreset-ratio", "1.5"], "--coreset-ratio must be auto or a number in (0, 1]"),
    (["--neighbors", "0"], "--neighbors must be an integer"),
])
def test_bad_patchcore_options_are_one_line(category, tmp_path, args, message):
    out = str(tmp_path / "x.edgead")
    assert_fit_refused_in_one_line(_runner().invoke(cli, ["fit", category, "-o", out] + FIT + args), message, out)


def test_padim_refuses_patchcore_options(category, tmp_path):
    result = _runner().invoke(cli, ["fit", category, "-o", str(tmp_path / "x.edgead"), "--weights", "random",
                                    "--neighbors", "3"])
    assert result.exit_code == 2 and "--neighbors applies to --method patchcore, not padim" in result.stderr
