"""Stage ``encode``: prepared images -> standardised latents, and the codec that maps latents back to pixels.

Consumes ``data/prepared`` (``images.parquet`` + ``manifest.json``, written by ``stages/data.py``). Produces
``data/latents``, replaced whole and only on success:

- ``latents.safetensors``: ``train`` / ``eval`` float32 N×C'×H'×W' latents and ``train_labels`` / ``eval_labels``
  (with ``encode.posterior: sample`` also ``train_std`` / ``eval_std``, the VAE posterior's std in the same units);
- ``codec.json`` (kind, image and latent shapes, per-channel μ_c and σ_c, σ_d, the labels' number of classes) and,
  unless the codec is the identity, ``codec/``: the AutoencoderKL in diffusers format;
- ``recon_grid.png`` (eval originals above their reconstructions, the classes in turn), ``metrics.json``, ``resolved_params.json`` and
  ``provenance.json`` (git commit, timings; outside the output's DVC hash).

``encode.codec`` picks the codec. ``identity`` stays in pixel space, as the paper's CIFAR-10 and ImageNet-64 runs do.
``pretrained`` loads an AutoencoderKL such as ``stabilityai/sd-vae-ft-mse``, as the ImageNet-512 runs do. ``train``,
the offline default, fits a small AutoencoderKL on the training split right here. Whatever the codec, the latents are
standardised per channel to σ_d (docs/method.md, "Latents"), so every later stage sees data at the scale TrigFlow
assumes. Later stages read the codec with :func:`study.codec.load_codec`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from study.checkpoint import Checkpointer, checkpoint_root, failpoint, run_checkpointer
from study.cli import add_params_args, cli, load_args
from study.codec import Codec, load_autoencoder, resize, standardise, to_unit, vae_size
from study.errors import StageError
from study.files import atomic_output_dir, check_paths, write_json, write_provenance
from study.images import MANIFEST, PARQUET, SPLITS, class_interleaved, load_split, read_manifest, save_grid
from study.params import BaseParams, EncodeParams, to_plain
from study.runtime import setup_torch

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

PSNR_CAP_DB = 100.0  # reported when the round trip is lossless (MSE 0): PSNR is infinite and JSON has no inf
GRID_COLUMNS, GRID_ROWS = 8, 2  # recon_grid.png: this many rows of originals, then as many of reconstructions


# --------------------------------------------------------------------------------------------------------------
# Latent statistics and reconstruction quality.


def channel_stats(z: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and standard deviation of N×C×H×W latents, accumulated in float64."""
    z = z.double().transpose(0, 1).reshape(z.shape[1], -1)  # (C, N·H·W)
    return z.mean(dim=1), z.std(dim=1)


def psnr_db(mse: float) -> float:
    """Peak signal-to-noise ratio of pixels in [0, 1], capped at PSNR_CAP_DB for a lossless round trip."""
    return PSNR_CAP_DB if mse <= 10 ** (-PSNR_CAP_DB / 10) else -10 * math.log10(mse)


# --------------------------------------------------------------------------------------------------------------
# Where the autoencoder comes from: trained here, or loaded.


def build_autoencoder(params: EncodeParams, image_shape: tuple[int, int, int]) -> AutoencoderKL:
    """A small AutoencoderKL for ``image_shape``: one ResNet layer per block, no attention, groups dividing every width."""
    from diffusers import AutoencoderKL

    blocks = len(params.channels)
    return AutoencoderKL(
        in_channels=image_shape[0],
        out_channels=image_shape[0],
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=params.channels,
        layers_per_block=1,
        latent_channels=params.latent_channels,
        norm_num_groups=math.gcd(8, *params.channels),
        sample_size=image_shape[1],
        mid_block_add_attention=False,  # purely convolutional: the defaults in params.yaml were measured this way
    )


