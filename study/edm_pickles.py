"""The public EDM and EDM2 network pickles, read without running any of their code.

The checkpoints of EDM (``edm-cifar10-32x32-*.pkl``) and EDM2 (``edm2-img512-*.pkl``) are Python pickles written with
their ``torch_utils.persistence``: every network object is stored as a call of
``torch_utils.persistence._reconstruct_persistent_obj(meta)``, where ``meta`` holds the class name, the object's
state (its ``__dict__``: parameters, buffers, submodules, constructor arguments) and the *source code* of the
class's module, which the original loader ``exec``s. An ordinary ``pickle.load`` of such a file (or a tampered one)
runs arbitrary code.

:class:`SafeUnpickler` resolves only the globals that rebuild tensors and plain containers, and replaces the
persistence hook and the classes of network modules with inert records (:class:`Record`): the source code is kept
as its sha256, never executed; any other global (``os.system``, ``builtins.eval``, …) stops the read with
:class:`pickle.UnpicklingError` before anything is called. Storages are read with ``torch.load(weights_only=True)``.
:func:`read_network` then returns one network's state dictionary (the same keys ``module.state_dict()`` would give)
and its constructor arguments, which the network classes of this project rebuild (the EDM/EDM2 architectures are
in the presets' work; until then, the converted tensors and arguments are written as a safetensors file).
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from study.errors import StageError
from study.files import atomic_replace_file


class Record:
    """An object the pickle described, kept as data: its class name and its state; nothing of its code runs."""

    kind = "object"
    class_name = ""  # class attributes too: pickle's NEWOBJ creates records with __new__ alone
    module_src_sha256 = ""

    def __init__(self, class_name: str = "", state: dict | None = None, module_src_sha256: str = ""):
        self.class_name, self.state, self.module_src_sha256 = class_name, state or {}, module_src_sha256

    @property
    def state(self) -> dict:
        return self.__dict__.setdefault("_state", {})

    @state.setter
    def state(self, value: dict) -> None:
        self.__dict__["_state"] = value

    def __setstate__(self, state: Any) -> None:  # pickle's BUILD of a plain (non-persistent) object
        self.state = dict(state) if isinstance(state, dict) else {"state": state}


class EasyDict(dict):
    """``dnnlib.EasyDict`` (a dict with attribute access) as a plain dict."""


def _reconstruct_persistent_obj(meta: dict) -> Record:
    """The persistence hook: keep the class name, the state and the hash of the module source (never executed)."""
    meta = dict(meta)
    src = meta.get("module_src", "")
    src_hash = hashlib.sha256(src.encode() if isinstance(src, str) else bytes(src)).hexdigest()
    return Record(str(meta.get("class_name", "")), dict(meta.get("state") or {}), src_hash)


def _load_storage(data: bytes) -> Any:
    """A storage the pickle holds as ``torch.save`` bytes, loaded with the weights-only unpickler."""
    return torch.load(io.BytesIO(data), weights_only=True)


def _reconstructor(cls: type, base: type, state: Any) -> Any:
    """``copyreg._reconstructor`` restricted to the inert classes :meth:`SafeUnpickler.find_class` hands out."""
    if base is object:
        return object.__new__(cls)
    if base is dict and issubclass(cls, dict):
        return cls(state or {})
    raise pickle.UnpicklingError(f"refused object construction {cls.__name__}({base.__name__})")


def _module_class(name: str) -> type:
    return type(name.rsplit(".", 1)[-1], (Record,), {"kind": name})


class SafeUnpickler(pickle.Unpickler):
    """Resolves tensors, containers and inert records only; every other global is refused before it can run."""

    ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): _load_storage,
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
        ("collections", "OrderedDict"): OrderedDict,
        ("dnnlib.util", "EasyDict"): EasyDict,
        ("copyreg", "_reconstructor"): _reconstructor,
        ("builtins", "object"): object,
        ("builtins", "dict"): dict,
        ("torch", "device"): torch.device,
        ("torch", "float32"): torch.float32, ("torch", "float16"): torch.float16, ("torch", "bfloat16"): torch.bfloat16,
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        if module.startswith("torch.nn.modules.") and name.isidentifier():
            return _module_class(f"{module}.{name}")  # a plain torch module inside a network: its state only
        raise pickle.UnpicklingError(f"refused global {module}.{name} (not a tensor, a container or a network record)")


def read_pickle(path: Path) -> Any:
    """The whole pickle at ``path`` through :class:`SafeUnpickler`; errors name the file."""
    try:
        with open(path, "rb") as f:
            return SafeUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError, ValueError,
            RuntimeError) as e:
        raise StageError(f"{path}: not a network pickle this project can read safely ({str(e).splitlines()[0][:200]})") from None
    except OSError as e:
        raise StageError(f"{path}: unreadable ({e.strerror or e})") from None


def state_dict(record: Record, prefix: str = "") -> dict[str, torch.Tensor]:
    """``module.state_dict()`` of the module ``record`` describes: parameters, persistent buffers, submodules."""
    state = record.state
    out: dict[str, torch.Tensor] = {}
    for name, p in (state.get("_parameters") or {}).items():
        if p is not None:
            out[prefix + name] = p.detach()
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for name, b in (state.get("_buffers") or {}).items():
        if b is not None and name not in skip:
            out[prefix + name] = b.detach()
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, Record):
            out.update(state_dict(child, f"{prefix}{name}."))
    return out


def _plain(value: Any) -> Any:
    """Constructor arguments as JSON values (anything else as its repr)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def read_network(path: Path, key: str = "ema") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The network stored under ``key`` in an EDM/EDM2 pickle: its state dict and a description (class name,
    constructor arguments, sha256 of the never-executed module source, and the same for every submodule class)."""
    data = read_pickle(path)
    if not isinstance(data, dict) or not isinstance(data.get(key), Record):
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise StageError(f"{path}: no network under {key!r} (found {found})")
    net = data[key]
    classes: dict[str, str] = {}

    def walk(r: Record, name: str) -> None:
        classes[name or "."] = r.class_name or r.kind
        for child_name, child in (r.state.get("_modules") or {}).items():
            if isinstance(child, Record):
                walk(child, f"{name}.{child_name}" if name else child_name)

    walk(net, "")
    info = {"class_name": net.class_name, "init_args": _plain(net.state.get("_init_args") or []),
            "init_kwargs": _plain(net.state.get("_init_kwargs") or {}), "module_src_sha256": net.module_src_sha256,
            "classes": classes}
    return state_dict(net), info


def convert(path: Path, out: Path, key: str = "ema") -> dict[str, Any]:
    """Write the network under ``key`` of the pickle at ``path`` as safetensors (metadata ``edm``: its description)."""
    tensors, info = read_network(path, key)
    if not tensors:
        raise StageError(f"{path}: the network under {key!r} holds no tensors")
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    atomic_replace_file(Path(out), lambda tmp: save_file(tensors, str(tmp), metadata={"edm": json.dumps(info)}))
    return {**info, "tensors": len(tensors), "parameters": sum(v.numel() for v in tensors.values())}
