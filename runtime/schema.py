"""The one declared schema of ``model.json`` and of an exported model's ``edgead`` metadata.

``schemas/model.schema.json`` (JSON Schema 2020-12) declares every key; this module loads it and applies
it, for the workstation (``edgead.bundle.read_config``, ``exporters.onnx_export`` before writing) and the
torch-free device runtime (``edgead.runtime.modelinfo``). Entry points: ``"bundle"`` (a bundle's
model.json) and ``"metadata"`` (ONNX ``metadata_props["edgead"]`` / TensorRT ``.engine.json`` sidecar).

``validate`` runs, in order: a walk that refuses NaN/Infinity and integers beyond float64 anywhere and
nesting deeper than ``MAX_DEPTH``; the ``format_version`` gate; the schema (``number`` = finite, never a
boolean; ``integer`` = a JSON integer); ``consistency_problems``, the cross-field rules JSON Schema cannot
express. Every problem becomes one line ``<file>: <json.path> must be ..., got ...`` in the caller's
error class.

Torch-free, Python 3.8.
"""
import functools
import json
import math
import os
import re
import sys

SCHEMA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schemas", "model.schema.json")
ENTRY_POINTS = ("bundle", "metadata")
SUPPORTED_FORMAT_VERSIONS = (1,)
#: deeper nesting is refused (real files nest 3 levels; deep nesting only exhausts parsers)
MAX_DEPTH = 32

_FLOAT_MAX = sys.float_info.max
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TYPE_WORDS = {"number": "a finite number", "integer": "an integer", "string": "a string", "object": "an object",
               "array": "a list", "null": "null", "boolean": "true or false"}
#: which of several errors at the same JSON path is reported (lower first)
_KEYWORD_RANK = {"required": 0, "type": 1, "const": 2, "enum": 2, "exclusiveMinimum": 3, "minimum": 4,
                 "exclusiveMaximum": 4, "maximum": 4, "minItems": 5, "maxItems": 5}


class _OutOfRange(float):
    """A JSON number beyond float64 (``1e400``): infinite, but remembers how the file spelled it."""

    def __new__(cls, value, text):
        obj = float.__new__(cls, value)
        obj.text = text
        return obj


def _parse_float(text):
    value = float(text)
    return value if math.isfinite(value) else _OutOfRange(value, text)


# --- the validator ---------------------------------------------------------------------------------

def _is_number(checker, instance):
    if isinstance(instance, bool):
        return False
    if isinstance(instance, int):
        return -_FLOAT_MAX <= instance <= _FLOAT_MAX
    return isinstance(instance, float) and math.isfinite(instance)


def _is_integer(checker, instance):
    return isinstance(instance, int) and not isinstance(instance, bool)


@functools.lru_cache(maxsize=None)
def load_schema():
    """The schema document (dict). Do not mutate it."""
    with open(SCHEMA_PATH, "r", encoding="utf-8") as fh:
        return json.load(fh)


@functools.lru_cache(maxsize=None)
def _validator(entry):
    from jsonschema import Draft202012Validator, validators

    base = Draft202012Validator
    checker = base.TYPE_CHECKER.redefine_many({"number": _is_number, "integer": _is_integer})
    cls = validators.extend(base, type_checker=checker)
    schema = dict(load_schema())
    schema["$ref"] = "#/$defs/" + entry
    return cls(schema)


# --- messages --------------------------------------------------------------------------------------

def format_path(path):
    """``("input", "std", 1)`` -> ``input.std[1]``; ``()`` -> ``the top level``. Always one line."""
    parts = []
    items = list(path)
    if len(items) > 12:
        items = items[:6] + [Ellipsis]
    for item in items:
        if item is Ellipsis:
            parts.append("...")
        elif isinstance(item, int):
            parts.append("[{}]".format(item))
        elif _IDENTIFIER.match(str(item)) and len(str(item)) <= 60:
            parts.append(("." if parts else "") + str(item))
        else:
            parts.append("[{}]".format(json.dumps(str(item)[:60])))
    return "".join(parts) or "the top level"


