"""``edgead build``: ONNX -> TensorRT engine (+ ``.json`` sidecar), on the device that will run it; with
``--triton REPO`` the engine becomes a Triton model repository entry (``REPO/<name>/1/model.plan``): a plan only
runs under the TensorRT version and GPU it was built with, so the entry is built on the serving machine.

Imports only click at module level; tensorrt and the exporter load inside the command.
"""
import os

import click

from edgead.cli.export_cmd import describe_triton, echo_triton_notes, triton_options, triton_settings


@click.command("build")
@click.argument("onnx_path", metavar="MODEL.onnx", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "engine_path", default=None, type=click.Path(dir_okay=False),
              help="Engine file to write (the sidecar MODEL.engine.json goes next to it); optional with --triton.")
@click.option("--fp16", is_flag=True,
              help="Allow fp16 kernels (TensorRT 8.5-10.x; TensorRT 11 is strongly typed: refused). "
                   "Without --fp16/--int8 the engine is strict fp32 (TF32 off).")
@click.option("--int8", is_flag=True,
              help="Allow int8 kernels, entropy calibration on --calib images (TensorRT 8.5-10.x).")
@click.option("--calib", "calib_dir", type=click.Path(file_okay=False), help="Folder of calibration images for --int8.")
@click.option("--workspace", "workspace_mb", type=int, default=1024, show_default=True,
              help="Builder workspace pool, MiB.")
@click.option("--plugin-lib", type=click.Path(dir_okay=False),
              help="libedgead_plugins.so (default: $EDGEAD_PLUGIN_LIB or cpp_bindings/build/).")
@click.option("--max-batch", type=int, default=8, show_default=True,
              help="Largest batch of the optimization profile (dynamic-batch ONNX only); --triton: max_batch_size.")
@click.option("--verbose", is_flag=True, help="TensorRT builder log at VERBOSE level.")
@triton_options("plan")
@click.option("--force", is_flag=True, help="--triton: replace a model folder edgead did not write.")
@click.option("--json", "as_json", is_flag=True, help="Print the build summary as JSON.")
def build(onnx_path, engine_path, fp16, int8, calib_dir, workspace_mb, plugin_lib, max_batch, verbose, force, as_json,
          **triton_args):
    """Build a TensorRT engine from an edgead ONNX file (run this on the target GPU/Jetson).

    \b
    Example:
      edgead build bottle.onnx -o bottle.engine --fp16
      edgead build bottle_plugin.onnx -o bottle.engine --fp16 --plugin-lib cpp_bindings/build/libedgead_plugins.so
      edgead run bottle.engine --source csi://0 --show
      edgead build bottle_dyn.onnx --triton /models --fp16       # /models/bottle_dyn/{config.pbtxt,1/model.plan}
    """
    from edgead.errors import ConfigError
    from edgead.exporters.tensorrt_build import build_engine

    options = triton_settings(triton_args, force, max_batch=max_batch)
    if options is None:
        if engine_path is None:
            raise ConfigError("edgead build needs -o MODEL.engine or --triton REPO")
        summary = build_engine(onnx_path, engine_path, fp16=fp16, int8=int8, calib_dir=calib_dir,
                               workspace_mb=workspace_mb, plugin_lib=plugin_lib, max_batch=max_batch, verbose=verbose)
    else:
        summary = _build_triton(options, onnx_path, engine_path, build_engine, dict(
            fp16=fp16, int8=int8, calib_dir=calib_dir, workspace_mb=workspace_mb, plugin_lib=plugin_lib,
            max_batch=max_batch, verbose=verbose))
    if as_json:
        from edgead.runtime.report import dumps as strict_json  # the one JSON dumper of every --json

        click.echo(strict_json(summary, indent=2))
        return
    built = summary["tensorrt"]
    click.echo("{} -> {} ({:.1f} MB, TensorRT {}, {}, {}, {:.0f} s)".format(
        summary["onnx"], summary["engine"], summary["engine_bytes"] / 1e6, built["version"], built["gpu"],
        describe_precision(built), built["build_seconds"]))
    calibration = built.get("int8_calibration")
    if calibration:
        click.echo("int8 calibration: {} of {} images in {} batches of {}{}; cache {}{}".format(
            calibration["used"], calibration["images"], calibration["batches"], calibration["batch"],
            " ({} dropped: not a full batch)".format(calibration["dropped"]) if calibration["dropped"] else "",
            calibration["cache"], " (reused)" if calibration["from_cache"] else ""))
    if "triton" in summary:
        click.echo(describe_triton(summary["triton"]))
        echo_triton_notes(summary["triton"])


def _build_triton(options, onnx_path, engine_path, build_engine, build_args):
    """Build the engine into a Triton entry (``exporters.triton.RepositoryEntry``, kind ``plan``); with ``-o`` the
    engine is built there and copied in with its sidecar. Returns the build summary plus ``triton``."""
    from edgead.errors import ConfigError, ExportError
    from edgead.exporters import triton
    from edgead.runtime import modelinfo, tensorrt_plugin

    if build_args["max_batch"] < 1:
        raise ConfigError("{}: --max-batch must be >= 1, got {}".format(onnx_path, build_args["max_batch"]))
    if not os.path.isfile(onnx_path):
        raise ExportError("{}: model file not found".format(onnx_path))
    info = modelinfo.load_model_info(onnx_path)
    triton.require_dynamic_batch(triton.graph_io(onnx_path), onnx_path)  # before the long build
    entry = triton.RepositoryEntry(options, "plan", default=triton.default_name(onnx_path))
    with entry:
        summary = build_engine(onnx_path, engine_path or entry.model_path, **build_args)
        if engine_path is not None:
            entry.add_model_file(engine_path, extra=[(modelinfo.sidecar_path(engine_path),
                                                      os.path.basename(modelinfo.sidecar_path(entry.model_path)))])
        plugin = summary["tensorrt"].get("plugin_lib")
        libraries = []
        if tensorrt_plugin.needs_plugin(info):
            if plugin and os.sep in plugin and os.path.isfile(plugin):
                libraries = [plugin]
            else:
                entry.warnings.append("the plan needs {} but the one loaded ({}) was found by the system loader and "
                                      "is not copied into the entry: load it into tritonserver yourself".format(
                                          tensorrt_plugin.LIBRARY_NAME, plugin))
        summary["triton"] = entry.commit(modelinfo.load_model_info(entry.model_path), libraries=libraries,
                                         graph_source=onnx_path, source=os.fspath(onnx_path))
    if engine_path is None:
        summary["engine"] = summary["triton"]["model_path"]
        summary["sidecar"] = modelinfo.sidecar_path(summary["engine"])
    return summary


def describe_precision(built):
    """``fp32`` / ``fp32+tf32`` / ``fp16`` / ``int8+fp16`` ... or ``strongly typed (ONNX types)``."""
    if built.get("strongly_typed"):
        return "strongly typed (ONNX types)"
    parts = [name for name, on in (("int8", built.get("int8") or built.get("int8_explicit")),
                                   ("fp16", built.get("fp16"))) if on]
    return "+".join(parts) if parts else ("fp32+tf32" if built.get("tf32") else "fp32")


COMMANDS = (build,)
