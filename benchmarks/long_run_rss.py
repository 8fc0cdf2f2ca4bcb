"""Does a long ``edgead run`` grow in memory? RSS of the Pipeline over 100 000 frames.

The runtime Pipeline (capture thread, bounded queue, ONNX Runtime CPU, boxes, bounded per-stage timing
summaries) streams ``synthetic://?width=128&height=128&frames=N`` through a tiny edgead-contract ONNX
model built here with ``onnx.helper`` (mean brightness as the anomaly map: the model costs ~nothing, so
the Python side of the pipeline dominates). RSS (psutil) is sampled every ``--every`` frames. The verdict
is the RSS growth from frame ``--warmup-frames`` to the end: PASS when it is under 5 MB.

``--legacy-lists`` also appends every timing to a Python list per stage, as the pipeline did before the
bounded summaries, to show what that costs on the same run.

    python benchmarks/long_run_rss.py --out bench_out [--quick] [--frames 100000] [--annotate] [--legacy-lists]

Writes OUT/long_run_rss[_annotate][_legacy].{json,csv,png}.
"""
import argparse
import os
import sys
import tempfile
import time

LIMIT_MB = 5.0


def build_model(path, hw=(64, 64)):
    """Tiny model obeying the ONNX contract (uint8 [1, H, W, 3] -> anomaly_map [1, 1, H, W], score [1]): the
    test suite's fake model (``tests/fake_models.py``: mean brightness as the map, its max as the score)."""
    tests_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    from fake_models import write_fake_model

    return write_fake_model(path, hw=hw)


def rss_mb(process):
    return process.memory_info().rss / float(1 << 20)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--frames", type=int, default=100000)
    parser.add_argument("--size", type=int, default=128, help="synthetic frame width and height")
    parser.add_argument("--every", type=int, default=1000, help="RSS sample interval (frames)")
    parser.add_argument("--warmup-frames", type=int, default=10000, help="growth is measured from this frame on")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--annotate", action="store_true", help="also draw the overlay on every frame")
    parser.add_argument("--legacy-lists", action="store_true",
                        help="also keep every timing in a list per stage (the old, unbounded pipeline)")
    parser.add_argument("--quick", action="store_true", help="20 000 frames, growth from frame 5 000 (smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.frames, args.warmup_frames = min(args.frames, 20000), 5000

    import psutil

    from _report import pyplot, write_outputs
    from edgead.runtime import pipeline as pl
    from edgead.runtime.engines.ort_engine import OrtEngine
    from edgead.runtime.sources import make_source

    process = psutil.Process()
    legacy = {}

    class LegacyPipeline(pl.Pipeline):
        def record(self, stage, seconds):
            pl.Pipeline.record(self, stage, seconds)
            legacy.setdefault(stage, []).append(float(seconds))

    with tempfile.TemporaryDirectory(prefix="edgead_rss_") as tmp:
        engine = OrtEngine(build_model(os.path.join(tmp, "tiny.onnx")), threads=args.threads)
        uri = "synthetic://?width={0}&height={0}&frames={1}&defect=50".format(args.size, args.frames)
        cls = LegacyPipeline if args.legacy_lists else pl.Pipeline
        pipe = cls(engine, make_source(uri), annotate=args.annotate)
        rows = [{"frame": 0, "rss_mb": round(rss_mb(process), 2), "elapsed_s": 0.0}]
        print("frames {}  {}x{} px  annotate {}  legacy lists {}  start RSS {:.1f} MB".format(
            args.frames, args.size, args.size, args.annotate, args.legacy_lists, rows[0]["rss_mb"]))
        t0 = time.perf_counter()
        anomalies = 0
        for result in pipe.run():
            anomalies += bool(result.anomalous)
            n = result.index + 1
            if n % args.every == 0:
                elapsed = time.perf_counter() - t0
                rows.append({"frame": n, "rss_mb": round(rss_mb(process), 2), "elapsed_s": round(elapsed, 2),
                             "fps": round(n / elapsed, 1)})
                if n % (10 * args.every) == 0:
                    print("frame {:7d}  RSS {:7.1f} MB  {:6.0f} fps".format(n, rows[-1]["rss_mb"], rows[-1]["fps"]),
                          flush=True)
        wall = time.perf_counter() - t0
        del engine, pipe.engine

    base = next((r for r in rows if r["frame"] >= args.warmup_frames), rows[0])
    growth = rows[-1]["rss_mb"] - base["rss_mb"]
    peak_after = max(r["rss_mb"] for r in rows if r["frame"] >= base["frame"])
    stats = pipe.stats()
    per_frame_old = 5 * (24 + 8)  # 4 stages per batch + latency: a float object + a list slot each
    verdict = "PASS" if growth < LIMIT_MB else "FAIL"
    print()
    print("{:>8} {:>9} {:>9}".format("frame", "RSS MB", "fps"))
    for r in rows[1::max(1, len(rows) // 20)]:
        print("{:>8} {:>9.1f} {:>9}".format(r["frame"], r["rss_mb"], r.get("fps", "-")))
    print()
    print("processed {} frames in {:.1f} s ({:.0f} fps), {} flagged; p50 infer {:.3f} ms, p99 latency {:.3f} ms".format(
        stats["frames"], wall, stats["frames"] / wall, anomalies, pipe.timings["infer"].quantile(0.5) * 1e3,
        pipe.timings["latency"].quantile(0.99) * 1e3))
    print("old list-based timings: ~{} B/frame = {:.1f} MB per 100k frames, {:.0f} MB/day at 30 fps".format(
        per_frame_old, per_frame_old * 1e5 / 2 ** 20, per_frame_old * 30 * 86400 / 2 ** 20))
    print("{}: RSS growth after frame {} = {:+.2f} MB over {} frames (peak {:.1f} MB; limit {:.0f} MB)".format(
        verdict, base["frame"], growth, rows[-1]["frame"] - base["frame"], peak_after, LIMIT_MB))

    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot([r["frame"] for r in rows], [r["rss_mb"] for r in rows], lw=1.5)
    axis.axvline(base["frame"], color="grey", ls="--", lw=1, label="warm-up end")
    axis.set_xlabel("frames processed")
    axis.set_ylabel("RSS (MB)")
    axis.set_title("edgead Pipeline RSS, {}x{} synthetic, {}: {:+.2f} MB after frame {}{}".format(
        args.size, args.size, verdict, growth, base["frame"], " (legacy lists)" if args.legacy_lists else ""),
        fontsize=9)
    axis.legend(fontsize=8)
    name = "long_run_rss" + ("_annotate" if args.annotate else "") + ("_legacy" if args.legacy_lists else "")
    write_outputs(args.out, name, rows, {
        "frames": stats["frames"], "size": args.size, "annotate": args.annotate, "legacy_lists": args.legacy_lists,
        "warmup_frames": base["frame"], "rss_start_mb": rows[0]["rss_mb"], "rss_base_mb": base["rss_mb"],
        "rss_end_mb": rows[-1]["rss_mb"], "growth_mb": round(growth, 3), "limit_mb": LIMIT_MB, "verdict": verdict,
        "wall_s": round(wall, 1), "fps": round(stats["frames"] / wall, 1), "python": sys.version.split()[0],
        "old_list_bytes_per_frame": per_frame_old, "rows": rows}, figure)
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
