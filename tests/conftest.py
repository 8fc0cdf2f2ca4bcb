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
