"""The codec: uint8 images <-> latents standardised per channel to σ_d, and its files.

The encode stage writes ``codec.json`` (kind, image and latent shapes, per-channel μ_c and σ_c, σ_d) and, unless the
codec is the identity, ``codec/`` (an AutoencoderKL in diffusers format). Every later stage calls :func:`load_codec`:
``codec.encode(uint8 images) -> latents`` and ``codec.decode(latents) -> uint8``. Whatever the codec, the latents are
standardised per channel to σ_d (docs/method.md, "Latents"), so the model sees data at the scale TrigFlow assumes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from study.errors import StageError

if TYPE_CHECKING:
    from diffusers import AutoencoderKL


# --------------------------------------------------------------------------------------------------------------
# Pixels, VAE inputs and standardised latents.


def to_unit(images: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [-1, 1], the range of the identity codec and of AutoencoderKL inputs."""
    return images.float() / 127.5 - 1


def from_unit(x: Tensor) -> Tensor:
    """float [-1, 1] -> uint8 [0, 255], clamped and rounded."""
    return ((x + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)


def downsampling_factor(vae: AutoencoderKL) -> int:
    """Every encoder block but the last halves the resolution."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def vae_size(vae: AutoencoderKL, height: int, width: int) -> tuple[int, int]:
    """The input size the VAE sees: the image size rounded up to a multiple of its downsampling factor."""
    f = downsampling_factor(vae)
    return math.ceil(height / f) * f, math.ceil(width / f) * f


def match_channels(x: Tensor, channels: int) -> Tensor:
    """Grayscale <-> RGB: repeat a single channel, or average down to one."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, channels, -1, -1)  # (N, channels, H, W)
    assert channels == 1, f"cannot convert {x.shape[1]} channels to {channels}"
    return x.mean(dim=1, keepdim=True)  # (N, 1, H, W)


def resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize (antialiased when shrinking); a no-op at the same size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


# Per-channel latent standardisation to σ_d (paper App. G; docs/method.md, "Latents").
def standardise(z: Tensor, mean: Tensor, std: Tensor, sigma_data: float) -> Tensor:
    return (z - mean.view(1, -1, 1, 1)) * (sigma_data / std.view(1, -1, 1, 1))


def unstandardise(z: Tensor, mean: Tensor, std: Tensor, sigma_data: float) -> Tensor:
    return z * (std.view(1, -1, 1, 1) / sigma_data) + mean.view(1, -1, 1, 1)



# --------------------------------------------------------------------------------------------------------------
# The codec.


@dataclass
class Codec:
    """Images <-> latents standardised per channel to σ_d. ``vae=None`` is the identity codec (pixel space).

    ``mean`` and ``std`` (μ_c, σ_c, shape (C',)) live on the codec's device; inputs may live anywhere, and results come
    back on the input's device. Both directions run in batches of ``batch_size`` images, without gradients.
    """

    vae: AutoencoderKL | None
    image_shape: tuple[int, int, int]
    mean: Tensor
    std: Tensor
    sigma_data: float
    batch_size: int = 256

    @property
    def kind(self) -> str:
        return "identity" if self.vae is None else "autoencoder"

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        if self.vae is None:
            return tuple(self.image_shape)
        f = downsampling_factor(self.vae)
        height, width = vae_size(self.vae, *self.image_shape[1:])
        return (self.vae.config.latent_channels, height // f, width // f)

    @torch.no_grad()
    def encode_raw(self, images: Tensor) -> Tensor:
        """uint8 N×C×H×W -> latents before standardisation (the posterior mean for a VAE), float32."""
        assert images.dtype == torch.uint8 and tuple(images.shape[1:]) == tuple(self.image_shape), images.shape
        out = [self._encode_batch(b.to(self.device)).to(images.device) for b in images.split(self.batch_size)]
        return torch.cat(out) if out else torch.empty(0, *self.latent_shape, device=images.device)

    @torch.no_grad()
    def encode_posterior(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 N×C×H×W -> the VAE posterior's mean and standard deviation before standardisation, float32."""
        assert self.vae is not None, "the identity codec has no posterior"
        parts = []
        for b in images.split(self.batch_size):
            dist = self._posterior(b.to(self.device))
            parts.append((dist.mean.to(images.device), dist.std.to(images.device)))
        return torch.cat([m for m, _ in parts]), torch.cat([s for _, s in parts])

    @torch.no_grad()
    def decode_raw(self, z: Tensor) -> Tensor:
        """Latents before standardisation -> uint8 N×C×H×W."""
        assert tuple(z.shape[1:]) == tuple(self.latent_shape), z.shape
        out = [from_unit(self._decode_batch(b.to(self.device, torch.float32))).to(z.device)
               for b in z.split(self.batch_size)]
        return torch.cat(out) if out else torch.empty(0, *self.image_shape, dtype=torch.uint8, device=z.device)

    def encode(self, images: Tensor) -> Tensor:
        """uint8 N×C×H×W -> standardised latents N×C'×H'×W' (float32)."""
        return standardise(self.encode_raw(images), self.mean.to(images.device), self.std.to(images.device), self.sigma_data)

    def decode(self, latents: Tensor) -> Tensor:
        """Standardised latents -> uint8 N×C×H×W (standardisation undone, clamped, rounded)."""
        mean, std = self.mean.to(latents.device), self.std.to(latents.device)
        return self.decode_raw(unstandardise(latents.float(), mean, std, self.sigma_data))

    def _encode_batch(self, images: Tensor) -> Tensor:
        return to_unit(images) if self.vae is None else self._posterior(images).mode()

    def _posterior(self, images: Tensor) -> Any:
        x = to_unit(images)
        x = resize(match_channels(x, self.vae.config.in_channels), vae_size(self.vae, *x.shape[-2:]))
        return self.vae.encode(x).latent_dist

    def _decode_batch(self, z: Tensor) -> Tensor:
        if self.vae is None:
            return z
        x = self.vae.decode(z).sample
        return resize(match_channels(x, self.image_shape[0]), self.image_shape[1:])


def load_codec(out_dir: Path, device: str = "cpu", batch_size: int = 256) -> Codec:
    """The codec written by :func:`run` into ``out_dir`` (``codec.json`` and ``codec/``), on ``device``."""
    meta_path = Path(out_dir) / "codec.json"
    if not meta_path.is_file():
        raise StageError(f"{meta_path}: not found (run the encode stage first)")
    try:
        meta = json.loads(meta_path.read_text())
        kind, image_shape = meta["kind"], tuple(int(s) for s in meta["image_shape"])
        mean = torch.tensor(meta["mean"], dtype=torch.float32, device=device)
        std = torch.tensor(meta["std"], dtype=torch.float32, device=device)
        sigma_data = float(meta["sigma_data"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise StageError(f"{meta_path}: not a codec description written by the encode stage "
                         f"({type(e).__name__}: {str(e)[:200]})") from None
    vae = None
    if kind != "identity":
        vae = load_autoencoder(Path(out_dir) / "codec", who=f"{Path(out_dir) / 'codec'}").to(device).eval()
    return Codec(vae, image_shape, mean, std, sigma_data, batch_size)


def load_autoencoder(source: str | Path, *, who: str) -> AutoencoderKL:
    """``AutoencoderKL.from_pretrained`` from safetensors weights only: a pickled ``.bin`` is refused, never loaded.

    ``source`` is a local diffusers directory or a hub id; errors begin with ``who``.
    """
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_pretrained(source, low_cpu_mem_usage=False, use_safetensors=True)
    except (OSError, ValueError, EnvironmentError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise StageError(f"{who}: cannot load an AutoencoderKL from safetensors weights ({reason})") from None

