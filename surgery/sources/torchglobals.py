"""What a checkpoint's pickle may name when surgery reads it without ``trust_pickle``.

A name -> object allow-list for :func:`~surgery.sources.unpickler.restricted_loads`: what torch's
weights-only loader allows for tensors (storages, dtypes, ``torch.Size``, devices, layouts,
quantization schemes, ``OrderedDict``), ``argparse.Namespace`` (timm saves its arguments), and
numpy arrays, dtypes and scalars (detectron2's raw ``.pkl`` files). Every callable is one of
ours and checks its arguments before torch or numpy sees them: a tensor must lie inside its
storage, which must lie inside its record of the file; sizes and strides are non-negative ints;
numpy object dtypes are refused. Classes a file must not call (``torch.Tensor(10**12)``
allocates) are inert markers. Nothing here imports a module a file names.
"""

from __future__ import annotations

import argparse
import functools
import math
import pickle
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .unpickler import PLAIN_GLOBALS, Forbidden, Refused

try:
    import numpy as np
except ImportError:  # numpy is optional for torch; without it, arrays are refused
    np = None  # type: ignore[assignment]

__all__ = ["Storage", "StorageType", "allowed_globals", "builders", "ndarrays_to_tensors"]

_Bad = pickle.UnpicklingError


class Marker:
    """A global the pickle names only to pass it along (``torch.Tensor`` as a rebuild target,
    ``numpy.ndarray``): not callable, and no state can be set on it."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __setstate__(self, state: Any) -> None:
        raise _Bad(f"the pickle sets the state of {self.name}")

    def __repr__(self) -> str:
        return f"<{self.name}>"


class StorageType(Marker):
    """``torch.FloatStorage`` and friends: which dtype a persistent storage id holds."""

    __slots__ = ("dtype",)

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        super().__init__(name)
        self.dtype = dtype


class Storage:
    """One storage of a torch file: ``untyped`` bytes (a slice of the file's mapping, or a
    copy in memory) and the dtype its persistent id names."""

    __slots__ = ("dtype", "untyped")

    def __init__(self, untyped: torch.UntypedStorage, dtype: torch.dtype) -> None:
        self.untyped = untyped
        self.dtype = dtype

    def __setstate__(self, state: Any) -> None:
        raise _Bad("the pickle sets the state of a storage")


_TENSOR = Marker("torch.Tensor")
_PARAMETER = Marker("torch.nn.parameter.Parameter")
_NDARRAY = Marker("numpy.ndarray")


# --------------------------------------------------------------------------- checks


_HUGE = 1 << 62


def _ints(values: Any, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or len(values) > 64:
        raise _Bad(f"tensor {what} is not a short tuple of ints")
    for v in values:
        if type(v) is not int or not 0 <= v < _HUGE:
            raise _Bad(f"tensor {what} {tuple(values)!r} holds a negative, huge or non-int value")
    return tuple(values)


def _extent(size: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """Elements a strided view spans (0 when it has none)."""
    if len(size) != len(stride):
        raise _Bad(f"tensor size {size} and stride {stride} differ in length")
    extent = 1
    for n, s in zip(size, stride):  # noqa: B905 (lengths checked above)
        if not n:
            return 0
        extent += (n - 1) * s
    return extent


def _check_view(storage: Any, dtype: Any, offset: Any, size: Any, stride: Any) -> tuple:
    if not isinstance(storage, Storage):
        raise _Bad(f"a tensor is rebuilt from {type(storage).__name__}, not a storage")
    if not isinstance(dtype, torch.dtype):
        raise _Bad(f"tensor dtype {dtype!r} is not a torch dtype")
    if type(offset) is not int or not 0 <= offset < 1 << 62:
        raise _Bad(f"tensor storage offset {offset!r} is not a non-negative int")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) > 1 and math.prod(size) >= _HUGE:
        raise _Bad(f"tensor size {size} overflows")
    extent = _extent(size, stride)
    need = (offset + extent) * dtype.itemsize if extent else 0
    if need > storage.untyped.nbytes():
        raise _Bad(
            f"a tensor of size {size}, stride {stride} at element {offset} needs {need} bytes "
            f"of its storage, which holds {storage.untyped.nbytes()}"
        )
    return size, stride


def _stub_in(*args: Any) -> Refused | None:
    """A stand-in among the arguments: the result stands in for a refused global too."""
    for a in args:
        if isinstance(a, Refused):
            return a
        if isinstance(a, tuple):
            for b in a:
                if isinstance(b, Refused):
                    return b
    return None


def _set_state(obj: Tensor, state: Any) -> Tensor:
    """Python attributes saved with a tensor or parameter: plain names only, never one the
    class defines (``data``, ``grad``, ``__class__``...)."""
    if state is None:
        return obj
    dict_state, slots = state if isinstance(state, tuple) and len(state) == 2 else (state, None)
    for part in (dict_state, slots):
        if not part:
            continue
        if not isinstance(part, dict):
            raise _Bad("a tensor's saved attributes are not a dict")
        for k, v in part.items():
            if not isinstance(k, str) or hasattr(type(obj), k):
                raise _Bad(f"a tensor's saved attribute {k!r} is not a plain attribute")
            setattr(obj, k, v)
    return obj


def _finish(t: Tensor, requires_grad: Any, metadata: Any) -> Tensor:
    if requires_grad:
        t.requires_grad_(bool(requires_grad))
    if metadata:
        if not isinstance(metadata, dict) or not set(metadata) <= {"conj", "neg"}:
            raise _Bad(f"tensor metadata {metadata!r} is not conj/neg flags")
        torch._C._set_tensor_metadata(t, {k: bool(v) for k, v in metadata.items()})
    return t


# --------------------------------------------------------------------------- tensors


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: Any) -> Tensor:
    size, stride = _check_view(storage, dtype, offset, size, stride)
    return torch.empty(0, dtype=dtype).set_(storage.untyped, offset, size, stride)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> Any:
    return _stub_in(storage) or _tensor(storage, storage_offset, size, stride, storage.dtype)


def _rebuild_tensor_v2(storage: Any, *args: Any) -> Any:
    """torch's ``(storage, offset, size, stride, requires_grad, hooks[, metadata])``: v3 with
    the storage's dtype. Hooks are never restored (torch no longer saves them; they would be
    calls later)."""
    if len(args) not in (5, 6):
        raise _Bad(f"_rebuild_tensor_v2 takes 6 or 7 arguments, not {len(args) + 1}")
    offset, size, stride, requires_grad, _ = args[:5]
    metadata = args[5] if len(args) == 6 else None
    dtype = storage.dtype if isinstance(storage, Storage) else None
    return _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, None, dtype, metadata)


def _rebuild_tensor_v3(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    dtype: Any,
    metadata: Any = None,
) -> Any:
    if stub := _stub_in(storage, dtype):
        return stub
    t = _tensor(storage, storage_offset, size, stride, dtype)
    return _finish(t, requires_grad, metadata)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> Any:
    if stub := _stub_in(data):
        return stub
    if not isinstance(data, Tensor):
        raise _Bad(f"a parameter is rebuilt from {type(data).__name__}, not a tensor")
    return nn.Parameter(data, bool(requires_grad))


def _rebuild_parameter_with_state(
    data: Any, requires_grad: Any, backward_hooks: Any, state: Any
) -> Any:
    param = _rebuild_parameter(data, requires_grad, backward_hooks)
    return param if isinstance(param, Refused) else _set_state(param, state)


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """A tensor with Python attributes, or a ``Parameter`` saved as such."""
    if stub := _stub_in(func, new_type, args):
        return stub
    if func not in _REBUILDS or new_type not in (_TENSOR, _PARAMETER):
        raise _Bad(f"_rebuild_from_type_v2 of {func!r} into {new_type!r} is not allowed")
    if not isinstance(args, tuple):
        raise _Bad("_rebuild_from_type_v2 arguments are not a tuple")
    ret = func(*args)
    if isinstance(ret, Refused):
        return ret
    if new_type is _PARAMETER and not isinstance(ret, nn.Parameter):
        ret = nn.Parameter(ret, ret.requires_grad)
    elif new_type is _TENSOR and type(ret) is not Tensor:
        ret = ret.as_subclass(Tensor)
    return _set_state(ret, state)


def _rebuild_qtensor(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    quantizer_params: Any,
    requires_grad: Any,
    backward_hooks: Any,
) -> Any:
    if stub := _stub_in(storage, quantizer_params):
        return stub
    size, stride = _check_view(storage, storage.dtype, storage_offset, size, stride)
    if not isinstance(quantizer_params, tuple) or not quantizer_params:
        raise _Bad("quantized tensor parameters are not a tuple")
    typed = torch.storage.TypedStorage(
        wrap_storage=storage.untyped, dtype=storage.dtype, _internal=True
    )
    # torch's own rebuild checks the per-channel axis and the scales' lengths.
    return torch._utils._rebuild_qtensor(
        typed, storage_offset, size, stride, quantizer_params, bool(requires_grad), OrderedDict()
    )


def _rebuild_sparse_tensor(layout: Any, data: Any) -> Any:
    """Sparse tensors with their invariants checked now (indices inside the size)."""
    if stub := _stub_in(layout, data):
        return stub
    parts = (Tensor, tuple, list, bool, type(None))
    if not isinstance(data, tuple) or not all(isinstance(x, parts) for x in data):
        raise _Bad("sparse tensor data is not a tuple of tensors")
    if layout == torch.sparse_coo and len(data) in (3, 4):
        indices, values, size = data[:3]
        coalesced = data[3] if len(data) == 4 else None
        return torch.sparse_coo_tensor(
            indices, values, _ints(size, "size"), check_invariants=True, is_coalesced=coalesced
        )
    if layout in _COMPRESSED and len(data) == 4:
        compressed, plain, values, size = data
        return torch.sparse_compressed_tensor(
            compressed, plain, values, _ints(size, "size"), layout=layout, check_invariants=True
        )
    raise _Bad(f"sparse tensor of layout {layout!r} with {len(data)} parts is not supported")


_COMPRESSED = (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)


def _rebuild_meta_tensor_no_storage(dtype: Any, size: Any, stride: Any, requires_grad: Any) -> Any:
    if stub := _stub_in(dtype):
        return stub
    if not isinstance(dtype, torch.dtype):
        raise _Bad(f"meta tensor dtype {dtype!r} is not a torch dtype")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    _extent(size, stride)
    t = torch.empty_strided(size, stride, dtype=dtype, device="meta")
    return _finish(t, requires_grad, None)


def _rebuild_nested_tensor(buffer: Any, sizes: Any, strides: Any, offsets: Any) -> Any:
    """A nested tensor: every component checked to lie inside its buffer."""
    if stub := _stub_in(buffer, sizes, strides, offsets):
        return stub
    parts = (buffer, sizes, strides, offsets)
    if not all(isinstance(x, Tensor) and x.layout == torch.strided for x in parts):
        raise _Bad("nested tensor parts are not tensors")
    if buffer.dim() != 1 or sizes.dim() != 2 or strides.shape != sizes.shape:
        raise _Bad("nested tensor sizes and strides do not match")
    if offsets.shape != sizes.shape[:1]:
        raise _Bad("nested tensor offsets do not match its sizes")
    for i in range(sizes.shape[0]):
        size = _ints(sizes[i].tolist(), "size")
        stride = _ints(strides[i].tolist(), "stride")
        start = int(offsets[i])
        if start < 0 or start + _extent(size, stride) > buffer.numel():
            raise _Bad(f"nested tensor component {i} lies outside its buffer")
    return torch._nested_view_from_buffer(buffer, sizes, strides, offsets)


def _rebuild_device_tensor_from_cpu_tensor(
    data: Any, dtype: Any, device: Any, requires_grad: Any
) -> Any:
    if stub := _stub_in(data, dtype):
        return stub
    if not isinstance(data, Tensor) or not isinstance(dtype, torch.dtype):
        raise _Bad("a device tensor is not rebuilt from a tensor and a dtype")
    return _finish(data.to(dtype=dtype), requires_grad, None)  # loaded on the CPU


_REBUILDS = frozenset(
    {_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter}
    | {_rebuild_parameter_with_state, _rebuild_qtensor, _rebuild_sparse_tensor}
    | {_rebuild_meta_tensor_no_storage, _rebuild_nested_tensor}
    | {_rebuild_device_tensor_from_cpu_tensor}
)

_LAYOUTS = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}


def _get_layout(name: Any) -> torch.layout:
    if name not in _LAYOUTS:
        raise _Bad(f"unknown tensor layout {name!r}")
    return _LAYOUTS[name]


# --------------------------------------------------------------------------- numpy

_NUMPY_KINDS = "biufcSU"  # bool, ints, floats, complex, byte and unicode strings


def _np_dtype(spec: Any, align: Any = False, copy: Any = True) -> Any:
    """``numpy.dtype(spec)`` for plain numeric or string specs; always a private copy, so a
    later ``BUILD`` cannot change numpy's shared ``float32``."""
    if not isinstance(spec, str) or len(spec) > 16:
        raise _Bad(f"numpy dtype {spec!r} is not a plain type name")
    dt = np.dtype(spec, align=bool(align), copy=True)
    _check_np_dtype(dt)
    return dt


