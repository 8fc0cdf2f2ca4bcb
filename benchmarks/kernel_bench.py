"""Benchmark the fused PaDiM Mahalanobis kernel against a torch baseline and the memory-bandwidth floor.

For each (N, D, P, whitening dtype):
  kernel   edgead_padim_mahalanobis (libedgead_kernels.so via edgead.runtime.cuda_kernel)
  torch    dense batched matmul: ||bmm(W_dense [P, D, D], (x - mean) [P, D, N])|| over D (W stored dense in the
           same dtype, upcast inside bmm for fp16 -> that is what a framework does without a packed kernel)
  floor    bytes of statistics (packed W + mean) + embeddings + output, divided by the measured
           device-to-device copy bandwidth (cudaMemcpy of a 1 GiB buffer: 2 bytes moved per byte copied)
Columns: kernel_ms / floor_ms / torch_ms (CUDA-event medians over --iters runs after --warmup), kernel_gbps
(bytes above / kernel time), pct_of_floor (floor_ms / kernel_ms, 100 = at the copy bandwidth),
speedup_vs_torch (torch_ms / kernel_ms). Prints a table, writes ``kernel_bench.csv``, ``kernel_bench.json`` and,
when matplotlib is importable, ``kernel_bench.png`` (kernel vs floor vs torch) into --out.
Needs torch with CUDA; exits 2 without a GPU. ``benchmarks/gpu_check.py`` (``make gpu-check``) calls ``run``.

    python benchmarks/kernel_bench.py --out bench_out            # default grid incl. D=550, P=4096, N=1..8
    python benchmarks/kernel_bench.py --configs 1x550x4096 --dtypes fp16 --lib cpp_bindings/build/libedgead_kernels.so
    python benchmarks/kernel_bench.py --batches 1 2 4 8 12 --dims 100 550 --patches 4096   # a grid
"""
import argparse
import csv
import json
import math
import os
import statistics
import sys
import time

DEFAULT_CONFIGS = ["1x550x4096", "2x550x4096", "4x550x4096", "8x550x4096", "1x100x4096", "8x100x4096",
                   "1x550x1024"]
COLUMNS = ["N", "D", "P", "whitening", "stats_mb", "kernel_ms", "floor_ms", "kernel_vs_floor", "pct_of_floor",
           "kernel_gbps", "torch_ms", "speedup_vs_torch", "max_rel_diff_vs_torch"]


def parse_config(text):
    """``NxDxP`` -> (N, D, P)."""
    n, dim, num_patches = (int(v) for v in text.lower().split("x"))
    return n, dim, num_patches


def grid_configs(batches, dims, patches):
    """Every ``NxDxP`` of the grid, D outermost, then P, then N."""
    return ["{}x{}x{}".format(n, dim, num_patches) for dim in dims for num_patches in patches for n in batches]


def time_ms(torch, fn, warmup, iters):
    """Median CUDA-event time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def copy_bandwidth_gbps(torch, nbytes=1 << 30, iters=10):
    """Device-to-device copy bandwidth in GB/s (read + write bytes per second)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(torch, lambda: dst.copy_(src), 3, iters)
    src = dst = None  # free before empty_cache (rebinding: the lambda above keeps the names)
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3) / 1e9


def derived(moved_bytes, kernel_ms, bandwidth_gbps):
    """floor_ms, kernel_gbps, kernel_vs_floor, pct_of_floor for ``moved_bytes`` moved in ``kernel_ms``."""
    floor_ms = moved_bytes / (bandwidth_gbps * 1e9) * 1e3
    return {"floor_ms": round(floor_ms, 4), "kernel_gbps": round(moved_bytes / (kernel_ms * 1e-3) / 1e9, 1),
            "kernel_vs_floor": round(kernel_ms / floor_ms, 2), "pct_of_floor": round(100.0 * floor_ms / kernel_ms, 1)}


