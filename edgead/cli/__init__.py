"""The ``edgead`` command line: one click group, one module per family of commands.

Command modules import only click at module level and load torch, onnx or the runtime
inside the command body, so ``edgead run`` / ``edgead bench`` work on a torch-free device.
"""
import sys

import click

from edgead import __version__
from edgead.errors import EdgeadError


class EdgeadGroup(click.Group):
    """A click group that turns EdgeadError into one line on stderr and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgeadError as exc:
            click.echo("edgead: error: {}".format(exc), err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("edgead: interrupted", err=True)
            ctx.exit(130)


@click.group(cls=EdgeadGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgead")
def cli():
    """edgead: fit anomaly detectors on good parts, export them to ONNX/TensorRT, run them on Jetson.

    \b
    Typical flow:
      edgead fit data/bottle -o bottle.edgead           # PaDiM on train/good images
      edgead eval bottle.edgead data/bottle             # AUROC / PRO / F1 table
      edgead export bottle.edgead -o bottle.onnx        # one ONNX graph, uint8 frames in
      edgead run bottle.onnx --source csi://0 --show    # live camera with heatmaps
      edgead bench bottle.onnx --frames 300             # honest latency report
    """


def _register():
    from edgead.cli import build_cmd, export_cmd, fit_cmd, run_cmd

    for module in (fit_cmd, export_cmd, run_cmd, build_cmd):
        for command in getattr(module, "COMMANDS", ()):
            cli.add_command(command)


_register()


def main(argv=None):
    """Console-script entry point."""
    return cli.main(args=argv, prog_name="edgead")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
