"""Stand-in ``tensorrt`` modules and a stand-in CUDA runtime, for tests on machines without TensorRT or a GPU.

``make_tensorrt(version, ...)`` builds a module with only the API surface edgead uses, shaped like each real
release (checked against the NVIDIA/TensorRT Python bindings, ``python/src/infer/pyCore.cpp`` / ``pyInt8.cpp``):

- 8.5 / 8.6: ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH`` (= 0), ``BuilderFlag.FP16/INT8/TF32``,
  ``IInt8EntropyCalibrator2``, ``set_calibration_profile``, ``platform_has_fast_fp16/int8``;
- 10.x: the same plus ``STRONGLY_TYPED`` (= 1); ``EXPLICIT_BATCH`` deprecated (still there);
- 11.x: strongly typed only: no ``EXPLICIT_BATCH``, no ``BuilderFlag.FP16/INT8``, no INT8 calibrator,
  no ``set_calibration_profile`` / ``int8_calibrator``, no ``platform_has_fast_*``.

Every builder call is appended to ``trt.calls`` as a tuple, so tests can pin what ``build_engine`` asked for.
``build_serialized_network`` behaves like TensorRT's calibration: with ``BuilderFlag.INT8`` and a calibrator
it asks ``read_calibration_cache``, and without a cache pulls ``get_batch([input name])`` until None, then
``write_calibration_cache``. ``FakeCuda`` (``make_fake_cuda()``) counts malloc / free / copies.
"""
import types

import numpy as np

FAKE_CACHE = b"TRT-fake-EntropyCalibration2\nimage: 3c010a14\n"
FAKE_ENGINE = b"fake serialized engine"


class _Flag(object):
    """An enum value: compares by name, ``int()`` gives its value."""

    def __init__(self, name, value):
        self.name, self.value = name, value

    def __int__(self):
        return self.value

    def __repr__(self):
        return self.name

    def __eq__(self, other):
        return isinstance(other, _Flag) and (self.name, self.value) == (other.name, other.value)

    def __hash__(self):
        return hash((self.name, self.value))


def _enum(name, **values):
    return type(name, (object,), {key: _Flag(key, value) for key, value in values.items()})


def _major(version):
    return int(str(version).split(".")[0])


