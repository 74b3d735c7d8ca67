"""Named model scales: the widths of the U-Net (``scm.nn.unet_config``), without importing torch.

The params loader checks ``base.scales`` against this table when ``params.yaml`` is read, before any stage runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Scale:
    """A named U-Net width. CPU scales fit this project's 2-core default; S..XXL are the paper's widths."""

    model_channels: int
    channel_mult: tuple[int, ...]
    num_blocks: int
    attn_levels: tuple[int, ...] = ()
    num_heads: int = 1
    note: str = field(default="", compare=False)


SCALES: dict[str, Scale] = {
    # CPU scales for 28x28 pixels or 4x7x7 latents (this project's default study).
    "cpu-xs": Scale(16, (1, 2), 1, note="CPU smoke / tiny"),
    "cpu-s": Scale(32, (1, 2), 1, note="CPU default, small"),
    "cpu-m": Scale(48, (1, 2), 2, attn_levels=(1,), note="CPU default, medium"),
    "cpu-l": Scale(64, (1, 2, 2), 2, attn_levels=(1, 2), num_heads=2, note="CPU, large"),
    # The paper's ImageNet widths (App. G, Table 4; EDM2 configs): 192/256/320/384/448 channels. Parameter counts
    # of *this* U-Net at those widths differ from the paper's EDM2 networks (see README).
    "S": Scale(192, (1, 2, 3, 4), 3, attn_levels=(2, 3), num_heads=3, note="paper S (IN512/IN64)"),
    "M": Scale(256, (1, 2, 3, 4), 3, attn_levels=(2, 3), num_heads=4, note="paper M"),
    "L": Scale(320, (1, 2, 3, 4), 3, attn_levels=(2, 3), num_heads=5, note="paper L"),
    "XL": Scale(384, (1, 2, 3, 4), 3, attn_levels=(2, 3), num_heads=6, note="paper XL"),
    "XXL": Scale(448, (1, 2, 3, 4), 3, attn_levels=(2, 3), num_heads=7, note="paper XXL"),
}