def train_autoencoder(images: Tensor, params: EncodeParams, seed: int,
                      checkpoint: Checkpointer | None = None) -> tuple[AutoencoderKL, float]:
    """Fit a small AutoencoderKL to uint8 ``images`` (on the training device); returns it and the seconds taken.

    Objective: MSE per pixel + kl_weight · KL(q(z|x) ‖ N(0, I)) per latent element, with z sampled from q(z|x).
    With a ``checkpoint``, resumes from the run's last checkpoint and writes one every ``checkpoint.every`` steps
    (weights, Adam state, the generator and the rest of the epoch's order): a resumed run ends bit-identical.
    """
    from tqdm import tqdm

    from study.progress import bar as progress_bar

    # Initial weights, batch order and posterior noise all come from the seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = build_autoencoder(params, tuple(images.shape[1:]))
    vae = vae.to(images.device).train()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=params.lr)
    size = vae_size(vae, *images.shape[-2:])
    order = torch.empty(0, dtype=torch.long)
    first_step, seconds_before = 0, 0.0

    # Resume from this run's last checkpoint, if any.
    expected = {"step": 0, "vae": vae.state_dict(),
                "optimizer": {"state": {}, "param_groups": optimizer.state_dict()["param_groups"]},
                "generator": generator.get_state(), "order": None, "seconds": 0.0}
    state = checkpoint.restore(expected) if checkpoint is not None else None
    for note in checkpoint.notes if checkpoint is not None else []:
        tqdm.write(f"encode: {note}", file=sys.stderr)
    if state is not None:
        vae.load_state_dict(state["vae"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        order, first_step, seconds_before = state["order"], state["step"], state["seconds"]

    start = time.perf_counter()
    bar = progress_bar(range(first_step, params.steps), initial=first_step, total=params.steps,
                       desc="encode: train AutoencoderKL", unit="step")
    for step in bar:
        failpoint("step")
        # Next batch: consecutive epochs of seeded permutations.
        while len(order) < params.batch_size:
            order = torch.cat([order, torch.randperm(len(images), generator=generator)])
        index, order = order[: params.batch_size], order[params.batch_size :]
        x = resize(to_unit(images[index.to(images.device)]), size)

        # Encode, sample z ~ q(z|x), decode; reconstruction + KL (the VAE objective).
        posterior = vae.encode(x).latent_dist
        x_hat = vae.decode(posterior.sample(generator=generator)).sample
        kl = posterior.kl() / posterior.mean[0].numel()  # per latent element
        loss = F.mse_loss(x_hat, x) + params.kl_weight * kl.mean()

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise StageError(f"encode: autoencoder loss became non-finite at step {step} (try a smaller encode.lr)")
        images_per_second = (step + 1 - first_step) * params.batch_size / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{loss_value:.4f}", avg_img_s=f"{images_per_second:.0f}", refresh=False)

        if checkpoint is not None and checkpoint.due(step + 1, params.steps):
            checkpoint.save(lambda: {"step": step + 1, "vae": vae.state_dict(), "optimizer": optimizer.state_dict(),
                                     "generator": generator.get_state(), "order": order.clone(),
                                     "seconds": seconds_before + time.perf_counter() - start})
    bar.close()
    return vae.eval(), seconds_before + time.perf_counter() - start


def load_pretrained(name: str) -> AutoencoderKL:
    """``AutoencoderKL.from_pretrained`` on a local diffusers directory or a Hugging Face hub id (safetensors only)."""
    path = Path(name).expanduser()
    local = path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
    if local and not path.is_dir():
        raise StageError(f"encode.pretrained: {path}: directory not found")
    if local and not (path / "config.json").is_file():
        raise StageError(f"encode.pretrained: {path / 'config.json'}: not found "
                         "(expected an AutoencoderKL saved with save_pretrained)")
    where = str(path) if local else f"hub id {name!r}"
    return load_autoencoder(path if local else name, who=f"encode.pretrained: {where}")


# --------------------------------------------------------------------------------------------------------------
# Reading the prepared data.


def read_prepared(prepared_dir: Path) -> tuple[tuple[int, int, int], dict[str, tuple[Tensor, Tensor]]]:
    """The image shape from ``manifest.json`` and, per split, (uint8 N×C×H×W images, int64 labels)."""
    manifest_path, parquet_path = prepared_dir / MANIFEST, prepared_dir / PARQUET
    if not prepared_dir.is_dir():
        raise StageError(f"{prepared_dir}: prepared-data directory not found (run the data stage first)")
    for path in (manifest_path, parquet_path):
        if not path.is_file():
            raise StageError(f"{path}: not found (run the data stage first)")
    image_shape = tuple(read_manifest(prepared_dir)["shape"])
    if len(image_shape) != 3 or image_shape[0] not in (1, 3):
        raise StageError(f"{manifest_path}: expected \"shape\": [C, H, W] with C 1 or 3, got {list(image_shape)}")

    splits = {split: load_split(prepared_dir, split) for split in SPLITS}
    for split, (images, labels) in splits.items():
        if len(images) == 0:
            raise StageError(f"{parquet_path}: the {split} split is empty")
        if tuple(images.shape[1:]) != image_shape or images.dtype != torch.uint8 or len(labels) != len(images):
            raise StageError(f"{parquet_path}: {split} images are {images.dtype} {list(images.shape)}, "
                             f"manifest says {list(image_shape)}")
    return image_shape, splits


# --------------------------------------------------------------------------------------------------------------
# The stage.


def run(params: EncodeParams, base: BaseParams, prepared_dir: Path, out_dir: Path, *, device: str = "cpu",
        checkpoint_root: Path | None = None) -> dict[str, Any]:
    """Encode the prepared splits into standardised latents; write them, the codec and its metrics to ``out_dir``.

    With ``checkpoint_root`` (codec=train), autoencoder checkpoints go to ``checkpoint_root/encode`` and a re-run resumes.
    """
    from safetensors.torch import save_file

    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    image_shape, splits = read_prepared(prepared_dir)

    # The codec before standardisation: none, trained on the train split, or loaded.
    train_seconds = 0.0
    vae = None
    ckpt = None
    if params.codec == "train":
        ckpt = run_checkpointer(checkpoint_root, "encode", params.checkpoint_every, stage="encode", params=params,
                                base=base, inputs=sorted(prepared_dir.glob("*.parquet")))
        vae, train_seconds = train_autoencoder(splits["train"][0].to(device), params, base.seed, ckpt)
    elif params.codec == "pretrained":
        vae = load_pretrained(params.pretrained).to(device).eval()
        if vae.config.in_channels not in (1, 3) or vae.config.out_channels != vae.config.in_channels:
            raise StageError(f"encode.pretrained: expected a 1- or 3-channel AutoencoderKL, got in/out channels "
                             f"{vae.config.in_channels}/{vae.config.out_channels}")
    latent_channels = vae.config.latent_channels if vae is not None else image_shape[0]
    no_stats = torch.zeros(latent_channels, device=device), torch.full((latent_channels,), base.sigma_data, device=device)
    codec = Codec(vae, image_shape, *no_stats, base.sigma_data, params.encode_batch_size)  # μ_c, σ_c measured below

    # Encode both splits: the posterior mean, and with encode.posterior: sample its standard deviation too.
    if params.posterior == "sample":
        posterior = {split: codec.encode_posterior(images) for split, (images, _) in splits.items()}
        raw, raw_std = {k: v[0] for k, v in posterior.items()}, {k: v[1] for k, v in posterior.items()}
    else:
        raw, raw_std = {split: codec.encode_raw(images) for split, (images, _) in splits.items()}, {}
    for split, z in raw.items():
        if not torch.isfinite(z).all():
            raise StageError(f"encode: the {split} latents are not finite (codec {params.codec!r} produced NaN/inf)")

    # Per-channel μ_c, σ_c from the train split unless pinned (docs/method.md, "Latents"), then standardise to σ_d.
    mean, std = channel_stats(raw["train"])
    for name, pinned in (("latent_mean", params.latent_mean), ("latent_std", params.latent_std)):
        if pinned and len(pinned) != len(mean):
            raise StageError(f"encode.{name}: expected {len(mean)} values (one per latent channel), got {len(pinned)}")
    mean = torch.tensor(params.latent_mean, dtype=torch.float64) if params.latent_mean else mean
    std = torch.tensor(params.latent_std, dtype=torch.float64) if params.latent_std else std
    if not (std > 0).all():
        channel = int((std <= 0).nonzero()[0])
        raise StageError(f"encode: latent channel {channel} is constant on the train split; cannot standardise it")
    codec.mean, codec.std = mean.float().to(device), std.float().to(device)
    latents = {split: standardise(z, mean.float(), std.float(), base.sigma_data) for split, z in raw.items()}
    # The posterior's std in standardised units: the same per-channel scale σ_d/σ_c, no shift.
    latent_std = {split: s * (base.sigma_data / std.float()).view(1, -1, 1, 1) for split, s in raw_std.items()}

    # Reconstruct the eval split: MSE and PSNR of pixels in [0, 1].
    originals = splits["eval"][0]
    reconstructions = codec.decode(latents["eval"])
    recon_mse = ((reconstructions.double() - originals.double()) / 255).square().mean().item()
    metrics = {
        "recon_mse": recon_mse,
        "recon_psnr_db": psnr_db(recon_mse),
        "latent_shape": list(codec.latent_shape),
    }

    # Write everything, or nothing. The grid shows the classes in turn (the split may be sorted by label).
    columns = min(GRID_COLUMNS, len(originals))
    shown = min(GRID_ROWS * columns, len(originals)) // columns * columns  # whole rows only
    picked = class_interleaved(splits["eval"][1].tolist(), shown)
    with atomic_output_dir(out_dir) as tmp:
        tensors = {split: latents[split].cpu().contiguous() for split in SPLITS}
        tensors |= {f"{split}_labels": splits[split][1].to(torch.int64).cpu().contiguous() for split in SPLITS}
        tensors |= {f"{split}_std": s.cpu().contiguous() for split, s in latent_std.items()}
        save_file(tensors, tmp / "latents.safetensors")
        if vae is not None:
            vae.save_pretrained(tmp / "codec", safe_serialization=True)
        write_json(tmp / "codec.json", {
            "kind": codec.kind,
            "latent_shape": list(codec.latent_shape),
            "image_shape": list(image_shape),
            "mean": codec.mean.tolist(),
            "std": codec.std.tolist(),
            "sigma_data": base.sigma_data,
            "num_classes": int(read_manifest(prepared_dir).get("num_classes", 0)),  # the labels' range (conditioning)
        })
        save_grid(tmp / "recon_grid.png", torch.cat([originals[picked], reconstructions[picked]]), columns)
        write_json(tmp / "metrics.json", metrics)
        resolved = {"base": to_plain(base), "encode": to_plain(params)}
        write_provenance(tmp, {**resolved, "data": str(prepared_dir), "out": str(out_dir), "device": device},
                         seconds={"train": train_seconds})
    if ckpt is not None:
        ckpt.clear()
    return {"codec": params.codec, "n_train": len(latents["train"]), "n_eval": len(latents["eval"]), **metrics,
            "train_seconds": round(train_seconds, 2)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m stages.encode",
        description="Encode the prepared images into latents standardised per channel to sigma_data "
        "(codec: identity = pixels, train = a small AutoencoderKL fitted here, pretrained = e.g. sd-vae-ft-mse).",
    )
    add_params_args(parser)
    parser.add_argument("--data", type=Path, required=True, help="prepared-data directory (from the data stage)")
    parser.add_argument("--out", type=Path, required=True, help="output directory, replaced whole on success")
    args = parser.parse_args(argv)

    params = load_args(args)
    check_paths(inputs={"--data": args.data},
                outputs={"--out": args.out})
    device = setup_torch(params.base)
    result = run(params.encode, params.base, args.data, args.out, device=device, checkpoint_root=checkpoint_root(params.base))
    shape = "×".join(map(str, result["latent_shape"]))
    print(f"encode: codec={result['codec']} latents {shape} (train {result['n_train']}, eval {result['n_eval']}), "
          f"eval recon PSNR {result['recon_psnr_db']:.2f} dB, trained {result['train_seconds']:.1f}s on {device} "
          f"-> {args.out}")
    return result


if __name__ == "__main__":
    raise SystemExit(cli(main))