def make_tensorrt(version="10.3.0", input_shape=(-1, 64, 64, 3), input_dtype="uint8", engine=None,
                  registered=True, build_result=FAKE_ENGINE, build_error=None, fast_fp16=True, fast_int8=True,
                  parse_errors=(), calibration_profile_ok=True):
    """A stand-in ``tensorrt`` module (see module doc). ``trt.calls`` records the builder calls."""
    major = _major(version)
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    calls = trt.calls = []
    strongly_typed = major >= 11

    class Logger(object):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = 0, 1, 2, 3, 4

        def __init__(self, level=None):
            self.level = level

    class Runtime(object):
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            return engine

    class Registry(object):
        def get_creator(self, name, plugin_version, namespace):
            return object() if registered and (name, plugin_version, namespace) == ("PadimMahalanobis", "1", "") else None

    trt.Logger, trt.Runtime = Logger, Runtime
    trt.get_plugin_registry = lambda: Registry()
    trt.init_libnvinfer_plugins = lambda logger, namespace: calls.append(("init_libnvinfer_plugins", namespace))

    trt.DataType = _enum("DataType", FLOAT=0, HALF=1, INT8=2, INT32=3, BOOL=4, UINT8=5)
    numpy_types = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "BOOL": np.bool_,
                   "UINT8": np.uint8}
    trt.float32, trt.uint8 = trt.DataType.FLOAT, trt.DataType.UINT8

    def nptype(dtype):
        return numpy_types[dtype.name]

    trt.nptype = nptype
    trt.MemoryPoolType = _enum("MemoryPoolType", WORKSPACE=0)
    flags = {"TF32": 6, "OBEY_PRECISION_CONSTRAINTS": 11, "PREFER_PRECISION_CONSTRAINTS": 12}
    if not strongly_typed:
        flags.update(FP16=0, INT8=1)
    trt.BuilderFlag = _enum("BuilderFlag", **flags)
    if major < 10:
        trt.NetworkDefinitionCreationFlag = _enum("NetworkDefinitionCreationFlag", EXPLICIT_BATCH=0,
                                                  EXPLICIT_PRECISION=1)
    elif major == 10:
        trt.NetworkDefinitionCreationFlag = _enum("NetworkDefinitionCreationFlag", EXPLICIT_BATCH=0, STRONGLY_TYPED=1)
    else:
        trt.NetworkDefinitionCreationFlag = _enum("NetworkDefinitionCreationFlag", STRONGLY_TYPED=0,
                                                  PREFER_JIT_PYTHON_PLUGINS=1, PREFER_AOT_PYTHON_PLUGINS=2)
    trt.TensorIOMode = _enum("TensorIOMode", NONE=0, INPUT=1, OUTPUT=2)

    class Tensor(object):
        def __init__(self, name, shape, dtype):
            self.name, self.shape, self.dtype = name, tuple(shape), dtype

    class Network(object):
        def __init__(self, flags):
            self.flags = flags
            self._inputs = [Tensor("image", input_shape,
                                   trt.DataType.UINT8 if input_dtype == "uint8" else trt.DataType.FLOAT)]

        @property
        def num_inputs(self):
            return len(self._inputs)

        def get_input(self, index):
            return self._inputs[index]

    class ParserError(object):
        def __init__(self, text):
            self.text = text

        def desc(self):
            return self.text

    class OnnxParser(object):
        def __init__(self, network, logger):
            calls.append(("OnnxParser",))

        def parse_from_file(self, path):
            calls.append(("parse_from_file", path))
            return not parse_errors

        @property
        def num_errors(self):
            return len(parse_errors)

        def get_error(self, index):
            return ParserError(parse_errors[index])

    class OptimizationProfile(object):
        count = 0

        def __init__(self):
            OptimizationProfile.count += 1
            self.id = OptimizationProfile.count
            self.shapes = {}

        def set_shape(self, name, min, opt, max):  # noqa: A002 - TensorRT's keyword names
            calls.append(("set_shape", self.id, name, tuple(min), tuple(opt), tuple(max)))
            self.shapes[name] = (tuple(min), tuple(opt), tuple(max))

    class BuilderConfig(object):
        def __init__(self):
            self.flags = {"TF32"}  # TensorRT's default: TF32 allowed
            self.profiles = []
            self.calibration_profile = None
            self._calibrator = None

        def set_memory_pool_limit(self, pool, size):
            calls.append(("set_memory_pool_limit", repr(pool), size))

        def set_flag(self, flag):
            calls.append(("set_flag", flag.name))
            self.flags.add(flag.name)

        def clear_flag(self, flag):
            calls.append(("clear_flag", flag.name))
            self.flags.discard(flag.name)

        def get_flag(self, flag):
            return flag.name in self.flags

        def add_optimization_profile(self, profile):
            calls.append(("add_optimization_profile", profile.id))
            self.profiles.append(profile)
            return len(self.profiles) - 1

    if not strongly_typed:
        def set_calibration_profile(self, profile):
            calls.append(("set_calibration_profile", profile.id))
            self.calibration_profile = profile
            return calibration_profile_ok

        def _get_calibrator(self):
            return self._calibrator

        def _set_calibrator(self, calibrator):
            calls.append(("int8_calibrator", type(calibrator).__name__))
            self._calibrator = calibrator

        BuilderConfig.set_calibration_profile = set_calibration_profile
        BuilderConfig.int8_calibrator = property(_get_calibrator, _set_calibrator)

    def calibrate(network, config):
        """What TensorRT does with an implicit-INT8 config: cache first, else pull batches until None."""
        calibrator = config._calibrator
        calls.append(("get_batch_size", calibrator.get_batch_size()))
        cache = calibrator.read_calibration_cache()
        calls.append(("read_calibration_cache", None if cache is None else bytes(cache)))
        if cache is not None:
            return
        names = [network.get_input(0).name]
        for _ in range(10000):
            pointers = calibrator.get_batch(names)
            calls.append(("get_batch", None if pointers is None else list(pointers)))
            if pointers is None:
                break
        calibrator.write_calibration_cache(memoryview(FAKE_CACHE))
        calls.append(("write_calibration_cache", len(FAKE_CACHE)))

    class Builder(object):
        def __init__(self, logger):
            calls.append(("Builder",))

        def create_network(self, flags=0):
            calls.append(("create_network", flags))
            return Network(flags)

        def create_builder_config(self):
            calls.append(("create_builder_config",))
            return BuilderConfig()

        def create_optimization_profile(self):
            profile = OptimizationProfile()
            calls.append(("create_optimization_profile", profile.id))
            return profile

        def build_serialized_network(self, network, config):
            calls.append(("build_serialized_network", sorted(config.flags)))
            if "INT8" in config.flags and config._calibrator is not None:
                calibrate(network, config)
            if build_error is not None:
                raise build_error
            return build_result

    if not strongly_typed:
        Builder.platform_has_fast_fp16 = property(lambda self: fast_fp16)
        Builder.platform_has_fast_int8 = property(lambda self: fast_int8)

    trt.Builder, trt.OnnxParser = Builder, OnnxParser
    trt.IBuilderConfig = BuilderConfig

    if not strongly_typed:
        class IInt8EntropyCalibrator2(object):
            def __init__(self):
                calls.append(("IInt8EntropyCalibrator2.__init__",))

        trt.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2
    return trt


def builder_calls(trt, *names):
    """The recorded calls whose first element is in ``names`` (all of them when none are given)."""
    return [call for call in trt.calls if not names or call[0] in names]


def make_fake_cuda(fail_copy=None):
    """A CudaRuntime stand-in class and its ledger: ``ledger["malloc"]`` = [(pointer, nbytes)],
    ``ledger["free"]`` = [pointer], ``ledger["copies"]`` = [(pointer, bytes copied, numpy copy)].
    fail_copy: an exception raised by ``copy_to_device`` (a CUDA error half-way through calibration)."""
    ledger = {"malloc": [], "free": [], "copies": [], "instances": 0}

    class FakeCuda(object):
        def __init__(self, device=0):
            self.device = device
            ledger["instances"] += 1

        def malloc(self, nbytes):
            pointer = 0x10000 * (len(ledger["malloc"]) + 1)
            ledger["malloc"].append((pointer, int(nbytes)))
            return pointer

        def free(self, pointer):
            ledger["free"].append(pointer)

        def copy_to_device(self, pointer, array):
            if fail_copy is not None:
                raise fail_copy
            sizes = dict(ledger["malloc"])
            assert pointer in sizes and pointer not in ledger["free"], "copy to a pointer that is not allocated"
            assert array.flags["C_CONTIGUOUS"] and array.nbytes <= sizes[pointer], "copy overruns the buffer"
            ledger["copies"].append((pointer, int(array.nbytes), np.array(array)))

        def device_name(self):
            return "Fake GPU"

        def compute_capability(self):
            return "8.7"

    return FakeCuda, ledger
