"""Every CLI error path: one line ``edgead: error: ...``, exit code 2, no traceback,
output paths checked before the long work starts, and nothing already there touched.

Run/bench inputs: tests/test_run_reliability.py; model.json / metadata contents: tests/test_schema*.py.
"""
import os
import subprocess
import sys

import pytest

from conftest import cli_runner
from edgead.cli import cli


FIT = ["--backbone", "resnet18", "--weights", "random", "--size", "64", "--dim", "16"]


_runner = cli_runner


def _fails_in_one_line(args, match, exit_code=2):
    """Invoke; assert the exit code, one error line matching ``match`` on stderr, and no exception escaped."""
    result = _runner().invoke(cli, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == exit_code, (result.exit_code, result.output)
    stderr = result.stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("edgead: error:")]
    assert len(lines) == 1, stderr
    assert match in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def bundle_dir(category, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("models") / "widget.edgead")
    result = _runner().invoke(cli, ["fit", category, "-o", out] + FIT)
    assert result.exit_code == 0, result.output
    return out


# ---- fit: every output problem is found before the fit starts -------------------------------------

def _fail_when_called(monkeypatch, owner, name, message):
    """Replace ``owner.name`` with a function that fails the test (``message``) if anything calls it."""
    def called(*args, **kwargs):
        raise AssertionError(message)

    monkeypatch.setattr(owner, name, called)


@pytest.fixture()
def no_fit(monkeypatch):
    """Any fit that starts fails the test: output problems must be found before it."""
    from edgead import fit

    _fail_when_called(monkeypatch, fit.PadimFitter, "__init__", "the fit started before the output path was checked")


def test_fit_into_an_existing_file_fails_first_and_leaves_it(category, tmp_path, no_fit):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"13.5 MB of someone's model")
    _fails_in_one_line(["fit", category, "-o", str(target)] + FIT, "not a folder")
    assert target.read_bytes() == b"13.5 MB of someone's model"
    _fails_in_one_line(["fit", category, "-o", ""] + FIT, "empty")
    os.symlink(str(tmp_path / "gone"), str(tmp_path / "dangling"))
    _fails_in_one_line(["fit", category, "-o", str(tmp_path / "dangling")] + FIT, "broken symbolic link")


def test_fit_into_the_data_folder_is_refused(category, no_fit):
    train = os.path.join(category, "train", "good")
    before = sorted(os.listdir(train))
    line = _fails_in_one_line(["fit", category, "-o", train] + FIT, "not an edgead bundle")
    assert train in line and sorted(os.listdir(train)) == before


def test_fit_below_a_file(category, tmp_path, no_fit):
    (tmp_path / "notes.txt").write_text("mine")
    _fails_in_one_line(["fit", category, "-o", str(tmp_path / "notes.txt" / "b.edgead")] + FIT, "is a file")


@pytest.mark.parametrize("option,value,match", [
    ("--dim", "0", "--dim"), ("--dim", "-5", "--dim"), ("--seed", "-1", "--seed"),
    ("--seed", str(2 ** 32), "--seed"), ("--batch-size", "0", "--batch-size"),
    ("--size", "100000", "at most 8192"), ("--size", "63", "--size"), ("--size", "abc", "--size"),
    ("--folds", "1", "--folds"), ("--quantile", "1.5", "quantile"), ("--quantile", "nan", "quantile"),
])
def test_fit_option_out_of_range(category, tmp_path, option, value, match):
    options = {"--backbone": "resnet18", "--weights": "random", "--size": "64", "--dim": "16", option: value}
    args = ["fit", category, "-o", str(tmp_path / "b")] + [x for kv in options.items() for x in kv]
    _fails_in_one_line(args, match)
    assert not os.path.exists(str(tmp_path / "b"))


def test_fit_size_that_does_not_fit_in_memory_fails_before_allocating(category, tmp_path, monkeypatch):
    from edgead import resources

    monkeypatch.setattr(resources, "available_memory_bytes", lambda meminfo=None: 64 << 20)  # a 64 MB machine
    line = _fails_in_one_line(["fit", category, "-o", str(tmp_path / "b"), "--backbone", "resnet18", "--weights",
                               "random", "--size", "1024", "--dim", "100"], "needs about")
    assert "available" in line and "--size" in line and "--max-memory" in line
    assert not os.path.exists(str(tmp_path / "b"))