def _check_np_dtype(dt: Any) -> None:
    if not isinstance(dt, np.dtype):
        raise _Bad(f"numpy dtype {dt!r} is not a dtype")
    if dt.hasobject:
        raise Forbidden(
            "holds numpy arrays of dtype object, whose items are arbitrary pickled objects; "
            "safe loading reads numeric and string arrays only"
        )
    if dt.kind not in _NUMPY_KINDS:
        raise _Bad(f"numpy dtype {dt} is not read (only numeric and string arrays are)")


def _build_np_dtype(dt: Any, state: Any) -> None:
    """A dtype's pickled state may only choose its byte order."""
    current = dt.__reduce__()[2]
    ok = (
        isinstance(state, tuple)
        and len(state) == len(current)
        and state[0] == current[0]
        and state[1] in ("<", ">", "|", "=")
        and state[2:] == current[2:]
    )
    if not ok:
        raise _Bad(f"numpy dtype state {state!r} is not a plain type's")
    dt.__setstate__(state)


def _np_reconstruct(subtype: Any, shape: Any, dtype: Any) -> Any:
    if subtype is not _NDARRAY or shape != (0,) or dtype not in (b"b", "b"):
        raise _Bad("numpy _reconstruct is only allowed as numpy pickles an array")
    return np.ndarray((0,), "b")


