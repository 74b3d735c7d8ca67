"""Networks on disk: one self-describing safetensors file per model.

A model file holds the weights plus, in the safetensors metadata, the JSON network description (scale, network
config, latent shape, σ_d). It is never a pickle, so loading runs no code. The kinds of network: the project's U-Net
(:class:`scm.nn.UNet`, metadata key ``unet``), EDM2's U-Net and DDPM++ (``"kind": "mpunet" | "ddpmpp"`` with the
config under ``network``, :mod:`scm.networks`), and a diffusers ``UNet2DModel`` teacher behind its TrigFlow adapter
(``"kind": "diffusers-unet2d"``, :mod:`study.diffusers_models`); all are called ``net(x_hat, t, class_labels)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from scm import networks
from scm import nn as scm_nn
from study.errors import StageError
from study.files import atomic_replace_file

MODEL_FILE = "model.safetensors"
KIND_DIFFUSERS = "diffusers-unet2d"  # study.diffusers_models.KIND (not imported: diffusers loads only when needed)


KINDS = ("unet", *(k for k in networks.NETWORKS if k != "unet"), KIND_DIFFUSERS)


def build_net(scale: str, latent_shape: tuple[int, ...], dropout: float = 0.0, dropout_levels: tuple[int, ...] = (),
              *, width: int = 0, num_classes: int = 0, name: str = "teacher") -> nn.Module:
    """A freshly initialised network of ``scale`` (:data:`scm.scales.SCALES`) for latents of ``latent_shape``,
    conditioned on ``num_classes`` class labels (0: unconditional).

    ``width`` > 0 replaces the scale's base width (``base.width``). The scale names are checked when params.yaml is
    loaded; what can still be wrong is the dropout levels, so errors name ``<name>.dropout_levels``."""
    if scale not in networks.SCALES:
        raise StageError(f"base.scales: unknown scale {scale!r} (accepted: {', '.join(networks.SCALES)})")
    try:
        return networks.build(networks.network_config(scale, in_channels=latent_shape[0], dropout=dropout,
                                                      dropout_levels=dropout_levels, num_classes=num_classes,
                                                      model_channels=width))
    except ValueError as e:
        raise StageError(f"{name}.dropout_levels: {e}") from None


def describe(net: nn.Module) -> dict[str, Any]:
    """The metadata that rebuilds ``net``'s architecture: ``{"unet": cfg}`` for the project's U-Net (the format
    of earlier model files), ``{"kind": ..., "network": cfg}`` for the other families."""
    from study import diffusers_models

    if isinstance(net, diffusers_models.TrigFlowUNet2D):
        return diffusers_models.describe(net)
    plain = networks.to_plain(net)
    if plain["kind"] == "unet":
        return {"unet": plain["config"]}
    return {"kind": plain["kind"], "network": plain["config"]}


def save_model(path: Path, net: nn.Module, meta: dict[str, Any]) -> None:
    """Weights + JSON description in one safetensors file, written atomically."""
    meta = {k: v for k, v in meta.items() if k not in ("unet", "kind", "network", "unet2d", "alphas_cumprod")}
    info = {**meta, **describe(net), "n_params": scm_nn.count_params(net)}
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    atomic_replace_file(Path(path), lambda tmp: save_file(state, str(tmp), metadata={"scm": json.dumps(info)}))


def read_model_meta(path: Path, *, name: str | None = None) -> dict[str, Any]:
    """The JSON description a model file carries; errors begin with ``name`` (default: the path)."""
    who = name or path
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        try:
            with open(path, "rb") as f:
                head = f.read(4)
        except OSError:
            head = b""
        pickle = head.startswith((b"PK\x03\x04", b"\x80"))  # torch.save's zip container, or a bare pickle
        hint = "; it looks like a pickle checkpoint (torch.save), refused: unpickling can run code" if pickle else ""
        raise StageError(f"{who}: not a readable safetensors model file ({str(e).splitlines()[0]}){hint}") from None
    if "scm" not in meta:
        raise StageError(f"{who}: no 'scm' metadata: not a model file written by this project")
    try:
        info = json.loads(meta["scm"])
    except json.JSONDecodeError as e:
        raise StageError(f"{who}: the 'scm' metadata is not valid JSON ({e})") from None
    if not isinstance(info, dict):
        raise StageError(f"{who}: the 'scm' metadata does not describe a network (not a JSON object)")
    kind = info.get("kind", "unet")
    if kind not in KINDS:
        raise StageError(f"{who}: the 'scm' metadata describes a network of unknown kind {_short(kind)}")
    config_key = "unet" if kind == "unet" else "network" if kind in networks.NETWORKS else None
    if config_key and not isinstance(info.get(config_key), dict):
        raise StageError(f"{who}: the 'scm' metadata does not describe a network (no {config_key!r} mapping)")
    return info


def load_model(path: Path, *, expect_shape: tuple[int, ...] | None = None, expect_scale: str | None = None,
               device: str | torch.device = "cpu", name: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model file (or a directory holding ``model.safetensors``); check it fits the data and the scale.

    Errors begin with ``name`` (default: the path), e.g. the user's ``teacher.source`` when ``path`` is a fetched copy.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    who = name or path
    if not path.is_file():
        raise StageError(f"{who}: model file not found")
    meta = read_model_meta(path, name=name)
    if expect_scale is not None and meta.get("scale") != expect_scale:
        raise StageError(f"{who}: a model of scale {_short(meta.get('scale'))}, but scale {expect_scale!r} was asked for")
    found_shape = meta.get("latent_shape")
    if expect_shape is not None and found_shape != list(expect_shape):
        found_shape = tuple(found_shape) if isinstance(found_shape, list) else found_shape
        raise StageError(f"{who}: trained on latents of shape {_short(found_shape)}, "
                         f"but the data has shape {tuple(expect_shape)}")

    # The network the metadata describes, first on the meta device: nothing is allocated until its every tensor
    # has been matched against the tensors the file really holds, so a forged width cannot ask for terabytes.
    try:
        with torch.device("meta"):
            skeleton = _build(meta)
    except (TypeError, ValueError, KeyError, IndexError, ZeroDivisionError, RuntimeError, AttributeError) as e:
        raise StageError(f"{who}: the 'scm' metadata describes no valid network "
                         f"({type(e).__name__}: {_cut(str(e).splitlines()[0] if str(e) else '', 200)})") from None
    mismatch = _shape_mismatch(path, skeleton)
    if mismatch is not None:
        raise StageError(f"{who}: weights do not match the network they describe ({mismatch})")
    net = _build(meta)
    try:
        state = load_file(str(path))
        net.load_state_dict(state)
    except (RuntimeError, SafetensorError) as e:
        raise StageError(f"{who}: weights do not match the network they describe ({_cut(' '.join(str(e).split()), 300)})") from None
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise StageError(f"{who}: tensor {_short(bad)} holds NaN or inf (a diverged or damaged model)")
    return net.to(device).eval().requires_grad_(False), meta


def _build(meta: dict[str, Any]) -> nn.Module:
    """The network a model file's metadata describes, with fresh weights, on the current default device."""
    if meta.get("kind") == KIND_DIFFUSERS:
        from study import diffusers_models

        return diffusers_models.build(meta)
    kind = meta.get("kind", "unet")
    return networks.build(networks.from_plain(kind, meta["unet"] if kind == "unet" else meta["network"]))


def _shape_mismatch(path: Path, skeleton: nn.Module) -> str | None:
    """Why the tensors in ``path`` (read from its header only) are not ``skeleton``'s state, or None."""
    from safetensors import safe_open

    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    with safe_open(str(path), framework="pt") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    for k in expected.keys() - found.keys():
        return f"tensor {_short(k)} is missing"
    for k in found.keys() - expected.keys():
        return f"unexpected tensor {_short(k)}"
    for k, shape in expected.items():
        if found[k] != shape:
            return f"tensor {_short(k)} is {list(found[k])}, the network's is {list(shape)}"
    return None


def _cut(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters: what a file says is echoed in errors, never whole."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _short(value: Any) -> str:
    """``repr(value)`` cut to 80 characters."""
    return _cut(repr(value), 80)
