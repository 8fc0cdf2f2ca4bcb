"""``edgead export`` (bundle -> ONNX, optionally a Triton model repository entry) and ``edgead compare`` (torch vs
ONNX Runtime vs TensorRT)."""
import contextlib
import json
import os

import click
from click.core import ParameterSource

from edgead.errors import ConfigError, DataError


def triton_options(kind):
    """The ``--triton*`` options of ``edgead export`` (kind ``onnx``) and ``edgead build`` (kind ``plan``); the
    command receives them as ``triton_*`` keyword arguments (``triton_settings`` turns them into options)."""
    options = [
        click.option("--triton", "triton_repo", type=click.Path(), default=None, metavar="REPO",
                     help="Also write a Triton Inference Server model repository entry REPO/<name>/ (config.pbtxt "
                          "with dynamic batching, {}, edgead.json with the thresholds, README.md), switched into "
                          "place as a whole.".format(
                              "1/model.onnx for the onnxruntime backend (the model gets a dynamic batch; the plugin "
                              "flavour ships libedgead_ort.so)" if kind == "onnx" else
                              "1/model.plan built here for the tensorrt backend (needs a --batch dynamic ONNX; the "
                              "plugin library is copied in)")),
        click.option("--triton-name", default=None,
                     help="Model name (folder) in the repository [default: from the {} name].".format(
                         "bundle" if kind == "onnx" else "ONNX file")),
        click.option("--triton-version", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Version folder of the model file."),
    ]
    if kind == "onnx":
        options.append(click.option("--triton-max-batch", type=click.IntRange(min=1), default=8, show_default=True,
                                    help="max_batch_size: the largest batch Triton forms from queued requests."))
    options.append(click.option("--triton-queue-delay-us", type=click.IntRange(min=0), default=2000,
                                show_default=True,
                                help="dynamic_batching max_queue_delay_microseconds: how long a request may wait "
                                     "for others to batch with."))
    if kind == "onnx":
        options.append(click.option("--triton-instance", type=click.Choice(["gpu", "cpu"]), default="gpu",
                                    show_default=True, help="instance_group kind: KIND_GPU or KIND_CPU."))
    options += [
        click.option("--triton-instance-count", type=click.IntRange(min=1), default=1, show_default=True,
                     help="instance_group count: model instances per GPU (or on the CPU)."),
        click.option("--triton-server-repo", default=None,
                     help="REPO's path as tritonserver sees it (e.g. /models in its container), for the library paths "
                          "in config.pbtxt and README.md [default: REPO's absolute path here]."),
    ]

    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def triton_settings(triton_args, force, max_batch=None):
    """``TritonOptions`` from the ``triton_*`` keyword arguments, or None without ``--triton``; a ``--triton-*``
    option given without ``--triton`` is refused (one line)."""
    from edgead.exporters.triton import TritonOptions

    ctx = click.get_current_context()
    if not triton_args["triton_repo"]:
        for key in sorted(triton_args):
            if key != "triton_repo" and ctx.get_parameter_source(key) not in (None, ParameterSource.DEFAULT):
                raise ConfigError("--{} goes with --triton REPO".format(key.replace("_", "-")))
        return None
    return TritonOptions(triton_args["triton_repo"], name=triton_args["triton_name"],
                         version=triton_args["triton_version"],
                         max_batch=triton_args.get("triton_max_batch", max_batch),
                         queue_delay_us=triton_args["triton_queue_delay_us"],
                         instance=triton_args.get("triton_instance", "gpu"),
                         instance_count=triton_args["triton_instance_count"],
                         server_repo=triton_args["triton_server_repo"], force=force)


def describe_triton(entry, detail=None):
    """One line about a written Triton entry (``detail``: more about the model file, in the parentheses)."""
    group = entry["instance_group"]
    return "wrote Triton model {} ({}, {}, max_batch_size {}, dynamic batching, {} x {}{}{}){}".format(
        entry["path"], entry["model_file"], entry["platform"], entry["max_batch_size"], group["count"], group["kind"],
        ", with " + ", ".join(entry["libraries"]) if entry["libraries"] else "", ", " + detail if detail else "",
        "; config.pbtxt checked with Triton's ModelConfig (tritonclient {})".format(entry["validated"])
        if entry["validated"] else "")


def echo_triton_notes(entry):
    for warning in entry["warnings"]:
        click.echo("warning: " + warning, err=True)
    if not entry["validated"]:
        click.echo("note: config.pbtxt not validated: pip install edgead[triton] (Triton's model-config protobuf)",
                   err=True)


@click.command("export")
@click.argument("bundle_dir", type=click.Path())
@click.option("-o", "--out", default=None, type=click.Path(),
              help="Output .onnx file (written atomically); optional with --triton.")
@click.option("--mahalanobis", type=click.Choice(["onnx", "plugin"]), default="onnx", show_default=True,
              help="Head flavour. onnx: standard ops (runs anywhere, every method); plugin (PaDiM only): one "
                   "edgead::PadimMahalanobis node for TensorRT and, with libedgead_ort.so (make ort-ops), ONNX "
                   "Runtime CPU.")
@click.option("--precision", type=click.Choice(["fp16", "fp32", "int8"]), default="fp16", show_default=True,
              help="fp16/fp32: storage of the method's large statistics (PaDiM: the whitening, the mean stays fp32). "
                   "int8 (PaDiM): a QDQ int8 backbone (per-channel weights, activations calibrated on --calib) with "
                   "the Gaussian statistics and thresholds refitted on its int8 features, stored fp16.")
@click.option("--calib", type=click.Path(), default=None,
              help="int8: good images (folder, file or glob; the training images, at least 10) that calibrate the "
                   "activations and refit the statistics.")
@click.option("--int8-target", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime",
              show_default=True,
              help="int8 activations: onnxruntime = uint8 with zero points (ONNX Runtime's fast x86 kernels); "
                   "tensorrt = int8 symmetric, what TensorRT's explicit quantisation takes (edgead build).")
@click.option("--int8-calibration", type=click.Choice(["minmax", "percentile"]), default="minmax",
              show_default=True, help="int8: how activation ranges are taken from --calib.")
@click.option("--batch", default="1", show_default=True, help="1, N, or dynamic (--triton: dynamic).")
@click.option("--input-dtype", type=click.Choice(["uint8", "float32"]), default="uint8", show_default=True,
              help="float32 (0..255) for TensorRT 8.5, which has no uint8 inputs.")
@click.option("--external-data", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              help="Tensors of 1 KiB and more in OUT.<sha16>.data next to the .onnx: auto = when the model would "
                   "exceed 1.8 GiB (protobuf's limit is 2 GiB; e.g. fp32 wide_resnet50_2); keep both files together.")
@triton_options("onnx")
@click.option("--force", is_flag=True,
              help="Replace --out even when it is not an edgead ONNX model (and a --triton model folder edgead did "
                   "not write).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def export(bundle_dir, out, mahalanobis, precision, calib, int8_target, int8_calibration, batch, input_dtype,
           external_data, force, as_json, **triton_args):
    """Export a bundle (any method) to one ONNX graph: uint8 [N,H,W,3] RGB -> anomaly_map [N,1,H,W], score [N].

    A model over 1.8 GiB keeps its large tensors in an external data file next to the .onnx
    (bottle.onnx.<sha16>.data); move or copy the two files together.

    \b
    Example:
      edgead export bottle.edgead -o bottle.onnx
      edgead export bottle.edgead -o bottle_trt.onnx --mahalanobis plugin --batch dynamic
      edgead export wrn50.edgead -o wrn50.onnx --precision fp32   # 2.5 GB: + wrn50.onnx.<sha16>.data
      edgead export bottle.edgead -o bottle_int8.onnx --precision int8 --calib mvtec/bottle/train/good
      edgead export bottle.edgead --triton models/             # models/bottle/{config.pbtxt,1/model.onnx,...}
      edgead export bottle.edgead --triton models/ --mahalanobis plugin --triton-server-repo /models
    """
    from edgead.bundle import load_bundle
    from edgead.exporters import trt_ops
    from edgead.exporters.external_data import external_locations
    from edgead.exporters.onnx_export import Int8Options, export_onnx, graph_op_types, read_metadata

    from edgead.output_paths import check_model_path

    if (precision == "int8") != bool(calib):
        raise DataError("--calib DATA goes with --precision int8 (good images that calibrate it and refit the "
                        "statistics)" if calib else "--precision int8 needs --calib DATA: good images (the training "
                        "images) that calibrate the activations and refit the statistics")
    options = triton_settings(triton_args, force)
    entry, libraries = None, []
    if options is not None:  # every check before loading anything
        from edgead.exporters import triton

        if click.get_current_context().get_parameter_source("batch") != ParameterSource.DEFAULT and \
                str(batch).strip().lower() != "dynamic":
            raise ConfigError("--batch {}: a --triton model needs a dynamic batch dimension (Triton forms the batches, "
                              "up to --triton-max-batch {}); drop --batch or pass --batch dynamic".format(
                                  batch, options.max_batch))
        batch = "dynamic"
        if mahalanobis == "plugin":
            libraries = [triton.ort_ops_library()]
        entry = triton.RepositoryEntry(options, "onnx", default=triton.default_name(bundle_dir))
    elif out is None:
        raise ConfigError("edgead export needs -o OUT.onnx or --triton REPO")
    if out is not None:
        check_model_path(out, force)  # before loading anything
    # the statistics stay on disk and are streamed into the file block by block (never a whole copy in memory)
    with load_bundle(bundle_dir, lazy_statistics=True) as bundle, \
            (entry if entry is not None else contextlib.nullcontext()):  # int8 refits: old statistics never read
        int8 = None
        if precision == "int8":
            int8 = Int8Options(_calibration_frames(calib, bundle), int8_target, int8_calibration)
        model = export_onnx(bundle, out or entry.model_path, mahalanobis, precision, batch, input_dtype,
                            external_data=external_data, int8=int8)
        triton_entry = None
        if entry is not None:
            if out is not None:  # the same bytes in the entry (with the external data file, under its own name)
                folder = os.path.dirname(os.path.abspath(out))
                entry.add_model_file(out, [os.path.join(folder, name) for name in external_locations(model)])
            triton_entry = entry.commit(read_metadata(model), libraries=libraries, source=os.fspath(bundle_dir))
    for message in (int8.warnings if int8 else []):
        click.echo("warning: " + message, err=True)
    data_files = external_locations(model)  # one file, or none when inline
    onnx_path = out if out is not None else triton_entry["model_path"]
    folder = os.path.dirname(os.path.abspath(onnx_path))
    onnx_bytes = os.path.getsize(onnx_path)
    summary = {
        "onnx": onnx_path,
        "bytes": onnx_bytes,
        "data_file": data_files[0] if data_files else None,
        "total_bytes": onnx_bytes + sum(os.path.getsize(os.path.join(folder, name)) for name in data_files),
        "ops": ["{}::{}".format(d, o) if d else o for d, o in graph_op_types(model)],
        "tensorrt_problems": trt_ops.check_graph(model),
        "mahalanobis": mahalanobis,
        "precision": precision,
        "batch": batch,
    }
    if triton_entry is not None:
        summary["triton"] = triton_entry
    if int8 is not None:
        summary["quantization"] = read_metadata(model)["export"]["quantization"]
        summary["calibration"] = int8.refitted.config.get("calibration")
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        size = "{:.1f} MB".format(summary["total_bytes"] / 1e6)
        if summary["data_file"]:
            size += " with external data {}".format(summary["data_file"])
        what = "{} statistics".format(precision)
        if int8 is not None:
            what = "int8 front end for {} + fp16 statistics refitted on {} images".format(int8_target, len(int8.frames))
        if out is not None:
            click.echo("wrote {} ({}, {} flavour, {}, batch {})".format(out, size, mahalanobis, what, batch))
        if triton_entry is not None:
            click.echo(describe_triton(triton_entry, "{}, {} flavour, {}".format(size, mahalanobis, what)))
        for problem in summary["tensorrt_problems"]:
            click.echo("warning: " + problem, err=True)
    if triton_entry is not None:
        echo_triton_notes(triton_entry)


def _calibration_frames(calib, bundle):
    """uint8 ``[N, H, W, 3]`` of every image ``calib`` names, resized to the bundle's input (progress on stderr)."""
    import numpy as np

    from edgead.data import ImageBatches, list_images

    paths = list_images(calib)
    batches = [frames for frames, _ in ImageBatches(paths, bundle.input_hw, batch_size=16, desc="int8 calibration images")]
    return np.concatenate(batches)


@click.command("compare")
@click.argument("bundle_dir", type=click.Path())
@click.argument("models", nargs=-1, required=True, type=click.Path())
@click.option("--images", type=click.Path(), default=None, help="Folder/glob of images (default: synthetic frames).")
@click.option("--frames", "n_frames", type=int, default=4, show_default=True, help="Number of frames to compare.")
@click.option("--providers", default="cpu", show_default=True, help="ONNX Runtime providers: cpu, cuda, tensorrt (comma-separated).")
@click.option("--tolerance", type=float, default=1e-4, show_default=True, help="Fail (exit 1) when a map or score max_rel exceeds this vs the matching torch reference.")
@click.option("--json", "as_json", is_flag=True)
def compare_cmd(bundle_dir, models, images, n_frames, providers, tolerance, as_json):
    """Run the same frames through the bundle's torch model and each MODEL (.onnx via ONNX Runtime, .engine
    via TensorRT) and report max abs / rel error of maps and scores.

    \b
    Example:
      edgead compare bottle.edgead bottle.onnx bottle.engine --images mvtec/bottle/test/broken_large
    """
    import numpy as np

    from edgead.bundle import load_bundle
    from edgead.data import ImageBatches, list_images
    from edgead.exporters import compare as cmp

    bundle = load_bundle(bundle_dir)
    height, width = bundle.input_hw
    if images:
        paths = list_images(images)[:n_frames]
        frames = np.concatenate([b for b, _ in ImageBatches(paths, (height, width), batch_size=8)])
    else:
        from edgead.runtime.sources import open_source

        frames = _synthetic_frames(open_source, height, width, n_frames)
    if len(frames) == 0:
        raise DataError("no frames to compare")
    options = {"providers": tuple(p.strip() for p in providers.split(","))}
    rows = []
    for path in models:
        backend_options = options if path.endswith(".onnx") else {}
        rows.extend(cmp.compare(bundle, [path], frames, {"backend": "auto", **backend_options}))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(cmp.format_table(rows))
    matching = [r for r in rows if r["reference"] != "torch fp32" or not any(
        o["model"] == r["model"] and o["reference"] == "torch fp16-stats" for o in rows)]
    worst = max(max(r["map"]["max_rel"], r["score"]["max_rel"]) for r in matching)
    if worst > tolerance:
        click.echo("FAIL: max_rel {:.2e} > tolerance {:.0e}".format(worst, tolerance), err=True)
        raise SystemExit(1)


def _synthetic_frames(open_source, height, width, count):
    import numpy as np

    source = open_source("synthetic://?width={}&height={}&frames={}&defect=1".format(width, height, count))
    frames = []
    try:
        for item in source:
            frame = item[0] if isinstance(item, tuple) else getattr(item, "image", item)
            frames.append(np.asarray(frame))
            if len(frames) >= count:
                break
    finally:
        close = getattr(source, "close", None)
        if close:
            close()
    return np.stack(frames)


COMMANDS = (export, compare_cmd)