def show(value):
    """A short one-line rendering of a JSON value for messages (JSON spelling: null, true, NaN)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if -10 ** 15 < value < 10 ** 15:
            return str(value)
        try:
            return "an integer of {} digits".format(len(str(abs(value))))
        except ValueError:  # beyond Python's int-to-str digit limit
            return "an integer of about {} digits".format(int(value.bit_length() * 0.30103) + 1)
    if isinstance(value, _OutOfRange):
        return "{} (beyond float64)".format(value.text[:40])
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return repr(value)
    if isinstance(value, str):
        text = json.dumps(value[:60])
        return text + ("..." if len(value) > 60 else "")
    if isinstance(value, (list, tuple)):
        return "a list of {} item{}".format(len(value), "" if len(value) == 1 else "s")
    if isinstance(value, dict):
        return "an object with {} key{}".format(len(value), "" if len(value) == 1 else "s")
    return "a {}".format(type(value).__name__)


def _describe(schema):
    """What a (sub)schema asks for, in words."""
    if not isinstance(schema, dict):
        return "valid"
    if "const" in schema:
        return show(schema["const"])
    if "enum" in schema:
        return _one_of(schema["enum"])
    types = schema.get("type")
    words = " or ".join(_TYPE_WORDS.get(t, t) for t in ([types] if isinstance(types, str) else types or []))
    for key, op in (("exclusiveMinimum", ">"), ("minimum", ">="), ("maximum", "<=")):
        if key in schema:
            words += " {} {}".format(op, show(schema[key]))
    return words.strip() or "valid"


def _one_of(values):
    values = list(values)
    return show(values[0]) if len(values) == 1 else "one of " + ", ".join(show(v) for v in values)


def _expectation(error):
    """(reported path, text) of one jsonschema ValidationError."""
    path = tuple(error.absolute_path)
    kind, value, schema = error.validator, error.validator_value, error.schema
    if kind == "required":
        missing = [k for k in value if isinstance(error.instance, dict) and k not in error.instance]
        key = missing[0] if missing else (value[0] if value else "?")
        return path + (key,), None
    if kind == "type":
        types = [value] if isinstance(value, str) else list(value)
        return path, " or ".join(_TYPE_WORDS.get(t, t) for t in types)
    if kind == "const":
        return path, show(value)
    if kind == "enum":
        return path, _one_of(value)
    if kind in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        op = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}[kind]
        return path, "{} {}".format(op, show(value))
    if kind in ("minItems", "maxItems"):
        low, high = schema.get("minItems"), schema.get("maxItems")
        if low is not None and low == high:
            return path, "a list of exactly {} items".format(low)
        return path, "a list of {} {} items".format("at least" if kind == "minItems" else "at most", value)
    if kind == "minLength":
        return path, "a non-empty string"
    if kind == "pattern":
        return path, "a string matching {}".format(value)
    if kind in ("anyOf", "oneOf"):
        return path, " or ".join(_describe(s) for s in value)
    first = (error.message or kind).splitlines()[0][:160]
    return path, "valid ({})".format(first.encode("ascii", "backslashreplace").decode("ascii"))


def _sort_key(error):
    path, _ = _expectation(error)
    return len(path), format_path(path), _KEYWORD_RANK.get(error.validator, 9)


def _message(where, error):
    path, expected = _expectation(error)
    if expected is None:
        return "{}: lacks key '{}'".format(where, format_path(path))
    return "{}: {} must be {}, got {}".format(where, format_path(path), expected, show(error.instance))


# --- parse and validate ----------------------------------------------------------------------------

def loads(text, where, error_class, invalid="{where}: invalid JSON ({detail})"):
    """JSON text or UTF-8 bytes -> Python value. Never raises anything but ``error_class`` (one line).

    NaN/Infinity are parsed (``validate`` refuses them with their JSON path); numbers beyond float64
    (``1e400``) are kept as infinite floats that remember their spelling.
    invalid: message template with ``{where}`` and ``{detail}``.
    """
    def fail(detail):
        detail = " ".join(str(detail).split())[:200].encode("ascii", "backslashreplace").decode("ascii")
        raise error_class(invalid.format(where=where, detail=detail))

    if isinstance(text, (bytes, bytearray, memoryview)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            fail("not UTF-8 text: {}".format(exc))
    if not isinstance(text, str):
        fail("expected text, got {}".format(type(text).__name__))
    if text.startswith("\ufeff"):  # a byte-order mark from a hand edit: harmless, skip it
        text = text[1:]
    try:
        return json.loads(text, parse_float=_parse_float, object_pairs_hook=_unique_keys)
    except RecursionError:
        fail("nested too deeply")
    except ValueError as exc:  # includes JSONDecodeError and ints beyond Python's digit limit
        fail(exc)


def _unique_keys(pairs):
    """object_pairs_hook: a key given twice is an error (JSON parsers disagree on which one wins)."""
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError("key {} appears twice in one object".format(json.dumps(key)))
        result[key] = value
    return result


def _walk_problem(value):
    """(path, text) of the first NaN/Infinity, integer beyond float64 or over-deep container, else None.
    Iterative (no recursion, whatever the depth)."""
    stack = [(value, (), 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return path, "must be a finite number, got {}".format(show(item))
        if isinstance(item, int) and not -_FLOAT_MAX <= item <= _FLOAT_MAX:
            return path, "must be a number within float64 range, got {}".format(show(item))
        if isinstance(item, (dict, list, tuple)):
            if depth >= MAX_DEPTH:
                return path, "nests more than {} levels deep".format(MAX_DEPTH)
            children = item.items() if isinstance(item, dict) else enumerate(item)
            stack.extend(reversed([(child, path + (key,), depth + 1) for key, child in children]))
    return None


def validate(info, entry, where, error_class):
    """Check ``info`` against entry point ``entry`` (``"bundle"`` or ``"metadata"``); returns ``info``.

    where: names the file in messages (``bottle.edgead/model.json``); error_class: raised with one line.
    """
    if entry not in ENTRY_POINTS:
        raise ValueError("unknown schema entry point {!r}".format(entry))
    problem = _walk_problem(info)
    if problem is not None:
        raise error_class("{}: {} {}".format(where, format_path(problem[0]), problem[1]))
    if isinstance(info, dict) and "format_version" in info:
        version = info["format_version"]
        if not (type(version) is int and version in SUPPORTED_FORMAT_VERSIONS):
            raise error_class("{}: format_version {} is not supported by this edgead (it reads {}); upgrade edgead "
                              "(on the device too)".format(where, show(version),
                                                           ", ".join(map(str, SUPPORTED_FORMAT_VERSIONS))))
    try:
        errors = list(_validator(entry).iter_errors(info))
    except RecursionError:
        raise error_class("{}: nested too deeply".format(where))
    if errors:
        raise error_class(_message(where, min(errors, key=_sort_key)))
    for path, text in consistency_problems(info):
        raise error_class("{}: {} {}".format(where, format_path(path), text))
    return info


#: ``embedding.projection`` -> (rule on ``(embedding.dim, sum(backbone.channels))``, its words)
_PROJECTION_RULES = {"none": (lambda dim, total: dim == total, "equal to"),
                     "adaptive_avg": (lambda dim, total: dim <= total, "at most")}


def consistency_problems(info):
    """Yield ``(path, text)`` for each cross-field rule ``info`` breaks; run after the schema passed.

    Rules (each only when the keys it needs are present; the metadata of old exports may lack them), for every
    method: ``len(backbone.channels) == len(backbone.strides) == len(backbone.out_indices)``; every stride a
    multiple of ``strides[0]``; input height/width multiples of the deepest stride;
    ``embedding.grid == [height // strides[0], width // strides[0]]`` (edgead.fit.make_config).
    PaDiM (``embedding.channel_indices``): ``embedding.dim == len(channel_indices)``; channel indices distinct
    and ``< sum(backbone.channels)``. PatchCore (``embedding.projection``): ``embedding.dim`` equals
    ``sum(backbone.channels)`` for ``none`` and is at most that for ``adaptive_avg``;
    ``patchcore.coreset_size <= patchcore.n_patches`` once patches were counted (``n_patches > 0``).
    CFLOW (``embedding.layout`` scale_rows): ``embedding.dim == sum(backbone.channels)``; ``cflow.scale_grids`` and
    ``cflow.reference_log_likelihood`` one entry per stage, each grid ``[height // stride, width // stride]``.
    """
    backbone = info.get("backbone") or {}
    embedding = info.get("embedding") or {}
    inp = info.get("input") or {}
    lists = [(key, backbone[key]) for key in ("channels", "strides", "out_indices") if key in backbone]
    if len({len(v) for _, v in lists}) > 1:
        yield ("backbone",), "channels, strides and out_indices must have the same length, got {}".format(
            ", ".join("{} {}".format(len(v), k) for k, v in lists))
        return
    strides = backbone.get("strides")
    if strides:
        for i, stride in enumerate(strides):
            if stride % strides[0]:
                yield ("backbone", "strides", i), "must be a multiple of backbone.strides[0] = {}, got {}".format(
                    strides[0], stride)
                return
    indices = embedding.get("channel_indices")
    if indices is not None and "dim" in embedding and embedding["dim"] != len(indices):
        yield ("embedding", "dim"), "must equal len(embedding.channel_indices) = {}, got {}".format(
            len(indices), embedding["dim"])
        return
    if indices is not None:
        total = sum(backbone["channels"]) if "channels" in backbone else None
        seen = {}
        for i, index in enumerate(indices):
            if total is not None and index >= total:
                yield ("embedding", "channel_indices", i), (
                    "must be < {} (the sum of backbone.channels), got {}".format(total, index))
                return
            if index in seen:
                yield ("embedding", "channel_indices", i), "must not repeat a channel, got {} again (first at [{}])".format(
                    index, seen[index])
                return
            seen[index] = i
    total = sum(backbone["channels"]) if "channels" in backbone else None
    projection, dim = embedding.get("projection"), embedding.get("dim")
    if total is not None and dim is not None and projection in _PROJECTION_RULES:
        holds, words = _PROJECTION_RULES[projection]
        if not holds(dim, total):
            yield ("embedding", "dim"), ("must be {} sum(backbone.channels) = {} when embedding.projection is {}, "
                                         "got {}".format(words, total, projection, dim))
            return
    patchcore = info.get("patchcore") or {}
    size, patches = patchcore.get("coreset_size"), patchcore.get("n_patches")
    if size is not None and patches and size > patches:
        yield ("patchcore", "coreset_size"), "must be <= patchcore.n_patches = {}, got {}".format(patches, size)
        return
    cflow = info.get("cflow") or {}
    if embedding.get("layout") == "scale_rows" and total is not None and dim is not None and dim != total:
        yield ("embedding", "dim"), "must equal sum(backbone.channels) = {} when embedding.layout is scale_rows, " \
            "got {}".format(total, dim)
        return
    for key in ("scale_grids", "reference_log_likelihood"):
        if key in cflow and "channels" in backbone and len(cflow[key]) != len(backbone["channels"]):
            yield ("cflow", key), "must have one entry per backbone stage ({}), got {}".format(
                len(backbone["channels"]), len(cflow[key]))
            return
    if "scale_grids" in cflow and strides and "height" in inp and "width" in inp:
        for i, (grid, stride) in enumerate(zip(cflow["scale_grids"], strides)):
            expected = [inp["height"] // stride, inp["width"] // stride]
            if list(grid) != expected:
                yield ("cflow", "scale_grids", i), "must be [height // {0}, width // {0}] = {1}, got {2}".format(
                    stride, expected, list(grid))
                return
    if strides and "height" in inp and "width" in inp:
        for key in ("height", "width"):
            if inp[key] % strides[-1]:
                yield ("input", key), "must be a multiple of the deepest stride {} (backbone.strides[-1]), got {}".format(
                    strides[-1], inp[key])
                return
        grid = embedding.get("grid")
        expected = [inp["height"] // strides[0], inp["width"] // strides[0]]
        if grid is not None and list(grid) != expected:
            yield ("embedding", "grid"), "must be {} (input height, width // backbone.strides[0]), got {}".format(
                expected, list(grid))
