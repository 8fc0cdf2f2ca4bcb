"""``edgead fit``, ``edgead eval`` and ``edgead demo``: the workstation side."""
import json
import os
import time

import click

from edgead.errors import ConfigError, DataError

#: numpy's SeedSequence and torch.manual_seed both take 0 .. 2**32-1 without surprises.
SEED_MAX = 2 ** 32 - 1
#: Largest input side (pixels) edgead accepts; the fit's memory is checked separately, before it starts.
MAX_SIDE = 8192


def _parse_size(value):
    """``256`` or ``256x320`` -> (H, W)."""
    try:
        parts = [int(v) for v in str(value).lower().split("x")]
    except ValueError:
        raise ConfigError("--size must look like 256 or 256x320, not {!r}".format(value))
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 32:
        raise ConfigError("--size must look like 256 or 256x320 (each side >= 32), not {!r}".format(value))
    if max(parts) > MAX_SIDE:
        raise ConfigError("--size {}: each side must be at most {} pixels".format(value, MAX_SIDE))
    if parts[0] % 16 or parts[1] % 16:
        raise ConfigError("--size {}: each side must be a multiple of 16 (the stride of the deepest stage)".format(value))
    return tuple(parts)


def check_output_folder(folder, option, force=False, ours=()):
    """A folder ``eval``/``demo`` write into: new (missing parents are made, like ``mkdir -p``), empty, or one
    an earlier run wrote (its ``metrics.json`` is an edgead one, or it holds only the names in ``ours``);
    anything else needs --force. ConfigError."""
    if folder is None:
        return
    if not folder.strip():
        raise ConfigError("{}: empty path".format(option))
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise ConfigError("{} {}: exists and is not a folder".format(option, folder))
    ancestor = folder if os.path.isdir(folder) else os.path.dirname(os.path.abspath(folder))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ConfigError("{} {}: cannot create it, {} is a file".format(option, folder, ancestor))
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError("{} {}: not writable".format(option, folder))
    if (os.path.isdir(folder) and not set(os.listdir(folder)) <= set(ours) and not force
            and not _has_our_metrics(folder)):
        raise ConfigError("{} {}: holds files edgead did not write; use an empty or new folder (or --force)".format(
            option, folder))


def _has_our_metrics(folder):
    """True when ``folder/metrics.json`` is one ``eval``/``demo`` wrote (a JSON object with their keys)."""
    try:
        with open(os.path.join(folder, "metrics.json"), "r", encoding="utf-8") as fh:
            metrics = json.load(fh)
    except (OSError, ValueError):
        return False
    return isinstance(metrics, dict) and ("image_auroc" in metrics or "results" in metrics)


def _training_paths(data):
    """Train images of an MVTec category (``train/good``) or of a plain folder / glob."""
    from edgead.data import MvtecCategory, _is_category, list_images

    if os.path.isdir(data) and _is_category(data):
        category = MvtecCategory(data)
        return category.train_images(), category
    if os.path.isdir(data):
        nested = sorted(d for d in os.listdir(data) if _is_category(os.path.join(data, d)))
        if nested:
            raise DataError("{}: holds MVTec categories ({}); fit one at a time, e.g. {}".format(
                data, ", ".join(nested[:6]), os.path.join(data, nested[0])))
    return list_images(data), None


