"""Named model scales: each a network family and its widths (``scm.networks.network_config``), without importing torch.

The params loader checks ``base.scales`` against this table when ``params.yaml`` is read, before any stage runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class Scale:
    """A named network. CPU scales fit this project's 2-core default; S..XXL and ddpmpp are the paper's networks.

    ``network``: ``unet`` (this project's U-Net, :mod:`scm.nn`), ``mpunet`` (EDM2's magnitude-preserving U-Net,
    :mod:`scm.mpunet`) or ``ddpmpp`` (EDM's DDPM++, :mod:`scm.ddpmpp`). ``attn_levels`` index ``channel_mult``.
    """

    model_channels: int
    channel_mult: tuple[int, ...]
    num_blocks: int
    attn_levels: tuple[int, ...] = ()
    num_heads: int = 1  # unet only; mpunet has 64 channels per head, ddpmpp one head
    network: Literal["unet", "mpunet", "ddpmpp"] = "unet"
    note: str = field(default="", compare=False)


SCALES: dict[str, Scale] = {
    # CPU scales for 28x28 pixels or 4x7x7 latents (this project's default study).
    "cpu-xs": Scale(16, (1, 2), 1, note="CPU smoke / tiny"),
    "cpu-s": Scale(32, (1, 2), 1, note="CPU default, small"),
    "cpu-m": Scale(48, (1, 2), 2, attn_levels=(1,), note="CPU default, medium"),
    "cpu-l": Scale(64, (1, 2, 2), 2, attn_levels=(1, 2), num_heads=2, note="CPU, large"),
    # The paper's ImageNet networks (App. G, Table 4): EDM2's U-Net (config G) at 192/256/320/384/448 channels,
    # attention at 16² and 8² (levels 2, 3 of 64² latents or pixels).
    "S": Scale(192, (1, 2, 3, 4), 3, attn_levels=(2, 3), network="mpunet", note="paper S (IN512/IN64)"),
    "M": Scale(256, (1, 2, 3, 4), 3, attn_levels=(2, 3), network="mpunet", note="paper M"),
    "L": Scale(320, (1, 2, 3, 4), 3, attn_levels=(2, 3), network="mpunet", note="paper L"),
    "XL": Scale(384, (1, 2, 3, 4), 3, attn_levels=(2, 3), network="mpunet", note="paper XL"),
    "XXL": Scale(448, (1, 2, 3, 4), 3, attn_levels=(2, 3), network="mpunet", note="paper XXL"),
    # The paper's CIFAR-10 network: EDM's DDPM++ (128 channels, (2, 2, 2), 4 blocks, attention at 16²).
    "ddpmpp": Scale(128, (2, 2, 2), 4, attn_levels=(1,), network="ddpmpp", note="paper CIFAR-10"),
}
