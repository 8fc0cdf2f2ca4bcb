"""``edgead build``: ONNX -> TensorRT engine (+ ``.json`` sidecar), on the device that will run it.

Imports only click at module level; tensorrt and the exporter load inside the command.
"""
import click


@click.command("build")
@click.argument("onnx_path", metavar="MODEL.onnx", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "engine_path", required=True, type=click.Path(dir_okay=False),
              help="Engine file to write (the sidecar MODEL.engine.json goes next to it).")
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
              help="Largest batch of the optimization profile (dynamic-batch ONNX only).")
@click.option("--verbose", is_flag=True, help="TensorRT builder log at VERBOSE level.")
@click.option("--json", "as_json", is_flag=True, help="Print the build summary as JSON.")
def build(onnx_path, engine_path, fp16, int8, calib_dir, workspace_mb, plugin_lib, max_batch, verbose, as_json):
    """Build a TensorRT engine from an edgead ONNX file (run this on the target GPU/Jetson).

    \b
    Example:
      edgead build bottle.onnx -o bottle.engine --fp16
      edgead build bottle_plugin.onnx -o bottle.engine --fp16 --plugin-lib cpp_bindings/build/libedgead_plugins.so
      edgead run bottle.engine --source csi://0 --show
    """
    from edgead.exporters.tensorrt_build import build_engine

    summary = build_engine(onnx_path, engine_path, fp16=fp16, int8=int8, calib_dir=calib_dir,
                           workspace_mb=workspace_mb, plugin_lib=plugin_lib, max_batch=max_batch, verbose=verbose)
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


def describe_precision(built):
    """``fp32`` / ``fp32+tf32`` / ``fp16`` / ``int8+fp16`` ... or ``strongly typed (ONNX types)``."""
    if built.get("strongly_typed"):
        return "strongly typed (ONNX types)"
    parts = [name for name, on in (("int8", built.get("int8") or built.get("int8_explicit")),
                                   ("fp16", built.get("fp16"))) if on]
    return "+".join(parts) if parts else ("fp32+tf32" if built.get("tf32") else "fp32")


COMMANDS = (build,)