def fit_bundle(data, out, backbone, weights, size, dim, seed, batch_size, folds=None, quantile=0.995, val=None,
               max_memory=None, method="padim", method_options=None):
    """Fit + thresholds + save. Returns (bundle, summary dict); warnings go to stderr, one line each.

    method: a registered method name (``edgead.methods.method_names()``); method_options: its fit options
    (``Method.fit_options`` keys, string values as typed), only those the user gave: the method parses and
    checks them before the fit starts, and one it does not take is a ConfigError.
    Thresholds: F1-max on the labelled category ``val`` when given, else out of sample from the
    training images (``folds``: ``"n"`` leave-one-out, K >= 2 K-fold, 0 leaves the model uncalibrated;
    None: the method's ``default_folds``).
    max_memory: the memory budget in bytes (None: ``resources.DEFAULT_FRACTION`` of the available memory); a fit
    that cannot stay inside it is refused before it starts.
    """
    from edgead.bundle import check_bundle_target
    from edgead.data import ImageBatches, MvtecCategory
    from edgead.evaluate import evaluate_category
    from edgead.methods import get_method, parse_fit_options

    from edgead.thresholds import check_quantile, parse_folds, set_calibration

    chosen = get_method(method)
    options = parse_fit_options(method, method_options)  # before the long work starts
    folds = parse_folds(chosen.default_folds if folds is None else folds)
    quantile = check_quantile(quantile)
    check_bundle_target(out)
    if val:
        MvtecCategory(val)  # a bad --val folder fails now, not after the fit
    paths, _ = _training_paths(data)
    name = os.path.basename(os.path.normpath(data))
    started = time.perf_counter()
    fitter = chosen.make_fitter(backbone, weights, size, dim, seed, batch_size, max_memory, **options)
    # a fit (and its out-of-sample pass) that cannot fit the memory budget fails now, not later
    fitter.check_calibration_memory(folds if not val else 0, len(paths))
    for frames, _ in ImageBatches(paths, size, batch_size=batch_size, desc="fit {}".format(name)):
        fitter.update(frames)
    fit_seconds = time.perf_counter() - started
    if folds and not val:
        def load_images(indices):
            return (frames for frames, _ in ImageBatches([paths[i] for i in indices], size, batch_size=batch_size))

        fitter.calibrate_out_of_sample(load_images, len(paths), folds, quantile, seed)
    bundle = fitter.bundle()
    for warning in fitter.warnings:
        click.echo("edgead: warning: {}: {}".format(data, warning), err=True)
    if val:
        result = evaluate_category(bundle, MvtecCategory(val), overlays=False, batch_size=batch_size)
        if result["calibration"] is None:
            raise DataError("{}: --val needs both good and defective test images".format(val))
        set_calibration(bundle.config, result["calibration"], result["calibration_provenance"])
    bundle.save(out)
    summary = {"bundle": out, "method": bundle.config["method"], "n_train": len(paths),
               "fit_seconds": round(fit_seconds, 2), "total_seconds": round(time.perf_counter() - started, 2),
               "backbone": bundle.config["backbone"], "dim": bundle.config["embedding"]["dim"],
               "calibration": bundle.config["calibration"],
               "calibration_provenance": bundle.config["calibration_provenance"], "warnings": list(fitter.warnings),
               "memory": dict(fitter.memory.describe(), peak_rss=_peak_rss_bytes()),
               # a trained method's record (CFLOW: epochs run, best epoch per stage, seconds per epoch, losses)
               "training": (bundle.config.get(bundle.config["method"]) or {}).get("training")}
    return bundle, summary


