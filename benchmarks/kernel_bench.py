"""Benchmark the fused PaDiM Mahalanobis kernel against a torch baseline and the memory-bandwidth floor.

For each (N, D, P, whitening dtype):
  kernel   edgead_padim_mahalanobis (libedgead_kernels.so via edgead.runtime.cuda_kernel)
  torch    dense batched matmul: ||bmm(W_dense [P, D, D], (x - mean) [P, D, N])|| over D (W stored dense in the
           same dtype, upcast inside bmm for fp16 -> that is what a framework does without a packed kernel)
  floor    bytes of statistics (packed W + mean) + embeddings + output, divided by the measured
           device-to-device copy bandwidth (cudaMemcpy of a 1 GiB buffer: 2 bytes moved per byte copied)
Times are CUDA-event medians over --iters runs after --warmup (milliseconds). Prints a table, writes
``kernel_bench.csv`` and ``kernel_bench.json`` into --out. Needs torch with CUDA; exits 2 without a GPU.

    python benchmarks/kernel_bench.py --out bench_out            # default grid incl. D=550, P=4096, N=1..8
    python benchmarks/kernel_bench.py --configs 1x550x4096 --dtypes fp16 --lib cpp_bindings/build/libedgead_kernels.so
"""
import argparse
import csv
import json
import os
import statistics
import sys

DEFAULT_CONFIGS = ["1x550x4096", "2x550x4096", "4x550x4096", "8x550x4096", "1x100x4096", "8x100x4096",
                   "1x550x1024"]


def parse_config(text):
    """``NxDxP`` -> (N, D, P)."""
    n, dim, num_patches = (int(v) for v in text.lower().split("x"))
    return n, dim, num_patches


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
    floor_ms = (stats_bytes + io_bytes) / (bandwidth * 1e9) * 1e3
    row.update(kernel_ms=round(kernel_ms, 4), floor_ms=round(floor_ms, 4),
               kernel_gbps=round((stats_bytes + io_bytes) / (kernel_ms * 1e-3) / 1e9, 1),
               kernel_vs_floor=round(kernel_ms / floor_ms, 2), stats_mb=round(stats_bytes / 1e6, 1))
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out", help="folder for kernel_bench.csv / .json")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="NxDxP entries")
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "fp32"], choices=["fp16", "fp32"])
    parser.add_argument("--lib", default=None, help="libedgead_kernels.so (default: searched)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--no-baseline", action="store_true", help="skip the torch bmm baseline")
    args = parser.parse_args(argv)

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
    bandwidth = copy_bandwidth_gbps(torch)
    device = torch.cuda.get_device_name()
    print("{}: device-to-device copy bandwidth {:.0f} GB/s".format(device, bandwidth))
    rows = []
    for config in args.configs:
        n, dim, num_patches = parse_config(config)
        for dtype_name in args.dtypes:
            rows.append(bench_one(torch, cuda_kernel, lib, n, dim, num_patches, dtype_name, bandwidth,
                                  args.warmup, args.iters, not args.no_baseline))
    columns = ["N", "D", "P", "whitening", "stats_mb", "kernel_ms", "floor_ms", "kernel_vs_floor", "kernel_gbps",
               "torch_ms", "speedup_vs_torch", "max_rel_diff_vs_torch"]
    print(" ".join("{:>13}".format(c) for c in columns))
    for row in rows:
        print(" ".join("{:>13}".format("-" if row[c] is None else (
            "{:.2e}".format(row[c]) if c == "max_rel_diff_vs_torch" else row[c])) for c in columns))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernel_bench.csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(args.out, "kernel_bench.json"), "w") as fh:
        json.dump({"device": device, "copy_bandwidth_gbps": round(bandwidth, 1), "torch": torch.__version__,
                   "rows": rows}, fh, indent=2)
    print("wrote {}/kernel_bench.csv and kernel_bench.json".format(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