def _build_ndarray(arr: Any, state: Any) -> None:
    """An array's data: a numeric dtype and exactly the bytes its shape needs."""
    if not isinstance(state, tuple) or len(state) != 5:
        raise _Bad("numpy array state is not (version, shape, dtype, fortran, data)")
    _, shape, dt, _, data = state
    _check_np_dtype(dt)
    shape = _ints(shape, "shape")
    if isinstance(data, str):  # a Python 2 pickle read with encoding='latin1'
        data = data.encode("latin1")
    if not isinstance(data, (bytes, bytearray)) or len(data) != math.prod(shape) * dt.itemsize:
        raise _Bad(f"numpy array data does not hold {shape} x {dt}")
    arr.__setstate__((state[0], shape, dt, bool(state[3]), data))


def _np_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> Any:
    _check_np_dtype(dtype)
    shape = _ints(shape, "shape")
    if not isinstance(buf, (bytes, bytearray)) or len(buf) != math.prod(shape) * dtype.itemsize:
        raise _Bad(f"numpy buffer does not hold {shape} x {dtype}")
    if order not in ("C", "F"):
        raise _Bad(f"numpy array order {order!r}")
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)


def _np_scalar(dtype: Any, data: Any = None) -> Any:
    _check_np_dtype(dtype)
    if isinstance(data, str):
        data = data.encode("latin1")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise _Bad(f"numpy scalar data does not hold one {dtype}")
    return np.frombuffer(data, dtype=dtype)[0]


