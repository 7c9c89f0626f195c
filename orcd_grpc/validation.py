"""Pre-load validation of a GGUF model against its adapter, before any memory is committed.

Checks, in order, each failure an InvalidArgument that names the tensor:
1. every tensor's storage type is one orcd supports (quants.SUPPORTED);
2. every tensor the adapter requires is present, with the logical shape the metadata implies;
3. every tensor's byte size agrees with its shape and type (a truncated or inconsistent tensor
   table would otherwise surface as a reshape error deep inside loading).
"""
from __future__ import annotations

from . import quants
from .errors import InvalidArgument
from .gguf_model import GGUFModel


def validate_model(model: GGUFModel, adapter) -> None:
    for t in model.reader.tensors:
        quants.check_supported(t.tensor_type, t.name)
    for name, shape in adapter.required().items():
        if not model.has(name):
            raise InvalidArgument(f"required tensor {name!r} is missing from the file", field=name)
        got = GGUFModel.logical_shape(model.tensor(name))
        if len(got) != len(shape) or any(s is not None and g != int(s) for g, s in zip(got, shape)):
            raise InvalidArgument(f"tensor {name!r} has shape {got}, but the metadata implies {tuple(shape)}",
                                  field=name)
    for t in model.reader.tensors:
        shape = GGUFModel.logical_shape(t)
        try:
            expect = quants.nbytes(t.tensor_type, shape)
        except InvalidArgument as exc:
            raise InvalidArgument(f"tensor {t.name!r}: {exc}", field=t.name) from None
        if int(t.n_bytes) != expect:
            raise InvalidArgument(f"tensor {t.name!r} holds {int(t.n_bytes)} bytes, its shape {shape} as "
                                  f"{quants.qtype_name(t.tensor_type)} needs {expect}", field=t.name)
