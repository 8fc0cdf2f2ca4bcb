"""Shared fixtures: a tiny seeded random-weight PaDiM bundle (no downloads, a few seconds on 2 cores)."""
import numpy as np
import pytest
import torch

torch.set_num_threads(2)

TINY_HW = (64, 64)


def random_frames(n, hw=TINY_HW, seed=0):
    """uint8 ``[n, H, W, 3]`` smooth-ish random frames (blurred noise, so features are not degenerate)."""
    import cv2

    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, size=(n, hw[0], hw[1], 3), dtype=np.uint8)
    return np.stack([cv2.GaussianBlur(f, (5, 5), 1.5) for f in frames])


def assert_refused_in_one_line(result, message):
    """A refused CLI command: exit 2, no traceback, exactly one ``edgead: error:`` line holding ``message``."""
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("edgead: error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr


def assert_fit_refused_in_one_line(result, message, out):
    """A refused ``edgead fit`` (``assert_refused_in_one_line``) that wrote nothing at ``out``."""
    import os

    assert_refused_in_one_line(result, message)
    assert not os.path.exists(out)


def cli_runner():
    """A click CliRunner whose result keeps stderr apart from stdout (``result.stderr``), on every click version."""
    from click.testing import CliRunner

    try:
        return CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 keeps stderr apart already
        return CliRunner()


def write_category(root, n_train=8, n_good=3, n_bad=3):
    """An MVTec-layout category of random frames: train/good, test/good, test/spot (magenta discs) + masks."""
    import os

    import cv2

    frames = random_frames(n_train + n_good + n_bad, seed=2)
    os.makedirs(os.path.join(root, "train", "good"))
    os.makedirs(os.path.join(root, "test", "good"))
    os.makedirs(os.path.join(root, "test", "spot"))
    os.makedirs(os.path.join(root, "ground_truth", "spot"))
    for i in range(n_train):
        cv2.imwrite(os.path.join(root, "train", "good", "%03d.png" % i), frames[i][:, :, ::-1])
    for i in range(n_good):
        cv2.imwrite(os.path.join(root, "test", "good", "%03d.png" % i), frames[n_train + i][:, :, ::-1])
    for i in range(n_bad):
        img = frames[n_train + n_good + i].copy()
        mask = np.zeros(img.shape[:2], np.uint8)
        cv2.circle(mask, (20 + 8 * i, 30), 8, 255, -1)
        img[mask > 0] = (255, 0, 255)
        cv2.imwrite(os.path.join(root, "test", "spot", "%03d.png" % i), img[:, :, ::-1])
        cv2.imwrite(os.path.join(root, "ground_truth", "spot", "%03d_mask.png" % i), mask)
    return root


@pytest.fixture(scope="module")
def category(tmp_path_factory):
    """``write_category`` into a fresh ``widget`` folder, once per test module."""
    return write_category(str(tmp_path_factory.mktemp("data") / "widget"))


@pytest.fixture(scope="session")
def tiny_bundle():
    """PaDiM on resnet18 (random weights, seed 0), 64x64 input, D = 24, fitted on 12 frames."""
    from edgead.fit import fit_padim

    frames = random_frames(12)
    return fit_padim([frames[:5], frames[5:]], backbone="resnet18", weights="random", input_hw=TINY_HW, dim=24)


@pytest.fixture(scope="session")
def cpu_reference_lib(tmp_path_factory):
    """``cpp_bindings/src/padim_mahalanobis_ref.cpp`` built with g++ alone (``-DEDGEAD_CPU_ONLY``, no CUDA) and
    loaded through ``edgead.runtime.cuda_kernel.load_library``: the C ABI's CPU reference."""
    import os
    import shutil
    import subprocess

    from edgead.runtime import cuda_kernel

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    native = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cpp_bindings")
    out = str(tmp_path_factory.mktemp("cpu_reference") / "libedgead_kernels_cpu.so")
    proc = subprocess.run([cxx, "-std=c++11", "-O2", "-shared", "-fPIC", "-DEDGEAD_CPU_ONLY",
                           "-I" + os.path.join(native, "include"), "-I" + os.path.join(native, "src"),
                           os.path.join(native, "src", "padim_mahalanobis_ref.cpp"), "-o", out],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    assert proc.returncode == 0, proc.stdout.decode()[-3000:]
    return cuda_kernel.load_library(out)
