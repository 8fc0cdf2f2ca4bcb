"""Detection methods behind one seam: a registry by name, as timm registers model families.

A method module defines a ``Method`` subclass and decorates it with ``@register_method``; the CLI, the
exporters, evaluation and ``load_bundle`` look the method up by the ``method`` key of model.json
(``get_method(name)``), never with ``if method == ...`` chains. Everything else is shared: backbones,
data, metrics, bundle I/O (``edgead.bundle``), blur, thresholds, the ONNX contract and the runtime.

Entry points every method provides (see ``Method``):
- ``make_fitter(...)``: the object ``edgead fit`` streams training batches into (``update``), calibrates
  out of sample (``calibrate_out_of_sample``) and turns into a bundle (``bundle()``);
- ``assemble(...)``: a loaded bundle (tensors checked against model.json) whose ``model()`` is the torch
  scoring model (uint8 frames ``[N, H, W, 3]`` -> anomaly map ``[N, 1, H, W]``, score ``[N]``);
- ``build_onnx_head(...)``: the ONNX nodes from the traced front end's ``embedding`` to the two outputs.

Method modules import without torch (``edgead.methods.base``): the CLI reads the registry when it starts
(``--method`` choices, each method's ``fit_options``), on the device too.
"""
from edgead.errors import ConfigError

_REGISTRY = {}
#: modules that register the built-in methods when imported (imported lazily, on first lookup)
_BUILTIN_MODULES = ("edgead.methods.padim", "edgead.methods.patchcore", "edgead.methods.cflow")


def register_method(cls):
    """Class decorator: register ``cls`` (a ``Method`` subclass) under ``cls.name``; returns ``cls``."""
    if not cls.name:
        raise ValueError("a method class needs a name")
    _REGISTRY[cls.name] = cls()
    return cls


def unregister_method(name):
    """Remove ``name`` from the registry (tests that register a throwaway method); no error when absent."""
    _REGISTRY.pop(name, None)


def _load_builtins():
    import importlib

    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def method_names():
    """Sorted names of the registered methods."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_method(name):
    """The registered ``Method`` instance for ``name``; ConfigError (one line) lists the valid names."""
    _load_builtins()
    if name not in _REGISTRY:
        raise ConfigError("unknown method {!r}; choose one of: {}".format(
            name, ", ".join(sorted(_REGISTRY)) or "(none registered)"))
    return _REGISTRY[name]


def option_flag(key):
    """Command-line spelling of a fit option key: ``coreset_ratio`` -> ``--coreset-ratio``."""
    return "--" + str(key).replace("_", "-")


def fit_option_keys():
    """``{option key: [names of the methods that take it]}`` over every registered method (sorted)."""
    keys = {}
    for name in method_names():
        for key in _REGISTRY[name].fit_options:
            keys.setdefault(key, []).append(name)
    return keys


def parse_fit_options(name, options):
    """The method-specific fit options ``options`` (``{key: str}``, only those the user gave) of method ``name``
    checked and converted by the method (``Method.parse_fit_options``). An option the method does not take is a
    ConfigError (one line): ``--coreset-ratio applies to --method patchcore, not padim``."""
    method = get_method(name)
    options = dict(options or {})
    for key in sorted(options):
        if key not in method.fit_options:
            takers = fit_option_keys().get(key)
            if takers:
                raise ConfigError("{} applies to --method {}, not {}".format(
                    option_flag(key), " or ".join(takers), name))
            raise ConfigError("{} is not an option of --method {}".format(option_flag(key), name))
    return method.parse_fit_options(options)
