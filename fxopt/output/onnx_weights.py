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
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

from fxopt.errors import ExportError, WeightsChangedError
from fxopt.verification.numerics import tensor_mark

__all__ = [
    "EXTERNAL_MIN_BYTES", "WeightStore", "alias", "chunks", "WeightsChangedError", "checked", "full_model", "full_tensor", "is_lean",
    "FedSession", "is_stored", "serialize", "session", "storable", "stores", "tensor_values",
]

EXTERNAL_MIN_BYTES = 1024  # a smaller weight is written into the model itself (as onnx.save's size threshold)
PREFIX = "fxopt-weights-"
_ALIGN = 4096  # offsets in the placeholder (and in a data file written from it) start on a page
_STORES: weakref.WeakValueDictionary[str, WeightStore] = weakref.WeakValueDictionary()


def storable(tensor: torch.Tensor) -> bool:
    """Whether `tensor` can be stored: a dense CPU tensor of a dtype numpy and ONNX share."""
    if tensor.layout != torch.strided or tensor.device.type != "cpu" or tensor.is_quantized or tensor.is_complex():
        return False
    return tensor.dtype in _ONNX_TYPES


_ONNX_TYPES = {
    torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.float64: TensorProto.DOUBLE,
    torch.int8: TensorProto.INT8, torch.uint8: TensorProto.UINT8, torch.int16: TensorProto.INT16,
    torch.int32: TensorProto.INT32, torch.int64: TensorProto.INT64, torch.bool: TensorProto.BOOL,
}


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
        self._tensors: dict[int, tuple[str, torch.Tensor, Any]] = {}
        _STORES[self.location] = self

    def __deepcopy__(self, memo: dict[int, Any]) -> WeightStore:
        return self

    def __len__(self) -> int:
        return len(self._arrays)

    def add(self, name: str, tensor: torch.Tensor) -> TensorProto:
        """A `TensorProto` named `name` that refers to `tensor` (kept, not copied; see `storable`)."""
        if not storable(tensor):
            raise ExportError(f"weight '{name}' ({tensor.dtype}, {tensor.layout}, {tensor.device}) cannot be kept outside the ONNX model")
        tensor = tensor.detach()
        array = tensor.contiguous().numpy()  # a view of `tensor` itself when it is contiguous
        offset = self.size
        self._arrays[offset], self._types[offset] = array, _ONNX_TYPES[tensor.dtype]
        self._tensors[offset] = (name, tensor, tensor_mark(tensor))
        self.size = offset + -(-max(array.nbytes, 1) // _ALIGN) * _ALIGN
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

    def arrays(self) -> Iterator[tuple[int, np.ndarray]]:
        for offset in self._arrays:
            yield offset, self.array(offset)


def _offset(tensor: TensorProto) -> int:
    return int(next(e.value for e in tensor.external_data if e.key == "offset"))


def _store_of(tensor: TensorProto) -> WeightStore | None:
    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    location = next((e.value for e in tensor.external_data if e.key == "location"), "")
    if not location.startswith(PREFIX):
        return None
    store = _STORES.get(location)
    if store is None:
        raise ExportError(f"ONNX initializer '{tensor.name}' refers to weights ({location}) that are no longer held; "
                          "keep the exported model's OnnxExport (or CompiledModel) alive while the model is used")
    return store


def is_stored(tensor: TensorProto) -> bool:
    """Whether `tensor` refers to a `WeightStore`'s array."""
    return tensor.data_location == TensorProto.EXTERNAL and any(
        e.key == "location" and e.value.startswith(PREFIX) for e in tensor.external_data)


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


def full_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A self-contained copy of a lean `model` (`model` itself when it is not lean)."""
    if not is_lean(model):
        return model
    full = onnx.ModelProto()
    full.CopyFrom(model)  # no weight bytes to copy yet
    for graph, index, tensor in list(_stored(full)):
        graph.initializer[index].CopyFrom(full_tensor(tensor))
    return full


def chunks(model: onnx.ModelProto) -> Iterator[bytes]:
    """The bytes of `model`'s self-contained file (lean or not), in pieces of at most one weight each.

    A lean model is written as its weightless part followed by one message per stored weight:
    protobuf merges repeated messages of a field, so every reader parses the concatenation as one
    model, and only one weight at a time is copied (`serialize` joins them; `CompiledModel.save`
    writes them one by one).
    """
    if not is_lean(model):
        yield model.SerializeToString()
        return
    if any(graph is not model.graph for graph, _, _ in _stored(model)):
        yield full_model(model).SerializeToString()  # a subgraph's initializer: no field to append it to
        return
    rest = onnx.ModelProto()
    rest.CopyFrom(model)
    stored = [t for t in rest.graph.initializer if is_stored(t)]
    kept = [t for t in rest.graph.initializer if not is_stored(t)]
    del rest.graph.initializer[:]
    rest.graph.initializer.extend(kept)
    for tensor in stored:
        tensor_values(tensor)  # a weight changed since the export fails here, before any byte is written
    yield rest.SerializeToString()
    for tensor in stored:
        yield onnx.ModelProto(graph=onnx.GraphProto(initializer=[full_tensor(tensor)])).SerializeToString()


def serialize(model: onnx.ModelProto) -> bytes:
    """The bytes of `model`'s self-contained file (`chunks` joined)."""
    return b"".join(chunks(model))


@contextlib.contextmanager
def checked_path(model: onnx.ModelProto) -> Iterator[str]:
    """A lean `model` written (weightless) to a temporary folder beside a sparse placeholder file of
    each store's size, so a reader that checks external data finds them; yields the model's path."""
    with tempfile.TemporaryDirectory(prefix="fxopt-onnx-") as folder:
        sizes: dict[str, int] = {}
        for _, _, tensor in _stored(model):
            store = _store_of(tensor)
            assert store is not None
            sizes[store.location] = store.size
        for location, size in sizes.items():
            with open(os.path.join(folder, location), "wb") as f:
                f.truncate(size)
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
    if any(graph is not model.graph for graph, _, _ in _stored(model)):
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