def bench_one(torch, cuda_kernel, lib, n, dim, num_patches, dtype_name, bandwidth, warmup, iters, baseline):
    """One row of the table (dict)."""
    from edgead import packing

    dtype = torch.float16 if dtype_name == "fp16" else torch.float32
    tri = dim * (dim + 1) // 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    mean = torch.randn((num_patches, dim), device="cuda", generator=gen)
    x = (mean.T[None] + torch.randn((n, dim, num_patches), device="cuda", generator=gen)).contiguous()
    w = (torch.randn((num_patches, tri), device="cuda", generator=gen) / dim ** 0.5).to(dtype)
    out = torch.empty((n, num_patches), device="cuda")
    stream = torch.cuda.current_stream().cuda_stream

    def run_kernel():
        cuda_kernel.padim_mahalanobis(x, mean, w, out, stream=stream, lib=lib)

    kernel_ms = time_ms(torch, run_kernel, warmup, iters)
    row = {"N": n, "D": dim, "P": num_patches, "whitening": dtype_name}
    stats_bytes = w.numel() * w.element_size() + mean.numel() * 4
    io_bytes = x.numel() * 4 + out.numel() * 4
    row.update(kernel_ms=round(kernel_ms, 4), stats_mb=round(stats_bytes / 1e6, 1))
    row.update(derived(stats_bytes + io_bytes, kernel_ms, bandwidth))
    torch_ms = None
    max_rel = None
    dense_bytes = num_patches * dim * dim * w.element_size()
    if baseline and dense_bytes < torch.cuda.mem_get_info()[0] * 0.6:
        index = torch.as_tensor(packing.dense_gather_index(dim), device="cuda")
        dense = torch.nn.functional.pad(w, (0, 1))[:, index]                 # [P, D, D] in the storage dtype
        def run_torch():
            centred = (x.permute(2, 1, 0) - mean[:, :, None]).to(dtype)       # [P, D, N]
            return torch.linalg.vector_norm(torch.bmm(dense, centred).float(), dim=1).T
        torch_ms = time_ms(torch, run_torch, warmup, iters)
        expected = run_torch()
        run_kernel()
        torch.cuda.synchronize()
        max_rel = float(((out - expected).abs() / expected.clamp_min(1e-12)).max())
        dense = None
    row.update(torch_ms=None if torch_ms is None else round(torch_ms, 4),
               speedup_vs_torch=None if torch_ms is None else round(torch_ms / kernel_ms, 2),
               max_rel_diff_vs_torch=max_rel)
    x = mean = w = out = None
    torch.cuda.empty_cache()
    return row


def run(torch, cuda_kernel, lib, configs, dtypes, warmup=5, iters=30, baseline=True, bandwidth=None,
        deadline=None, log=print):
    """Time every config x dtype; returns ``{"device", "copy_bandwidth_gbps", "torch", "rows", "skipped"}``.

    ``deadline``: a ``time.time()`` after which no further row is started (those land in ``skipped``).
    """
    if bandwidth is None:
        bandwidth = copy_bandwidth_gbps(torch)
    device = torch.cuda.get_device_name()
    log("{}: device-to-device copy bandwidth {:.0f} GB/s".format(device, bandwidth))
    rows, skipped = [], []
    for config in configs:
        n, dim, num_patches = parse_config(config)
        for dtype_name in dtypes:
            if deadline is not None and time.time() > deadline:
                skipped.append("{} {}".format(config, dtype_name))
                continue
            rows.append(bench_one(torch, cuda_kernel, lib, n, dim, num_patches, dtype_name, bandwidth,
                                  warmup, iters, baseline))
    if skipped:
        log("kernel_bench: time budget spent, skipped {} rows: {}".format(len(skipped), ", ".join(skipped)))
    return {"device": device, "copy_bandwidth_gbps": round(bandwidth, 1), "torch": torch.__version__,
            "rows": rows, "skipped": skipped}


def format_table(rows, columns=COLUMNS):
    """Fixed-width text table of ``rows`` (missing values as ``-``)."""
    def cell(row, column):
        value = row.get(column)
        if value is None:
            return "-"
        return "{:.2e}".format(value) if column == "max_rel_diff_vs_torch" else str(value)

    lines = [" ".join("{:>13}".format(c) for c in columns)]
    lines += [" ".join("{:>13}".format(cell(row, c)) for c in columns) for row in rows]
    return "\n".join(lines)


