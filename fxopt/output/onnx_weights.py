"""ONNX models whose large weights stay in torch until the file is written ("lean" models).

A large model exported the usual way holds every weight three or four times at once: torch's
tensors, the exporter's protobuf, its serialised bytes and the parse of them, then a copy in each of
the clean-up, the checker and ONNX Runtime. A lean model's initializers of `EXTERNAL_MIN_BYTES` or
more are ONNX external-data references (``location`` ``fxopt-weights-<token>``) into a `WeightStore`,
which holds numpy views of the torch tensors themselves, no copy:

- `tensor_values` reads an initializer's values from either kind of model;
- `session` feeds ONNX Runtime the stored arrays as inputs (read in place, no copy);
- `checked` runs `onnx.checker` on the model beside a sparse placeholder file (no bytes);
- `full_model` and `serialize` build the self-contained model or its bytes (one weight copied at a
  time into the result), for a file or a reader that needs one.

A stored array is a view of a tensor of the compiled graph: a write into that tensor after export
would change the file under its verified figures, so every read checks the tensor's mark
(`fxopt.verification.numerics.tensor_mark`) and raises `WeightsChangedError` instead.

Example:
    >>> import torch
    >>> store = WeightStore()
    >>> proto = store.add("w", torch.arange(512, dtype=torch.float32))
    >>> is_stored(proto), tensor_values(proto)[:3].tolist()
    (True, [0.0, 1.0, 2.0])
    >>> full = full_tensor(proto)
    >>> is_stored(full), len(full.raw_data)
    (False, 2048)
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
import weakref
from collections.abc import Iterable, Iterator, MutableMapping
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

from fxopt.errors import ExportError, WeightsChangedError
from fxopt.verification.numerics import tensor_mark

__all__ = [
    "EXTERNAL_MIN_BYTES", "PROTOBUF_LIMIT", "WeightStore", "alias", "chunks", "external_data", "file_size", "WeightsChangedError", "checked", "full_model", "full_tensor", "is_lean",
    "FedSession", "InitializerValues", "is_stored", "serialize", "session", "storable", "stores", "tensor_values", "written",
]

EXTERNAL_MIN_BYTES = 1024  # a smaller weight is written into the model itself (as onnx.save's size threshold)
PREFIX = "fxopt-weights-"
_ALIGN = 4096  # offsets in the placeholder (and in a data file written from it) start on a page
_STORES: weakref.WeakValueDictionary[str, WeightStore] = weakref.WeakValueDictionary()


_ONNX_TYPES = {
    torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.float64: TensorProto.DOUBLE,
    torch.int8: TensorProto.INT8, torch.uint8: TensorProto.UINT8, torch.int16: TensorProto.INT16,
    torch.int32: TensorProto.INT32, torch.int64: TensorProto.INT64, torch.bool: TensorProto.BOOL,
}


def storable(tensor: torch.Tensor) -> bool:
    """Whether `tensor` can be stored: a dense CPU tensor of a dtype numpy and ONNX share."""
    if tensor.layout != torch.strided or tensor.device.type != "cpu" or tensor.is_quantized or tensor.is_complex():
        return False
    return tensor.dtype in _ONNX_TYPES


def _aligned(nbytes: int) -> int:
    """`nbytes` rounded up to whole pages (at least one): the room an array takes in a data file."""
    return -(-max(nbytes, 1) // _ALIGN) * _ALIGN


class WeightStore:
    """Numpy views of torch tensors that a lean model's initializers refer to, by offset.

    Offsets are those a data file of all the arrays, each on a page, would have (`size`); an alias
    (`alias`) shares its source's offset. A store is shared, never copied (`copy.deepcopy` returns it).
    """

    def __init__(self) -> None:
        self.location = f"{PREFIX}{uuid.uuid4().hex}"
        self.size = 0
        self._arrays: dict[int, np.ndarray] = {}
        self._types: dict[int, int] = {}
        self._sources: list[tuple[str, torch.Tensor, Any]] = []
        self._tensors: dict[int, tuple[str, torch.Tensor, Any]] = {}
        _STORES[self.location] = self

    def __deepcopy__(self, memo: dict[int, Any]) -> WeightStore:
        return self

    def add(self, name: str, tensor: torch.Tensor) -> TensorProto:
        """A `TensorProto` named `name` that refers to `tensor` (kept, not copied; see `storable`)."""
        if not storable(tensor):
            raise ExportError(f"weight '{name}' ({tensor.dtype}, {tensor.layout}, {tensor.device}) cannot be kept outside the ONNX model")
        tensor = tensor.detach()
        array = tensor.contiguous().numpy()  # a view of `tensor` itself when it is contiguous
        offset = self.size
        self._arrays[offset], self._types[offset] = array, _ONNX_TYPES[tensor.dtype]
        self._tensors[offset] = (name, tensor, tensor_mark(tensor))
        self.size = offset + _aligned(array.nbytes)
        return self._proto(name, offset)

    def alias(self, name: str, source: TensorProto) -> TensorProto:
        """A second `TensorProto`, named `name`, of the array `source` (one of this store's) refers to."""
        return self._proto(name, _offset(source))

    def _proto(self, name: str, offset: int) -> TensorProto:
        array = self._arrays[offset]
        proto = TensorProto(name=name, data_type=self._types[offset], dims=array.shape, data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(array.nbytes))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        return proto

    def array(self, offset: int) -> np.ndarray:
        """The array at `offset`, read-only; raises `WeightsChangedError` if its tensor was written since."""
        name, tensor, mark = self._tensors[offset]
        if tensor_mark(tensor) != mark:
            raise WeightsChangedError(
                f"the weight behind ONNX initializer '{name}' was changed in place after the model was exported; "
                "the ONNX model no longer matches its verified figures: compile again to export the changed weights"
            )
        view = self._arrays[offset].view()
        view.flags.writeable = False
        return view

    def track(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Also watch `tensors` (the exported module's own weights, by name): a weight the exporter folded is a new
        tensor computed from them, which a write into them does not change."""
        self._sources += [(name, t, tensor_mark(t)) for name, t in tensors if isinstance(t, torch.Tensor)]

    def verify(self) -> None:
        """Raise `WeightsChangedError` if any tensor behind this store was written since the export."""
        for offset in self._tensors:
            self.array(offset)
        for name, tensor, mark in self._sources:
            if tensor_mark(tensor) != mark:
                raise WeightsChangedError(
                    f"the exported module's weight '{name}' was changed in place after the model was exported; the ONNX model "
                    "(whose weights were computed from it) no longer matches its verified figures: compile again to export the "
                    "changed weights")


def _entry(tensor: TensorProto, key: str) -> str:
    """An external-data entry of `tensor` ("location", "offset", "length"); '' if it has none."""
    return next((e.value for e in tensor.external_data if e.key == key), "")


def _offset(tensor: TensorProto) -> int:
    return int(_entry(tensor, "offset"))


def _store_of(tensor: TensorProto) -> WeightStore | None:
    if not is_stored(tensor):
        return None
    location = _entry(tensor, "location")
    store = _STORES.get(location)
    if store is None:
        raise ExportError(f"ONNX initializer '{tensor.name}' refers to weights ({location}) that are no longer held; "
                          "keep the exported model's OnnxExport (or CompiledModel) alive while the model is used")
    return store


def is_stored(tensor: TensorProto) -> bool:
    """Whether `tensor` refers to a `WeightStore`'s array."""
    return tensor.data_location == TensorProto.EXTERNAL and _entry(tensor, "location").startswith(PREFIX)


def alias(tensor: TensorProto, name: str) -> TensorProto:
    """A second reference, named `name`, to the stored array `tensor` refers to."""
    store = _store_of(tensor)
    if store is None:
        raise ValueError(f"initializer '{tensor.name}' is not a stored weight")
    return store.alias(name, tensor)


def tensor_values(tensor: TensorProto) -> np.ndarray:
    """`tensor`'s values, stored (a read-only view, no copy) or in the proto (`numpy_helper.to_array`)."""
    store = _store_of(tensor)
    if store is None:
        return numpy_helper.to_array(tensor)
    return store.array(_offset(tensor))


class InitializerValues(MutableMapping[str, Any]):
    """The values of `graph`'s initializers by name, each read (`tensor_values`) on its first lookup: a
    check that needs a few weights' values, or only their shapes, converts no other. Entries can be added
    (a Constant node's value).

    Example:
        >>> from onnx import helper
        >>> g = helper.make_graph([], "g", [], [], [numpy_helper.from_array(np.ones(2, np.float32), "w")])
        >>> values = InitializerValues(g)
        >>> "w" in values, values["w"].tolist(), values.get("b")
        (True, [1.0, 1.0], None)
    """

    def __init__(self, graph: onnx.GraphProto) -> None:
        self._protos = {t.name: t for t in graph.initializer}
        self._values: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._values:
            self._values[name] = tensor_values(self._protos[name])
        return self._values[name]

    def shape(self, name: str) -> list[int]:
        """The shape of `name`'s values, read from the initializer's dims where it is one (no values read)."""
        proto = self._protos.get(name)
        return list(proto.dims) if proto is not None and name not in self._values else list(self[name].shape)

    def __setitem__(self, name: str, value: Any) -> None:
        self._values[name] = value

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        self._protos.pop(name, None)
        self._values.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._values or name in self._protos

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys([*self._protos, *self._values]))

    def __len__(self) -> int:
        return len(self._protos.keys() | self._values.keys())


def full_tensor(tensor: TensorProto) -> TensorProto:
    """`tensor` with its values in the proto (itself if they are)."""
    if not is_stored(tensor):
        return tensor
    return numpy_helper.from_array(np.ascontiguousarray(tensor_values(tensor)), tensor.name)


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for g in attribute.graphs:
                    yield from _graphs(g)


def _stored(model: onnx.ModelProto) -> Iterator[tuple[onnx.GraphProto, int, TensorProto]]:
    for graph in _graphs(model.graph):
        for index, tensor in enumerate(graph.initializer):
            if is_stored(tensor):
                yield graph, index, tensor


def stores(model: onnx.ModelProto) -> list[WeightStore]:
    """The stores `model`'s initializers refer to: whoever keeps a lean model keeps these (they are
    otherwise held weakly, and a model whose store is gone cannot be read)."""
    found: dict[str, WeightStore] = {}
    for _, _, tensor in _stored(model):
        store = _store_of(tensor)
        assert store is not None
        found[store.location] = store
    return list(found.values())


def is_lean(model: onnx.ModelProto) -> bool:
    """Whether any initializer of `model` (or of a subgraph) refers to a `WeightStore`."""
    return any(True for _ in _stored(model))


def _verified(model: onnx.ModelProto) -> bool:
    """Raise `WeightsChangedError` if a tensor behind `model`'s weights was written since the export; True when a
    stored weight sits in a subgraph's initializers (then the model is only ever built whole)."""
    for store in stores(model):
        store.verify()
    return any(graph is not model.graph for graph, _, _ in _stored(model))


def _raw(tensor: TensorProto) -> memoryview:
    """A stored weight's bytes: a view of its array, no copy."""
    values = np.ascontiguousarray(tensor_values(tensor))
    return memoryview(values.reshape(-1)).cast("B") if values.size else memoryview(b"")


def full_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A self-contained copy of a lean `model` (`model` itself when it is not lean)."""
    if not is_lean(model):
        return model
    _verified(model)
    full = onnx.ModelProto()
    full.CopyFrom(model)  # no weight bytes to copy yet
    for graph, index, tensor in list(_stored(full)):
        graph.initializer[index].CopyFrom(full_tensor(tensor))
    return full


PROTOBUF_LIMIT = 2**31 - 1  # no protobuf reader parses a message larger: such a model is saved with external data


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(number: int, length: int) -> bytes:
    return _varint(number << 3 | 2) + _varint(length)  # a length-delimited field's tag and length


def _fields(message: Any, keep: Any) -> bytes:
    """`message` serialised with only the fields whose number `keep` accepts (in field order, as protobuf writes)."""
    part = type(message)()
    for descriptor, value in message.ListFields():
        if not keep(descriptor.number):
            continue
        if descriptor.is_repeated:
            getattr(part, descriptor.name).extend(value)
        elif descriptor.message_type is not None:
            getattr(part, descriptor.name).CopyFrom(value)
        else:
            setattr(part, descriptor.name, value)
    return part.SerializeToString()


_GRAPH_FIELD, _INITIALIZER_FIELD, _RAW_DATA_FIELD = 7, 5, 9  # ModelProto.graph, GraphProto.initializer, TensorProto.raw_data


def _initializer_parts(tensor: TensorProto) -> list[Any]:
    """One initializer as GraphProto field bytes: a stored one's values as a view of its array (no copy)."""
    if not is_stored(tensor):
        data = tensor.SerializeToString()
        return [_key(_INITIALIZER_FIELD, len(data)), data]
    head = TensorProto(dims=tensor.dims, data_type=tensor.data_type, name=tensor.name).SerializeToString()  # fields 1, 2, 8
    raw = _raw(tensor)
    body = head + _key(_RAW_DATA_FIELD, raw.nbytes)
    return [_key(_INITIALIZER_FIELD, len(body) + raw.nbytes), body, raw]


def chunks(model: onnx.ModelProto) -> Iterator[Any]:
    """The bytes of `model`'s self-contained file (lean or not), in pieces: a stored weight's values are
    a view of its array, so nothing but one small header at a time is built beside the model.

    The pieces are the serialisation protobuf itself gives the full model (fields in order, each
    weight's TensorProto as `numpy_helper.from_array` writes it): the file is byte for byte the
    usual one. `serialize` joins them; `CompiledModel.save` writes and hashes them one by one.

    Raises:
        ExportError: the file would exceed protobuf's 2 GiB (`PROTOBUF_LIMIT`; `external_data` writes it).
        WeightsChangedError: a tensor behind a stored weight was written since the export.
    """
    if not is_lean(model):
        yield model.SerializeToString()
        return
    if _verified(model):
        yield full_model(model).SerializeToString()  # a subgraph's initializer: built whole
        return
    graph = model.graph
    initializers = [_initializer_parts(t) for t in graph.initializer]  # checks every weight before a byte is written
    before, after = _fields(graph, lambda n: n < _INITIALIZER_FIELD), _fields(graph, lambda n: n > _INITIALIZER_FIELD)
    graph_size = len(before) + len(after) + sum(len(p) if isinstance(p, bytes) else p.nbytes for parts in initializers for p in parts)
    head, tail = _fields(model, lambda n: n < _GRAPH_FIELD), _fields(model, lambda n: n > _GRAPH_FIELD)
    key = _key(_GRAPH_FIELD, graph_size)
    if len(head) + len(key) + graph_size + len(tail) > PROTOBUF_LIMIT:
        raise ExportError(f"the ONNX model with its weights is {(graph_size + len(head) + len(tail)) / 2**30:.2f} GiB, above protobuf's "
                          "2 GiB: it can only be written with its weights in a data file beside it (CompiledModel.save does so)")
    yield head + key + before
    for parts in initializers:
        yield from parts
    yield after + tail


def file_size(model: onnx.ModelProto) -> int:
    """The size in bytes of `model`'s self-contained file (`chunks`), without building it."""
    if not is_lean(model):
        return model.ByteSize()
    return model.ByteSize() + sum(int(_entry(t, "length")) + 16 for _, _, t in _stored(model))  # 16: more than the tags and lengths


def external_data(model: onnx.ModelProto, data_name: str) -> tuple[bytes, Iterator[Any]]:
    """`model` as a file of ONNX external data: the model's bytes, each stored weight a reference into `data_name`
    (a file beside it, as `onnx.save(..., save_as_external_data=True)` writes: relative location, offsets on a page),
    and the data file's pieces (views of the arrays, zero padding between them).

    For a model above protobuf's 2 GiB; onnx, ONNX Runtime and TensorRT's parser read the pair from the model's path."""
    _verified(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    places: dict[tuple[str, int], int] = {}  # (store, offset) -> offset in the data file; an alias shares its source's
    pieces: list[tuple[int, TensorProto]] = []
    size = 0
    for _, _, tensor in _stored(out):
        key = (_entry(tensor, "location"), _offset(tensor))
        if key not in places:
            places[key] = size
            pieces.append((size, TensorProto()))
            pieces[-1][1].CopyFrom(tensor)  # still referring to its store, for its values
            size += _aligned(int(_entry(tensor, "length")))
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = data_name
            elif entry.key == "offset":
                entry.value = str(places[key])

    def data() -> Iterator[Any]:
        written = 0
        for offset, tensor in pieces:
            if offset > written:
                yield bytes(offset - written)
            raw = _raw(tensor)
            yield raw
            written = offset + raw.nbytes

    return out.SerializeToString(), data()


def serialize(model: onnx.ModelProto) -> bytes:
    """The bytes of `model`'s self-contained file (`chunks` joined)."""
    return b"".join(chunks(model))


@contextlib.contextmanager
def written(model: onnx.ModelProto) -> Iterator[str]:
    """`model`'s self-contained file in a temporary folder, written piece by piece (`chunks`); yields its path. For a
    reader that would otherwise hold its own parse of the bytes beside them (ONNX Runtime, the checker, a child
    process): one more copy of every weight at once."""
    with tempfile.TemporaryDirectory(prefix="fxopt-onnx-") as folder:
        path = os.path.join(folder, "model.onnx")
        with open(path, "wb") as f:
            for piece in chunks(model):
                f.write(piece)
        yield path


@contextlib.contextmanager
def checked_path(model: onnx.ModelProto) -> Iterator[str]:
    """A lean `model` written (weightless) to a temporary folder beside a sparse placeholder file of
    each store's size, so a reader that checks external data finds them; yields the model's path."""
    with tempfile.TemporaryDirectory(prefix="fxopt-onnx-") as folder:
        for store in stores(model):
            with open(os.path.join(folder, store.location), "wb") as f:
                f.truncate(store.size)
        path = os.path.join(folder, "model.onnx")
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
        yield path


def checked(model: onnx.ModelProto) -> None:
    """`onnx.checker.check_model(full_check=True)` of a lean model (shapes and types; the stored
    arrays' sizes are their tensors', so only the proto is checked)."""
    with checked_path(model) as path:
        onnx.checker.check_model(path, full_check=True)


def session(model: onnx.ModelProto, options: Any = None, providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> Any:
    """An ONNX Runtime session of `model`. A lean model's stored weights become inputs of the session's copy of it,
    fed with the stored arrays on every run (`FedSession`): ONNX Runtime reads an input in place, while it copies
    an initializer into memory of its own, even one given as an external initializer (measured: ONNX Runtime 1.32).
    The weights being inputs, the session does no weight-dependent rewrite (prepacking, layout changes): the same
    graph, run without those optimisations."""
    import onnxruntime as ort

    options = options if options is not None else ort.SessionOptions()
    if not is_lean(model):
        return ort.InferenceSession(model.SerializeToString(), options, providers=list(providers))
    if _verified(model):  # a weight in a subgraph: no input to feed it through
        return ort.InferenceSession(serialize(model), options, providers=list(providers))
    fed = onnx.ModelProto()
    fed.CopyFrom(model)
    weights = [t for t in fed.graph.initializer if is_stored(t)]
    kept = [t for t in fed.graph.initializer if not is_stored(t)]
    for tensor in weights:
        fed.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    del fed.graph.initializer[:]
    fed.graph.initializer.extend(kept)
    return FedSession(ort.InferenceSession(fed.SerializeToString(), options, providers=list(providers)), weights)


class FedSession:
    """An ONNX Runtime session whose weight inputs are fed from a store on every run (see `session`); it shows the
    model's own inputs only."""

    def __init__(self, inner: Any, weights: list[TensorProto]) -> None:
        self._inner = inner
        self._feed = {t.name: tensor_values(t) for t in weights}  # checked once: a session lives for one verification
        names = set(self._feed)
        self._inputs = [i for i in inner.get_inputs() if i.name not in names]

    def get_inputs(self) -> list[Any]:
        return list(self._inputs)

    def run(self, output_names: Any, feed: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        return self._inner.run(output_names, {**feed, **self._feed}, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
