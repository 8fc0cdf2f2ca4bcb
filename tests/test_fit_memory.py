"""The fit's memory budget (edgead.resources.FitMemoryPlan, ``--max-memory``) and what it bounds.

References: the byte counts are recomputed from P, D and T = D(D+1)/2 by hand; the leave-one-out groups
are checked against the one-group result (exact: the groups only change how many images share one
Cholesky sweep); peak memory is measured in a fresh process (VmHWM after resetting it once the model is
loaded), against the plan's own estimate, at sizes where a second full-size copy of the statistics would
exceed it.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from edgead import fit, resources
from edgead.errors import ConfigError
from edgead.fit import PadimFitter

from conftest import TINY_HW, random_frames

GB = 1000 ** 3


@pytest.mark.parametrize("text,expected", [("8G", 8 * GB), ("7.5GB", int(7.5 * GB)), ("6GiB", 6 << 30), ("8Gi", 8 << 30),
                                           ("512Mi", 512 << 20), ("4ki", 4096), (".5G", GB // 2), ("8 G", 8 * GB),
                                           ("512MB", 512 * 1000 ** 2), ("512m", 512 * 1000 ** 2),
                                           ("100 MiB", 100 << 20), ("123456", 123456), ("2t", 2 * 1000 ** 4)])
def test_parse_memory_size(text, expected):
    assert resources.parse_memory_size(text) == expected


def test_parse_memory_size_percentage_is_of_the_available_memory(monkeypatch):
    monkeypatch.setattr(resources, "available_memory_bytes", lambda meminfo=None: 10 * GB)
    assert resources.parse_memory_size("70%") == 7 * GB
    monkeypatch.setattr(resources, "available_memory_bytes", lambda meminfo=None: None)
    with pytest.raises(ConfigError, match="available memory is unknown"):
        resources.parse_memory_size("70%")


@pytest.mark.parametrize("bad", ["", "eight", "8X", "-1G", "0", "0%", "101%", "1e9", "G"])
def test_parse_memory_size_refuses(bad):
    with pytest.raises(ConfigError, match="--max-memory"):
        resources.parse_memory_size(bad)


def test_wide_resnet50_plan_numbers():
    """WideResNet50 at 256 px: P = 64 x 64, D = 550, T = 151525 (the issue's 4.96 GB accumulator)."""
    plan = resources.FitMemoryPlan(4096, 550, (256, 256), 16, backbone_bytes=99_450_112, budget=64 * GB)
    assert plan.statistics == 4096 * (550 + 151525) * 8 == 4_983_193_600
    assert plan.image_bytes == 4096 * 550 * 4
    assert plan.chunk_bytes == resources.CHUNK_TARGET_BYTES == 128 << 20
    assert plan.needed() == (resources.RUNTIME_BYTES + 99_450_112 + 4_983_193_600
                             + 16 * (256 * 256 * resources.ACTIVATION_BYTES_PER_PIXEL + 2 * 4096 * 550 * 4)
                             + 4 * (128 << 20))
    assert plan.needed() < 7.5 * GB  # the goal, with room for what the estimate does not see
    assert plan.group_images(200) == int(0.1 * 4_983_193_600) // (4096 * 550 * 4) == 55  # 10 % of the statistics
    assert plan.group_images(30) == 30


def test_a_tight_budget_shrinks_chunks_and_groups_before_it_refuses():
    roomy = resources.FitMemoryPlan(4096, 550, (256, 256), 1, budget=64 * GB)
    tight_budget = roomy.needed(held_images=1) - 4 * (100 << 20)  # 400 MB less than the roomy plan wants
    tight = resources.FitMemoryPlan(4096, 550, (256, 256), 1, budget=tight_budget)
    assert tight.chunk_bytes == (tight_budget - tight.fixed - tight.batch_bytes - tight.image_bytes) // 4
    assert tight.chunk_bytes < roomy.chunk_bytes
    assert tight.needed(held_images=1) <= tight_budget
    assert tight.group_images(200) == 1
    tight.check("fit")
    floor = resources.FitMemoryPlan(4096, 550, (256, 256), 1, budget=tight.fixed)  # not even a batch fits
    assert floor.chunk_bytes == 8 * 550 * 550  # one patch: the least a chunk can be
    with pytest.raises(ConfigError) as info:
        floor.check("fitting wide_resnet50_2 at 256x256")
    message = str(info.value)
    assert "\n" not in message
    assert "fitting wide_resnet50_2 at 256x256 needs about" in message
    assert "4.98 GB float64 statistics for 4096 patches x D = 550" in message
    assert "--max-memory" in message and "--size" in message


def test_default_budget_is_a_fraction_of_the_available_memory_plus_what_the_process_holds(monkeypatch):
    plan = resources.FitMemoryPlan(100, 10, (64, 64), 1, available=20 * GB, held=GB)
    assert plan.budget == int(20 * GB * resources.DEFAULT_FRACTION) + GB
    assert "85% of the 20 GB available + the 1 GB this process holds" in plan.budget_source
    monkeypatch.setattr(resources, "process_rss_bytes", lambda status=None: 3 * GB)
    assert resources.FitMemoryPlan(100, 10, (64, 64), 1, available=10 * GB).budget == int(8.5 * GB) + 3 * GB


def test_process_rss_is_this_process():
    rss = resources.process_rss_bytes()
    assert 20 << 20 < rss < 64 * GB  # python + torch + numpy are resident
    assert resources.process_rss_bytes("/nonexistent/status") == 0


def test_unknown_available_memory_means_no_budget(monkeypatch):
    monkeypatch.setattr(resources, "available_memory_bytes", lambda meminfo=None: None)
    plan = resources.FitMemoryPlan(4096, 550, (256, 256), 16)
    assert plan.budget is None and plan.budget_source == "unlimited"
    assert plan.chunk_bytes == resources.CHUNK_TARGET_BYTES
    assert plan.group_images(200) == 55
    small = resources.FitMemoryPlan(4096, 100, (256, 256), 16)  # 169 MB of statistics: the 64 MB floor
    assert small.group_images(200) == (64 << 20) // (4096 * 100 * 4) == 40
    assert plan.check("fit") == plan.needed()  # nothing to refuse against


def test_fitter_refuses_a_budget_it_cannot_keep_before_the_first_image():
    with pytest.raises(ConfigError, match="fitting resnet18 at 64x64 needs about"):
        PadimFitter("resnet18", "random", TINY_HW, dim=16, max_memory=100 << 20)


def test_leave_one_out_groups_give_the_one_group_scores(monkeypatch):
    frames = random_frames(9, seed=8)
    fitter = PadimFitter("resnet18", "random", TINY_HW, dim=10, batch_size=2)
    for start in range(0, 9, 2):
        fitter.update(frames[start:start + 2])
    batches = [frames[start:start + 2] for start in range(0, 9, 2)]
    whole = fitter.leave_one_out_scores(batches)
    assert fitter.memory.group_images(9) == 9
    sweeps = []
    original = fitter.accumulator.leave_one_out_distance
    monkeypatch.setattr(fitter.accumulator, "leave_one_out_distance",
                        lambda emb, eps: sweeps.append(len(emb)) or original(emb, eps))
    monkeypatch.setattr(resources, "GROUP_TARGET_BYTES", 5 * fitter.memory.image_bytes)
    monkeypatch.setattr(fit, "MAP_SLICE", 3)  # and the maps of 3 images at a time
    grouped = fitter.leave_one_out_scores(batches)
    assert sweeps == [4, 5]  # whole batches (2, 2, 2, 2, 1 images), at most 5 images a group
    for got, expected in zip(grouped, whole):
        np.testing.assert_allclose(got, expected, rtol=1e-12)


CHILD = r"""
import json, sys, torch
torch.set_num_threads(1)
from edgead.fit import PadimFitter
from conftest import random_frames

def status(key):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(key + ":"))

budget = int(sys.argv[1])
fitter = PadimFitter("resnet18", "random", (128, 128), dim=300, batch_size=2, max_memory=budget)
frames = random_frames(5, hw=(128, 128), seed=1)
fitter.embed(frames[:2])  # warm-up: allocator pools of the backbone are in the baseline
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # VmHWM := VmRSS: the peak below is the fit's own
base = status("VmRSS")
for start in range(0, 5, 2):
    fitter.update(frames[start:start + 2])
bundle = fitter.bundle()
plan = fitter.memory
print(json.dumps({"base": base, "peak": status("VmHWM"), "statistics": plan.statistics, "chunk": plan.chunk_bytes,
                  "batch": plan.batch_bytes, "whitening": bundle.whitening_packed.nbytes}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_fit_peak_memory_is_the_statistics_plus_the_planned_working_set():
    """P = 1024, D = 300: 372 MB of float64 sums, a 186 MB float32 whitening. With a budget that leaves ~8 MB
    chunks, the fit's peak above the allocated sums stays within the planned batch and chunks + 60 MB; a
    separate float32 result (+186 MB) or a float64 copy of the sums (+372 MB) would not."""
    probe = resources.FitMemoryPlan(1024, 300, (128, 128), 2, budget=1 << 50)
    from edgead.weights import load_backbone

    extractor, _ = load_backbone("resnet18", "random", seed=0, input_hw=(128, 128))
    backbone = sum(t.numel() * t.element_size() for t in extractor.state_dict().values())
    budget = probe.fixed + backbone + probe.batch_bytes + probe.image_bytes + resources.CHUNK_TEMPORARIES * (8 << 20)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=tests_dir + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, "-c", CHILD, str(budget)], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["chunk"] <= (8 << 20) + 8 * 300 * 300
    assert got["statistics"] == 1024 * (300 + 45150) * 8
    assert got["base"] >= got["statistics"]  # the sums are allocated and touched when the fitter is made
    grown = got["peak"] - got["base"]
    allowed = got["batch"] + resources.CHUNK_TEMPORARIES * got["chunk"] + (60 << 20)
    assert grown <= allowed, (grown / 1e6, allowed / 1e6)
    assert allowed < got["whitening"]  # so a separate float32 result would not fit in it