def plot(rows, path):
    """Bar chart (log ms) of kernel vs bandwidth floor vs torch bmm per row, one panel per whitening dtype.

    Returns ``(path, None)``, or ``(None, reason)`` when matplotlib is not importable or there is nothing to plot.
    """
    if not rows:
        return None, "no benchmark rows"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return None, "matplotlib not importable ({})".format(exc)
    dtypes = sorted({row["whitening"] for row in rows})
    width = max(6.0, 0.55 * max(sum(1 for r in rows if r["whitening"] == d) for d in dtypes) + 2)
    fig, axes = plt.subplots(len(dtypes), 1, figsize=(width, 3.4 * len(dtypes)), squeeze=False)
    nan = float("nan")
    for ax, dtype_name in zip(axes[:, 0], dtypes):
        sub = [r for r in rows if r["whitening"] == dtype_name]
        xs = list(range(len(sub)))
        bar = 0.27
        ax.bar([x - bar for x in xs], [r["floor_ms"] for r in sub], bar, label="bandwidth floor", color="#9e9e9e")
        ax.bar(xs, [r["kernel_ms"] for r in sub], bar, label="edgead kernel", color="#1f77b4")
        ax.bar([x + bar for x in xs], [nan if r.get("torch_ms") is None else r["torch_ms"] for r in sub], bar,
               label="torch bmm (dense W)", color="#ff7f0e")
        ax.set_yscale("log")
        ax.set_ylabel("ms (median)")
        ax.set_xticks(xs)
        ax.set_xticklabels(["N{} D{}\nP{}".format(r["N"], r["D"], r["P"]) for r in sub], fontsize=7)
        ax.set_title("PaDiM Mahalanobis, {} whitening".format(dtype_name), fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path, None


def strict_json(value):
    """``value`` with non-finite floats as None (strict JSON: no bare NaN / Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_outputs(out_dir, result, with_plot=True):
    """``kernel_bench.csv`` / ``.json`` (+ ``.png``) of a ``run`` result; returns the plot path or None."""
    os.makedirs(out_dir, exist_ok=True)
    rows = result["rows"]
    with open(os.path.join(out_dir, "kernel_bench.csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    plot_path, reason = plot(rows, os.path.join(out_dir, "kernel_bench.png")) if with_plot else (None, "--no-plot")
    payload = dict(result, plot=plot_path, plot_skipped=reason)
    with open(os.path.join(out_dir, "kernel_bench.json"), "w") as fh:
        json.dump(strict_json(payload), fh, indent=2, allow_nan=False)
    return plot_path, reason


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out", help="folder for kernel_bench.csv / .json / .png")
    parser.add_argument("--configs", nargs="+", default=None, help="NxDxP entries (default: {})".format(
        " ".join(DEFAULT_CONFIGS)))
    parser.add_argument("--batches", nargs="+", type=int, help="grid instead of --configs: batch sizes N")
    parser.add_argument("--dims", nargs="+", type=int, default=[550], help="grid: embedding dims D")
    parser.add_argument("--patches", nargs="+", type=int, default=[4096], help="grid: patch counts P")
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "fp32"], choices=["fp16", "fp32"])
    parser.add_argument("--lib", default=None, help="libedgead_kernels.so (default: searched)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--no-baseline", action="store_true", help="skip the torch bmm baseline")
    parser.add_argument("--no-plot", action="store_true", help="do not write kernel_bench.png")
    args = parser.parse_args(argv)
    if args.batches and args.configs:
        parser.error("give --configs or --batches/--dims/--patches, not both")
    configs = grid_configs(args.batches, args.dims, args.patches) if args.batches else (
        args.configs or DEFAULT_CONFIGS)

    import torch

    from edgead.errors import EdgeadError
    from edgead.runtime import cuda_kernel

    if not torch.cuda.is_available():
        print("kernel_bench: no CUDA GPU visible to torch", file=sys.stderr)
        return 2
    try:
        lib = cuda_kernel.load_library(args.lib)
    except EdgeadError as exc:
        print("kernel_bench: {}".format(exc), file=sys.stderr)
        return 2
    result = run(torch, cuda_kernel, lib, configs, args.dtypes, args.warmup, args.iters, not args.no_baseline)
    print(format_table(result["rows"]))
    plot_path, reason = write_outputs(args.out, result, with_plot=not args.no_plot)
    print("wrote {}/kernel_bench.csv and kernel_bench.json{}".format(
        args.out, "" if plot_path is None else " and kernel_bench.png"))
    if reason and not args.no_plot:
        print("kernel_bench: no plot: {}".format(reason))
    return 0


if __name__ == "__main__":
    sys.exit(main())