def _numpy_globals() -> dict[str, Any]:
    if np is None:
        return {}
    out: dict[str, Any] = {"numpy.ndarray": _NDARRAY, "numpy.dtype": _np_dtype}
    for core in ("numpy.core", "numpy._core"):
        out[f"{core}.multiarray._reconstruct"] = _np_reconstruct
        out[f"{core}.multiarray.scalar"] = _np_scalar
        out[f"{core}.numeric._frombuffer"] = _np_frombuffer
    return out


# --------------------------------------------------------------------------- the list


@functools.lru_cache(maxsize=1)
def _torch_globals() -> Mapping[str, Any]:
    out: dict[str, Any] = dict(PLAIN_GLOBALS)
    out["argparse.Namespace"] = argparse.Namespace  # timm's train.py saves its arguments
    out["torch.Size"] = torch.Size
    out["torch.device"] = torch.device
    out["torch.Tensor"] = _TENSOR
    out["torch.nn.parameter.Parameter"] = _PARAMETER
    out["torch.serialization._get_layout"] = _get_layout
    out["torch._tensor._rebuild_from_type_v2"] = _rebuild_from_type_v2
    for f in _REBUILDS:
        out[f"torch._utils.{f.__name__}"] = f
    for name, value in vars(torch).items():
        if isinstance(value, (torch.dtype, torch.layout, torch.qscheme, torch.memory_format)):
            out[f"torch.{name}"] = value
    for dtype, name in torch.storage._dtype_to_storage_type_map().items():
        for module in ("torch", "torch.cuda"):
            out[f"{module}.{name}"] = StorageType(f"{module}.{name}", dtype)
    for name in ("torch.UntypedStorage", "torch.storage.UntypedStorage", "torch.ByteStorage"):
        out[name] = StorageType(name, torch.uint8)
    out.update(_numpy_globals())
    return out