@pytest.mark.parametrize("budget,match", [("1M", "the budget is 1 MB (--max-memory 1 MB)"),
                                          ("banana", "--max-memory must look like 8G"),
                                          ("0", "--max-memory must be positive"),
                                          ("150%", "a percentage must be in (0, 100]")])
def test_fit_max_memory_refusals_are_one_line(category, tmp_path, budget, match, no_fit_after_plan):
    _fails_in_one_line(["fit", category, "-o", str(tmp_path / "b"), "--max-memory", budget] + FIT, match)
    assert not os.path.exists(str(tmp_path / "b"))


@pytest.fixture()
def no_fit_after_plan(monkeypatch):
    """Fails the test when a batch reaches the accumulator: refusals come before the first image."""
    from edgead import padim

    _fail_when_called(monkeypatch, padim.GaussianAccumulator, "update", "the fit started")


def test_k_fold_that_cannot_hold_a_fold_is_refused_before_the_fit(category, tmp_path, no_fit_after_plan):
    from edgead import resources

    # room for the fit and two images' embeddings (leave-one-out needs one), not for a fold of 4 of the 8 images
    budget = resources.FitMemoryPlan(16 * 16, 16, (64, 64), 16, _backbone_bytes(), 1 << 40).needed(held_images=2)
    line = _fails_in_one_line(["fit", category, "-o", str(tmp_path / "b"), "--folds", "2",
                               "--max-memory", str(budget)] + FIT, "with 2-fold thresholds")
    assert "--folds n" in line


def _backbone_bytes():
    from edgead.weights import load_backbone

    extractor, _ = load_backbone("resnet18", "random", seed=0, input_hw=(64, 64))
    return sum(t.numel() * t.element_size() for t in extractor.state_dict().values())


def test_unpicklable_weights_file_gives_no_unsafe_advice(category, tmp_path):
    import torch

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    evil = tmp_path / "evil.pt"
    torch.save({"conv1.weight": torch.zeros(1), "x": Payload()}, str(evil))
    line = _fails_in_one_line(["fit", category, "-o", str(tmp_path / "b"), "--backbone", "resnet18",
                               "--weights", str(evil), "--size", "64"], "never unpickles")
    assert "weights_only" not in line and "False" not in line


# ---- eval / demo / export output paths ----------------------------------------------------------