def _peak_rss_bytes():
    """Peak resident memory of this process so far (bytes; None where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Linux
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _describe(config):
    from edgead.runtime.modelinfo import describe_thresholds

    return describe_thresholds(config)


#: fit options every method takes: a method's ``fit_options`` must not reuse these names
_GENERIC_FIT_OPTIONS = ("out", "method", "backbone", "weights", "size", "dim", "seed", "batch_size", "folds",
                        "quantile", "val", "max_memory", "as_json", "json", "data")


def _method_option_decorators():
    """One ``--<key>`` string option per key of every registered method's ``fit_options`` (default None: not
    given), its help naming the methods that take it."""
    from edgead.methods import fit_option_keys, get_method, option_flag

    decorators = []
    for key, takers in sorted(fit_option_keys().items()):
        if key in _GENERIC_FIT_OPTIONS or not key.isidentifier():
            raise ValueError("method {} declares fit option {!r}, which is not a free option name".format(
                takers[0], key))
        texts = []
        for name in takers:
            text = get_method(name).fit_options[key]
            if text not in texts:
                texts.append(text)
        help_text = "{} [--method {}]".format(" ".join(texts), " or ".join(takers))
        decorators.append(click.option(option_flag(key), key, default=None, metavar="VALUE", help=help_text))
    return decorators


def make_fit_command():
    """The ``edgead fit`` click command, its ``--method`` choices and method options read from the registry now
    (``edgead.methods``): built once at import; tests that register a throwaway method build another."""
    from edgead.methods import get_method, method_names

    names = method_names()
    folds_defaults = ", ".join("{} {}".format(n, get_method(n).default_folds) for n in names)

    def fit(data, out, method, backbone, weights, size, dim, seed, batch_size, folds, quantile, val, max_memory,
            as_json, **method_options):
        """Fit a detector (--method, default padim) on good images (an MVTec category's train/good, or any
        image folder / glob).

        The default thresholds come from the good images alone: each image is scored by a model fitted
        without it (PaDiM: leave-one-out, exact; or --folds K), and the --quantile of those out-of-sample
        scores is stored with its provenance (and the false-positive rate it implies) in model.json and the
        exported model.

        \b
        Example:
          edgead fit mvtec/bottle -o bottle.edgead --backbone efficientnet_lite0 --size 256
          edgead fit mvtec/bottle -o bottle_pc.edgead --method patchcore
          edgead fit 'parts/good/*.png' -o parts.edgead --backbone resnet18 --weights resnet18.safetensors
        """
        from edgead.resources import parse_memory_size

        given = {key: value for key, value in method_options.items() if value is not None}  # only those typed
        budget = None if max_memory is None else parse_memory_size(max_memory)
        bundle, summary = fit_bundle(data, out, backbone, weights, _parse_size(size), dim, seed, batch_size,
                                     folds, quantile, val, budget, method=method, method_options=given)
        if as_json:
            from edgead.runtime.report import dumps as strict_json  # NaN -> null: --json output is always JSON

            click.echo(strict_json(summary, indent=2))
        else:
            click.echo("fitted {} {} on {} images in {:.1f} s (D = {}) -> {}".format(
                summary["method"], summary["backbone"]["name"], summary["n_train"], summary["total_seconds"],
                summary["dim"], out))
            training = summary["training"]
            if training:
                click.echo("trained {} epochs ({:.1f} s each{}), best epoch per stage {}".format(
                    training["epochs_run"], training["seconds_per_epoch"],
                    ", stopped early on the held-out fold" if training.get("stopped_early") else "",
                    training["best_epoch"]))
            click.echo(_describe(bundle.config))

    command = fit
    for decorator in reversed(_method_option_decorators()):
        command = decorator(command)
    for decorator in reversed([
        click.argument("data", type=click.Path()),
        click.option("-o", "--out", required=True, type=click.Path(),
                     help="Bundle folder to write (model.json + weights.safetensors)."),
        click.option("--method", type=click.Choice(names), default="padim", show_default=True,
                     help="Detection method: {}.".format(", ".join(names))),
        click.option("--backbone", default="efficientnet_lite0", show_default=True,
                     help="resnet18, wide_resnet50_2, mobilenet_v1_025..100, mobilenetv2_100, mobilenetv3_large_100, "
                          "efficientnet_lite0."),
        click.option("--weights", default="imagenet", show_default=True,
                     help="imagenet (offline: Lite0 package or local timm/torchvision cache), random, or a weights "
                          "FILE."),
        click.option("--size", default="256", show_default=True,
                     help="Input size HxW (or one number), multiple of 16."),
        click.option("--dim", type=click.IntRange(min=1), default=None,
                     help="Embedding dimension D (default per method and backbone; PaDiM: 100, 550 for "
                          "wide_resnet50_2; PatchCore: 2/3 of the two stages' channels, at most 1024; at most the "
                          "backbone's channels)."),
        click.option("--seed", type=click.IntRange(0, SEED_MAX), default=0, show_default=True,
                     help="Seed of the method's random choices (PaDiM: the channel subset) and of the folds."),
        click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True),
        click.option("--folds", default=None,
                     help="Learn the image/pixel thresholds from the training images out of sample, each scored by "
                          "a model fitted without it (one extra pass). n: leave-one-out (PaDiM: exact, in closed "
                          "form); K >= 2: K-fold; 0: no thresholds. Default per method: {}.".format(folds_defaults)),
        click.option("--quantile", default="0.995", show_default=True,
                     help="Quantile of the out-of-sample normal scores used as the threshold, in (0, 1)."),
        click.option("--val", type=click.Path(), default=None,
                     help="A separate labelled MVTec-layout category (not the test set you report) whose test/ "
                          "split sets F1-max thresholds instead."),
        click.option("--max-memory", default=None, metavar="SIZE",
                     help="Memory the fit may use, e.g. 8G, 7.5GB, 512MB or 70% (default: 85% of the memory "
                          "available at start). Temporaries are sized to stay inside it; a fit that cannot is "
                          "refused before it starts, with what it needs."),
        click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON."),
    ]):
        command = decorator(command)
    return click.command("fit")(command)


fit = make_fit_command()


@click.command("eval")
@click.argument("bundle_dir", type=click.Path())
@click.argument("data", type=click.Path())
@click.option("--out", type=click.Path(), default=None, help="Folder for metrics.json and overlay PNGs.")
@click.option("--overlays/--no-overlays", default=True, show_default=True)
@click.option("--calibrate", is_flag=True, help="Store the F1-max thresholds of this labelled set in the bundle "
              "(replaces the out-of-sample ones; use a split you do not report on).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--force", is_flag=True, help="Write into --out even when it holds files edgead did not write.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def evaluate(bundle_dir, data, out, overlays, calibrate, batch_size, force, as_json):
    """Image AUROC, pixel AUROC, PRO (AUPRO to FPR 0.3), F1-max, and the false-positive rate and recall
    at the bundle's stored threshold, on an MVTec-layout test set.

    \b
    Example:
      edgead eval bottle.edgead mvtec/bottle --out eval_bottle
    """
    from edgead.bundle import check_bundle_target, load_bundle
    from edgead.data import MvtecCategory, find_categories
    from edgead.evaluate import evaluate_category, format_table, write_json
    from edgead.output_paths import is_within
    from edgead.runtime.report import dumps as strict_json  # NaN -> null: --json output is always JSON

    check_output_folder(out, "--out", force)
    if out is not None and is_within(out, bundle_dir):
        raise ConfigError("--out {}: is inside the bundle {}; write the evaluation elsewhere".format(out, bundle_dir))
    bundle = load_bundle(bundle_dir)
    if calibrate:
        check_bundle_target(bundle_dir)  # writable, still a bundle: found now, not after the evaluation
    categories = find_categories(data)
    if len(categories) != 1:
        raise DataError("{}: eval takes one MVTec category (found {})".format(data, len(categories)))
    category = MvtecCategory(categories[0])
    if not category.has_test:
        raise DataError("{}: no test/ folder to evaluate on".format(categories[0]))
    result = evaluate_category(bundle, category, out, overlays and out is not None, batch_size)
    if calibrate:
        if result["calibration"] is None:
            raise DataError("{}: --calibrate needs both good and defective test images".format(categories[0]))
        from edgead.thresholds import set_calibration

        set_calibration(bundle.config, result["calibration"], result["calibration_provenance"])
        bundle.save(bundle_dir)
        click.echo("edgead: warning: {}: thresholds now come from this set; metrics at the threshold on this same "
                   "set are optimistic, report them on another split".format(bundle_dir), err=True)
    if out:
        write_json(os.path.join(out, "metrics.json"), result)
    click.echo(strict_json(result, indent=2) if as_json else format_table([result]))


def _parse_methods(text):
    """``--methods`` (comma-separated, None: every registered method) -> list of names; unknown: ConfigError."""
    from edgead.methods import get_method, method_names

    if text is None:
        return method_names()
    names = []
    for name in (n.strip() for n in str(text).split(",")):
        if name and name not in names:
            get_method(name)  # one line listing the valid names
            names.append(name)
    if not names:
        raise ConfigError("--methods: give at least one method, e.g. --methods {}".format(",".join(method_names())))
    return names


@click.command("demo")
@click.option("--out", type=click.Path(), default="demo_out", show_default=True)
@click.option("--methods", default=None, metavar="LIST",
              help="Comma-separated methods to fit and compare, e.g. padim,patchcore (default: every registered one).")
@click.option("--backbone", default="efficientnet_lite0", show_default=True)
@click.option("--weights", default="imagenet", show_default=True)
@click.option("--size", default="256", show_default=True)
@click.option("--categories", default=None, help="Comma-separated demo categories (default: all).")
@click.option("--seed", type=click.IntRange(0, SEED_MAX), default=0, show_default=True)
@click.option("--export/--no-export", default=True, show_default=True,
              help="Export every model to ONNX (fp16, batch 1), time it on ONNX Runtime CPU (2 threads), and check "
                   "the first category's against torch.")
@click.option("--quick", is_flag=True, help="A few images per category (smoke test, seconds).")
@click.option("--force", is_flag=True, help="Write into --out even when it holds files edgead did not write.")
def demo(out, methods, backbone, weights, size, categories, seed, export, quick, force):
    """The embedded default: build a small MVTec-layout dataset from scikit-image photos with synthetic
    defects, fit each method (default: all registered, e.g. PaDiM and PatchCore) on each category
    (EfficientNet-Lite0, offline ImageNet weights), evaluate, export, time, and print one method x category
    table; overlays and metrics.json under --out.

    \b
    Example:
      edgead demo --out demo_out
      edgead demo --out demo_padim --methods padim --categories brick,grass
    """
    from edgead import demo_data
    from edgead.data import MvtecCategory
    from edgead.evaluate import evaluate_category, format_table, write_json

    input_hw = _parse_size(size)
    method_list = _parse_methods(methods)
    check_output_folder(out, "--out", force, ours=("data", "models", "eval", "metrics.json"))  # a demo cut short
    names = tuple(c.strip() for c in categories.split(",")) if categories else demo_data.DEFAULT_CATEGORIES
    data_root = os.path.join(out, "data")
    click.echo("building demo dataset in {} ...".format(data_root))
    counts = dict(n_train=10, n_test_good=4, n_defect_per_type=2) if quick else {}
    demo_data.build_demo_dataset(data_root, categories=names, seed=seed, size=max(input_hw), **counts)
    results, comparisons = [], {}
    for method in method_list:
        for name in names:
            category_dir = os.path.join(data_root, name)
            category = MvtecCategory(category_dir)
            bundle_dir = os.path.join(out, "models", method, name)
            bundle, summary = fit_bundle(category_dir, bundle_dir, backbone, weights, input_hw, None, seed, 16,
                                         method=method)
            result = evaluate_category(bundle, category, os.path.join(out, "eval", method, name),
                                       overlays=True, max_overlays=12)
            result = dict({"method": method}, **result)
            result["fit_seconds"] = summary["fit_seconds"]
            result["ms_per_frame"] = None
            if export:
                onnx_path, rows, result["ms_per_frame"] = _demo_export(bundle_dir, category, input_hw,
                                                                       compare_too=(name == names[0]))
                result["onnx"] = onnx_path
                if rows is not None:
                    comparisons[method] = {"category": name, "onnx": onnx_path, "rows": rows}
            results.append(result)
            click.echo("{} {}: image AUROC {:.3f}  pixel AUROC {:.3f}  PRO {:.3f}  FPR {:.3f}  recall {:.3f} at the "
                       "default threshold{}".format(method, name, result["image_auroc"], result["pixel_auroc"],
                                                    result["pro"], result["fpr"], result["recall"],
                                                    "" if result["ms_per_frame"] is None else
                                                    "; {:.1f} ms/frame exported".format(result["ms_per_frame"])))
            click.echo("  " + _describe(bundle.config))
    click.echo("")
    click.echo(format_table(results))
    click.echo("FPR@thr / recall@thr: good / defective test images flagged at the default threshold, learned from "
               "the training images alone (out of sample); the test split set nothing.")
    if export:
        click.echo("ms/frame: median of {} runs (after {} warm-up) of the exported model (ONNX fp16, batch 1) on "
                   "ONNX Runtime CPU, {} intra-op threads, on the category's test frames.".format(
                       DEMO_TIMING["runs"], DEMO_TIMING["warmup"], DEMO_TIMING["threads"]))
    write_json(os.path.join(out, "metrics.json"), {
        "backbone": backbone, "input": list(input_hw), "methods": method_list, "results": results,
        "by_method": {m: [r for r in results if r["method"] == m] for m in method_list},
        "timing": dict(DEMO_TIMING, backend="onnxruntime cpu", precision="fp16", batch=1) if export else None,
        "compare": comparisons})
    if export:
        from edgead.exporters import compare as cmp

        for method, entry in comparisons.items():
            click.echo("\n{} {}: exported {} ({:.1f} MB); ONNX Runtime vs torch on its test images:".format(
                method, entry["category"], entry["onnx"], os.path.getsize(entry["onnx"]) / 1e6))
            click.echo(cmp.format_table(entry["rows"]))
    click.echo("\nmetrics: {}\noverlays: {}".format(os.path.join(out, "metrics.json"), os.path.join(out, "eval")))


#: how the demo times each exported model (``evaluate.onnx_ms_per_frame``)
DEMO_TIMING = {"threads": 2, "warmup": 3, "runs": 20}
#: test frames the demo compares against torch (and cycles through when timing)
DEMO_COMPARE_FRAMES = 8


def _demo_export(bundle_dir, category, input_hw, compare_too):
    """Export the saved bundle to ``<bundle_dir>.onnx`` (ONNX, fp16, batch 1), time it on the category's test
    frames (``evaluate.onnx_ms_per_frame``) and, when ``compare_too``, compare it with the bundle's torch model
    on them. Returns ``(onnx path, compare rows or None, ms per frame)``."""
    from edgead.bundle import load_bundle
    from edgead.data import ImageBatches
    from edgead.evaluate import onnx_ms_per_frame
    from edgead.exporters import compare
    from edgead.exporters.onnx_export import export_onnx

    onnx_path = bundle_dir + ".onnx"
    paths = [s.path for s in category.test_samples()][:DEMO_COMPARE_FRAMES]
    frames = next(iter(ImageBatches(paths, input_hw, batch_size=len(paths))))[0]
    with load_bundle(bundle_dir) as bundle:
        export_onnx(bundle, onnx_path, "onnx", "fp16", 1)
        rows = compare.compare(bundle, [onnx_path], frames) if compare_too else None
    return onnx_path, rows, onnx_ms_per_frame(onnx_path, frames, **DEMO_TIMING)


COMMANDS = (fit, evaluate, demo)
