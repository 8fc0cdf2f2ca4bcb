"""The interface every detection method implements (registered with ``edgead.methods.register_method``).

A method module must import without torch (only this module and ``edgead.errors`` at module level): the
CLI builds ``edgead fit --method`` and the method's fit options from the registry when it starts, and the
device-side commands (``edgead run``, ``edgead bench``) run where torch is not installed.
"""


class Method:
    """One detection method: how to fit it, load its bundle, and export its head.

    Subclasses set ``name`` and implement the methods below. Instances are stateless singletons.
    """

    #: model.json ``method`` value and the ``--method`` choice
    name = None
    #: how people write it (help texts, the ONNX doc_string); defaults to ``name``
    title = None
    #: method-specific ``edgead fit`` options this method accepts, ``{option name: help}``. The CLI turns each
    #: into a string option (``coreset_ratio`` -> ``--coreset-ratio``), passes only the ones the user gave,
    #: and refuses one the chosen method does not take (one line, exit 2); ``parse_fit_options`` converts them
    fit_options = {}
    #: ``edgead export --mahalanobis`` (or other flavour) values this method can export
    export_flavours = ("onnx",)
    #: default ``--folds`` of the out-of-sample thresholds (``edgead.thresholds.parse_folds`` values)
    default_folds = "n"
    #: weights-file tensor keys ``load_bundle(..., lazy_statistics=True)`` may leave on disk (``LazyWhitening``
    #: readers in the ``tensors`` that ``assemble`` gets); every other tensor is read into memory
    lazy_tensors = ()

    @property
    def display_name(self):
        """``title`` or, when unset, ``name``."""
        return self.title or self.name

    def parse_fit_options(self, options):
        """``{option name: str}`` (only options in ``fit_options``, as the user typed them) -> the keyword
        arguments ``make_fitter`` takes. Convert and validate each here, raising ConfigError with one line
        naming the option (``--coreset-ratio must be a number in (0, 1], got 'x'``): it runs before the fit
        starts. The default passes the strings through."""
        return dict(options)

    def make_fitter(self, backbone, weights, input_hw, dim, seed, batch_size, max_memory, **options):
        """A fitter: ``update(frames)`` (uint8 ``[B, H, W, 3]``), ``check_calibration_memory(folds, n)``,
        ``calibrate_out_of_sample(load_images, n, folds, quantile, seed)``, ``bundle()``, and the attributes
        ``warnings`` (list of one-line notes) and ``memory`` (``resources.FitMemoryPlan``).
        options: what ``parse_fit_options`` returned."""
        raise NotImplementedError

    def assemble(self, folder, config, tensors, weights_path):
        """Check the tensors of a weights file against ``config`` (BundleError naming ``weights_path``) and
        return the method's bundle object (``edgead.bundle.Bundle`` subclass). The backbone checks every
        method shares are ``edgead.bundle.check_backbone(bundle, folder, weights_path)``."""
        raise NotImplementedError

    def build_onnx_head(self, bundle, embedding, flavour, precision, map_name, score_name, **options):
        """``(nodes, initializers, sources)`` from the tensor named ``embedding`` (the output of the traced
        ``bundle.export_front_end()``) to ``map_name`` ``[N, 1, H, W]`` and ``score_name`` ``[N]`` float32;
        ``sources``: streamed initializers (``edgead.exporters.streaming``), possibly empty. flavour: one of
        ``export_flavours``; precision: ``fp16`` | ``fp32`` storage of the method's large statistics.
        Nodes in a custom domain get that domain's opset import (version 1) from the exporter.
        options: method-specific tuning passed through by ``build_onnx`` (PaDiM: ``blocks``); a method ignores
        the ones it does not know."""
        raise NotImplementedError
