"""Initializers too large to copy: a placeholder TensorProto in the graph plus a source of its bytes.

The PaDiM statistics of a WideResNet50 bundle (packed whitening ``[4096, 151525]`` float32, 2.48 GB) must
not be held twice by an export. The head (``onnx_head``) therefore puts a *placeholder* in the graph (name,
dims, data type, no data) and hands a ``TensorSource`` beside it, which yields the tensor's raw little-endian
bytes chunk by chunk (``CHUNK_BYTES``), converting float32 rows to fp16 one chunk at a time. The writer
(``external_data.write_model``) streams those chunks into the external data file, or into the .onnx itself
by protobuf framing (``framed_tensor_head``). ``materialize`` fills the placeholders in memory instead (for
``build_onnx``, small models and tests): the same bytes, so both routes give the same model.

Rows: anything with ``shape`` ``(rows, cols)`` and ``iter_rows(max_bytes)`` yielding ``(start_row, float32
ndarray [n, cols])`` in order (``PadimBundle.iter_whitening_rows``, ``ArrayRows`` over an in-memory array).
Torch-free (numpy + onnx).
"""
import numpy as np
from onnx import TensorProto, helper

#: bytes per chunk a source yields (and per block of float32 rows it reads)
CHUNK_BYTES = 64 << 20


class ArrayRows:
    """Row blocks of an in-memory 2-D array (numpy, or anything ``np.asarray`` takes), as float32."""

    def __init__(self, array):
        self.array = np.asarray(array)
        if self.array.ndim != 2:
            raise ValueError("rows need a 2-D array, got shape {}".format(self.array.shape))

    @property
    def shape(self):
        return tuple(int(v) for v in self.array.shape)

    def iter_rows(self, max_bytes=None):
        rows, cols = self.shape
        max_bytes = CHUNK_BYTES if max_bytes is None else max_bytes
        step = rows_per_chunk(cols, max_bytes)
        for start in range(0, rows, step):
            yield start, np.asarray(self.array[start:start + step], dtype=np.float32)


class FunctionRows:
    """Rows from a ``shape`` and an ``iter_rows(max_bytes)`` function (e.g. a bundle's)."""

    def __init__(self, shape, iter_rows):
        self.shape = tuple(int(v) for v in shape)
        self.iter_rows = iter_rows


class GatheredRows:
    """Rows of ``source`` with one zero appended, gathered by a fixed column ``index``: row ``r`` is
    ``concat(source[r], 0)[index.ravel()]`` (float32). For PaDiM's standard-op head: the packed whitening
    ``[P, T]`` -> one dense transposed row block ``[P, c * r]`` of ``W`` (``onnx_head.block_gather_index``;
    index ``T`` is the zero above the diagonal), converted block by block as the packed rows are read."""

    def __init__(self, source, index):
        self.source = as_rows(source)
        self.index = np.ascontiguousarray(index, dtype=np.int64).ravel()
        rows, cols = self.source.shape
        if self.index.size and (self.index.min() < 0 or self.index.max() > cols):
            raise ValueError("gather index outside 0..{} (the appended zero is {})".format(cols, cols))
        self.shape = (rows, int(self.index.size))

    def iter_rows(self, max_bytes=None):
        """Blocks of gathered rows; both the packed float32 rows read and the rows yielded stay within
        ``max_bytes`` (unless one row is larger)."""
        max_bytes = CHUNK_BYTES if max_bytes is None else max_bytes
        cols = self.source.shape[1]
        step = min(rows_per_chunk(self.index.size, max_bytes), rows_per_chunk(cols, max_bytes))
        for start, block in self.source.iter_rows(step * cols * 4):
            padded = np.empty((len(block), cols + 1), np.float32)
            padded[:, :cols] = block
            padded[:, cols] = 0.0
            yield start, padded[:, self.index]