def allowed_globals(extra: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    """The allow-list for a torch file or a raw pickle, with a user's ``allow_globals``."""
    base = _torch_globals()
    return {**base, **extra} if extra else base


def builders() -> dict[type, Callable[[Any, Any], None]]:
    """How ``BUILD`` may set state on numpy dtypes and arrays (checked first)."""
    if np is None:
        return {}
    return {np.dtype: _build_np_dtype, np.ndarray: _build_ndarray}


def ndarrays_to_tensors(obj: Any) -> Any:
    """Numpy arrays inside dicts and lists replaced by tensors, in place (detectron2's raw
    pickles hold ``{"model": {name: ndarray}}``); arrays torch cannot hold stay arrays."""
    if np is None:
        return obj
    if isinstance(obj, np.ndarray):
        return _as_tensor(obj)
    todo, seen = [obj], set()
    while todo:
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, dict):
            keys = x.keys()
        elif isinstance(x, list):
            keys = range(len(x))
        else:
            continue
        for k in keys:
            v = x[k]
            if isinstance(v, np.ndarray):
                x[k] = _as_tensor(v)
            elif isinstance(v, (dict, list)):
                todo.append(v)
    return obj


def _as_tensor(arr: Any) -> Any:
    if arr.dtype.kind not in "biufc":
        return arr
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if not arr.flags.writeable:
        arr = arr.copy()
    try:
        return torch.from_numpy(arr)
    except TypeError:  # a dtype torch lacks
        return arr