def test_eval_out_that_is_a_file(bundle_dir, category, tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("{}")
    _fails_in_one_line(["eval", bundle_dir, category, "--out", str(target)], "not a folder")
    assert target.read_text() == "{}"


def test_eval_out_never_overwrites_files_it_did_not_write(bundle_dir, category, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "metrics.json").write_text("MY FILE")
    _fails_in_one_line(["eval", bundle_dir, category, "--out", str(out)], "--force")
    assert (out / "metrics.json").read_text() == "MY FILE"
    result = _runner().invoke(cli, ["eval", bundle_dir, category, "--out", str(out), "--force", "--no-overlays"])
    assert result.exit_code == 0, result.output
    again = _runner().invoke(cli, ["eval", bundle_dir, category, "--out", str(out), "--no-overlays"])
    assert again.exit_code == 0, again.output  # its own metrics.json: rewritten without --force


def test_eval_calibrate_checks_the_bundle_before_evaluating(bundle_dir, category, tmp_path, monkeypatch):
    from edgead import evaluate

    def started(*args, **kwargs):
        raise AssertionError("evaluation started")

    monkeypatch.setattr(evaluate, "evaluate_category", started)
    _fails_in_one_line(["eval", bundle_dir, category, "--out", os.path.join(bundle_dir, "eval"), "--calibrate"],
                       "inside the bundle")
    assert sorted(os.listdir(bundle_dir))[0] == "model.json" and len(os.listdir(bundle_dir)) == 2


def test_undefined_metrics_are_strict_json_null(bundle_dir, category, tmp_path, monkeypatch):
    """eval --json and metrics.json: an undefined metric (NaN) is null, never a bare NaN."""
    import json

    from edgead import evaluate

    real = evaluate.evaluate_category

    def with_nan(*args, **kwargs):
        return dict(real(*args, **kwargs), pro=float("nan"))

    monkeypatch.setattr(evaluate, "evaluate_category", with_nan)
    out = tmp_path / "eval"
    result = _runner().invoke(cli, ["eval", bundle_dir, category, "--out", str(out), "--no-overlays", "--json"])
    assert result.exit_code == 0, result.output

    def strict(name):
        raise ValueError(name)

    printed = json.loads(result.stdout, parse_constant=strict)
    written = json.loads((out / "metrics.json").read_text(), parse_constant=strict)
    assert printed["pro"] is None and written["pro"] is None and printed["image_auroc"] == written["image_auroc"]


def test_top_level_option_errors_are_one_line():
    _fails_in_one_line(["--bogus"], "No such option")
    _fails_in_one_line(["fitt"], "No such command")


def test_corrupt_checkpoint_is_not_called_a_pickle_with_code(category, tmp_path):
    junk = tmp_path / "random.pth"
    junk.write_bytes(bytes(range(100)))
    line = _fails_in_one_line(["fit", category, "-o", str(tmp_path / "b"), "--backbone", "resnet18",
                               "--weights", str(junk), "--size", "64"], "random.pth")
    assert "never unpickles" not in line


def test_demo_out_that_is_a_file(tmp_path):
    target = tmp_path / "demo_out"
    target.write_text("mine")
    _fails_in_one_line(["demo", "--out", str(target), "--quick"], "not a folder")


def test_export_into_a_folder_or_a_missing_parent(bundle_dir, tmp_path):
    _fails_in_one_line(["export", bundle_dir, "-o", str(tmp_path)], "is a folder")
    _fails_in_one_line(["export", bundle_dir, "-o", str(tmp_path / "no" / "m.onnx")], "does not exist")


def test_export_never_replaces_a_file_that_is_not_an_edgead_model(bundle_dir, tmp_path):
    target = tmp_path / "notes.onnx"
    target.write_bytes(b"my notes, not a model")
    _fails_in_one_line(["export", bundle_dir, "-o", str(target)], "--force")
    assert target.read_bytes() == b"my notes, not a model"
    image = tmp_path / "part.png"
    image.write_bytes(b"\x89PNG")
    _fails_in_one_line(["export", bundle_dir, "-o", str(image)], ".onnx")
    result = _runner().invoke(cli, ["export", bundle_dir, "-o", str(target), "--force"])
    assert result.exit_code == 0, result.output
    again = _runner().invoke(cli, ["export", bundle_dir, "-o", str(target)])  # our own model: replaced
    assert again.exit_code == 0, again.output


# ---- unexpected exceptions: one line and a --debug hint --------------------------------------------

def test_unexpected_exception_is_one_line_with_a_debug_hint(bundle_dir, tmp_path, monkeypatch):
    from edgead.exporters import onnx_export

    def broken(*args, **kwargs):
        raise ValueError("internal shape mismatch\nsecond line of detail")

    monkeypatch.setattr(onnx_export, "export_onnx", broken)
    line = _fails_in_one_line(["export", bundle_dir, "-o", str(tmp_path / "m.onnx")], "unexpected ValueError")
    assert "internal shape mismatch second line of detail" in line and "--debug" in line
    result = _runner().invoke(cli, ["--debug", "export", bundle_dir, "-o", str(tmp_path / "m.onnx")])
    assert isinstance(result.exception, ValueError)  # --debug lets the traceback through


def test_out_of_memory_and_os_errors_are_one_line(bundle_dir, tmp_path, monkeypatch):
    import errno

    from edgead.exporters import onnx_export

    def oom(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(onnx_export, "export_onnx", oom)
    _fails_in_one_line(["export", bundle_dir, "-o", str(tmp_path / "m.onnx")], "out of memory")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "m.onnx"))

    monkeypatch.setattr(onnx_export, "export_onnx", full)
    line = _fails_in_one_line(["export", bundle_dir, "-o", str(tmp_path / "m.onnx")], "No space left on device")
    assert str(tmp_path / "m.onnx") in line


def test_a_real_process_prints_one_line_and_exits_2(tmp_path):
    """No CliRunner: the installed entry point, stderr exactly one line."""
    proc = subprocess.run([sys.executable, "-m", "edgead", "export", str(tmp_path / "nothing"), "-o",
                           str(tmp_path / "m.onnx")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.decode().count("\n") == 1 and proc.stderr.startswith(b"edgead: error:"), proc.stderr
