"""The ``edgead`` command line: one click group, one module per family of commands.

Command modules import only click at module level and load torch, onnx or the runtime
inside the command body, so ``edgead run`` / ``edgead bench`` work on a torch-free device.
"""
import os
import sys

import click

from edgead import __version__
from edgead.errors import EdgeadError


class EdgeadGroup(click.Group):
    """A click group whose commands never end in a traceback.

    EdgeadError (a user-facing problem) or a bad option value -> ``edgead: error: <message>`` on stderr, exit 2.
    Out of memory, an OS error (disk full, permission), or any other unexpected exception -> one line
    naming it plus a hint to rerun with ``--debug`` (or EDGEAD_DEBUG=1), which shows the traceback; exit 2.
    Ctrl-C -> exit 130. A closed stdout pipe (``edgead run ... | head``) ends quietly.
    """

    def make_context(self, info_name, args, parent=None, **extra):
        """Top-level option errors (``edgead --bogus``) as one line too."""
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            if parent is not None:
                raise
            click.echo("edgead: error: {} (see `edgead --help`)".format(exc.format_message()), err=True)
            raise click.exceptions.Exit(2)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgeadError as exc:
            _fail(ctx, str(exc))
        except KeyboardInterrupt:
            click.echo("edgead: interrupted", err=True)
            ctx.exit(130)
        except click.UsageError as exc:  # a bad option value or unknown command: one line, and where to look
            where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            _fail(ctx, "{} (see `{} --help`)".format(exc.format_message(), where))
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except BrokenPipeError:
            _quiet_broken_pipe()
            ctx.exit(141)
        except Exception as exc:  # never a traceback for users; --debug shows it
            if _debug(ctx):
                raise
            _fail(ctx, "{} (rerun with `edgead --debug ...` for the traceback)".format(describe_unexpected(exc)))


def describe_unexpected(exc):
    """One line for an exception edgead did not anticipate: what happened, with the file when known."""
    if isinstance(exc, MemoryError):
        return "out of memory ({}); use a smaller --size, --dim or --batch-size".format(
            str(exc).splitlines()[0] if str(exc) else "allocation failed")
    if isinstance(exc, RecursionError):
        return "input nested too deeply to process ({})".format(exc)
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename if exc.filename is not None else ""
        return "{}{}{}".format(where, ": " if where else "", exc.strerror)
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return "unexpected {}{}{}".format(type(exc).__name__, ": " if text else "", text)


def _fail(ctx, message):
    click.echo("edgead: error: {}".format(" ".join(message.splitlines())), err=True)
    ctx.exit(2)


def _debug(ctx):
    return bool((ctx.obj or {}).get("debug")) or os.environ.get("EDGEAD_DEBUG", "") not in ("", "0")


def _quiet_broken_pipe():
    """Point stdout at /dev/null so Python's exit-time flush does not complain about the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


@click.group(cls=EdgeadGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgead")
@click.option("--debug", is_flag=True, help="Show the Python traceback of unexpected errors (or set EDGEAD_DEBUG=1).")
@click.pass_context
def cli(ctx, debug):
    """edgead: fit anomaly detectors on good parts, export them to ONNX/TensorRT, run them on Jetson.

    \b
    Typical flow:
      edgead fit data/bottle -o bottle.edgead           # a detector (--method padim|patchcore) on train/good images
      edgead eval bottle.edgead data/bottle             # AUROC / PRO / F1 table
      edgead export bottle.edgead -o bottle.onnx        # one ONNX graph, uint8 frames in
      edgead run bottle.onnx --source csi://0 --show    # live camera with heatmaps
      edgead bench bottle.onnx --frames 300             # honest latency report
    """
    ctx.obj = dict(ctx.obj or {}, debug=debug)


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