def rows_per_chunk(cols, max_bytes, itemsize=4):
    """Rows of ``cols`` items of ``itemsize`` bytes in one chunk of at most ``max_bytes`` (at least 1)."""
    return max(1, int(max_bytes) // max(1, int(cols) * int(itemsize)))


def as_rows(value):
    """``value`` as rows: an object with ``iter_rows`` and ``shape`` is taken as it is; an array (numpy, torch on
    the CPU) is wrapped in ``ArrayRows``."""
    if hasattr(value, "iter_rows") and hasattr(value, "shape"):
        return value
    if hasattr(value, "detach"):  # a torch tensor: a numpy view, no copy
        value = value.detach().cpu().numpy()
    return ArrayRows(value)


class TensorSource:
    """The raw bytes of one ``[rows, cols]`` initializer stored as ``dtype`` (little-endian), chunk by chunk.

    rows: see the module doc; dtype: numpy float16 or float32 (the ONNX storage type); dims: the tensor's dims
    when it is not 2-D (``dims[0]`` = rows, the product of the rest = cols; row-major, so the bytes are the
    same). Re-iterable: each ``chunks()`` call reads the rows again.
    """

    def __init__(self, rows, dtype, dims=None):
        self.rows = as_rows(rows)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.shape = tuple(int(v) for v in self.rows.shape)
        self.dims = self.shape if dims is None else tuple(int(v) for v in dims)
        if self.dims[0] != self.shape[0] or int(np.prod(self.dims[1:], dtype=np.int64)) != self.shape[1]:
            raise ValueError("dims {} do not hold {} x {} rows".format(self.dims, *self.shape))
        self.data_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def chunks(self, max_bytes=None):
        """Yield the bytes (``memoryview``, each at most ``max_bytes``, default ``CHUNK_BYTES``, unless one row is
        larger) in order. ValueError when the rows are not the declared ones (a gap, another width, too many or
        too few)."""
        rows, cols = self.shape
        max_bytes = CHUNK_BYTES if max_bytes is None else max_bytes
        expected = 0
        # float32 rows are read in blocks of max_bytes; a narrower storage type yields proportionally less
        for start, block in self.rows.iter_rows(max_bytes):
            block = np.asarray(block)
            if start != expected or block.ndim != 2 or block.shape[1] != cols or expected + len(block) > rows:
                raise ValueError("rows source yielded rows {}..{} of width {}, expected row {} of a {} x {} "
                                 "tensor".format(start, start + len(block), block.shape[1:], expected, rows, cols))
            out = np.ascontiguousarray(block, dtype=self.dtype)  # fp32 -> fp16 here, one chunk at a time
            expected += len(block)
            yield memoryview(out).cast("B")
            del out, block
        if expected != rows:
            raise ValueError("rows source ended at row {} of {}".format(expected, rows))

    def to_bytes(self):
        """All bytes at once (``materialize``; the caller accepts holding the whole tensor), joined from the chunks."""
        return b"".join(self.chunks())


def placeholder(name, source):
    """A TensorProto with ``name``, the dims and data type of ``source`` and no data."""
    tensor = TensorProto()
    tensor.dims.extend(source.dims)
    tensor.name = name
    tensor.data_type = source.data_type
    return tensor


def has_data(tensor):
    """True when a TensorProto holds data or names external data (so it is not a placeholder)."""
    return bool(tensor.HasField("raw_data") or tensor.external_data or tensor.float_data or tensor.int32_data
                or tensor.int64_data or tensor.double_data or tensor.uint64_data or tensor.string_data)


def fill(tensor, source):
    """Give the placeholder ``tensor`` its bytes (in memory)."""
    tensor.raw_data = source.to_bytes()


def check_sources(model, sources):
    """``sources`` (``{initializer name: TensorSource}``, or None) as a dict, each naming exactly one initializer
    of ``model.graph`` that is a placeholder of the source's dims and type; ValueError otherwise."""
    sources = dict(sources or {})
    if not sources:
        return sources
    found = {}
    for tensor in model.graph.initializer:
        if tensor.name in sources:
            if tensor.name in found:
                raise ValueError("initializer {!r} appears twice".format(tensor.name))
            source = sources[tensor.name]
            if has_data(tensor) or tuple(tensor.dims) != source.dims or tensor.data_type != source.data_type:
                raise ValueError("initializer {!r} is not a placeholder for its source ({} {}, expected {} {})".format(
                    tensor.name, tuple(tensor.dims), tensor.data_type, source.dims, source.data_type))
            found[tensor.name] = tensor
    missing = sorted(set(sources) - set(found))
    if missing:
        raise ValueError("sources name no initializer of the graph: {}".format(", ".join(missing)))
    return sources


def materialize(model, sources):
    """Fill every placeholder of ``model`` that ``sources`` names with its bytes; returns ``model``."""
    sources = check_sources(model, sources)
    for tensor in model.graph.initializer:
        if tensor.name in sources:
            fill(tensor, sources[tensor.name])
    return model


# ---- protobuf framing -------------------------------------------------------------------------------------

#: field numbers (all length-delimited, wire type 2) of the ONNX protobuf messages the framing writes
MODEL_GRAPH_FIELD = 7  # ModelProto.graph
GRAPH_INITIALIZER_FIELD = 5  # GraphProto.initializer
TENSOR_RAW_DATA_FIELD = 9  # TensorProto.raw_data


def varint(value):
    """Protobuf base-128 varint of a non-negative int."""
    value = int(value)
    if value < 0:
        raise ValueError("varint of a negative number")
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def field_key(number):
    """Key of a length-delimited field ``number``."""
    return varint((number << 3) | 2)


def length_delimited(number, length):
    """Key and length prefix of a length-delimited field holding ``length`` bytes."""
    return field_key(number) + varint(length)


def framed_tensor_head(placeholder_tensor, nbytes):
    """The bytes of a TensorProto up to its ``raw_data``: the placeholder's fields, then the raw_data key and
    length. ``nbytes`` raw bytes must follow. Fields may come in any order: parsers merge them."""
    return placeholder_tensor.SerializeToString() + length_delimited(TENSOR_RAW_DATA_FIELD, nbytes)
