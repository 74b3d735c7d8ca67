"""stages/encode.py: exact identity round trip, a few deterministic training steps, a local pretrained VAE, and bad
inputs that fail in one line while leaving the output directory alone."""

from __future__ import annotations

import yaml
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from stages import encode
from study.cli import cli
from study.errors import StageError
from study.params import resolve, to_plain
from study.codec import load_codec
from helpers import default_raw, params_text, section, synthetic_images, write_prepared

BASE = section("base")  # σ_d = 0.5
TINY_TRAIN = dict(codec="train", channels=(8, 16), latent_channels=2, steps=3, batch_size=8, encode_batch_size=16)


# --------------------------------------------------------------------------------------------------------------
# Fixtures: a prepared-data directory in the data stage's format.


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    return write_prepared(tmp_path / "prepared", synthetic_images(40, 1, 8), n_eval=10)


def tiny_vae(in_channels: int = 3):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=in_channels, out_channels=in_channels, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                         norm_num_groups=8, sample_size=8)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return encode.psnr_db(((a.double() - b.double()) / 255).square().mean().item())


# --------------------------------------------------------------------------------------------------------------
# The codecs.


@pytest.mark.parametrize("channels", [1, 3])
def test_identity_round_trip_is_exact(tmp_path: Path, channels: int) -> None:
    images = synthetic_images(40, channels, 8)
    prepared = write_prepared(tmp_path / "prepared", images, n_eval=10)
    out = tmp_path / "latents"
    result = encode.run(section("encode", codec="identity"), BASE, prepared, out)

    tensors = load_file(out / "latents.safetensors")
    assert tensors["train"].shape == (30, channels, 8, 8) and tensors["train"].dtype == torch.float32
    assert tensors["eval"].shape == (10, channels, 8, 8)
    assert tensors["train_labels"].dtype == torch.int64
    assert tensors["eval_labels"].tolist() == [i % 10 for i in range(30, 40)]
    # Standardised per channel to σ_d on the train split.
    mean, std = encode.channel_stats(tensors["train"])
    torch.testing.assert_close(mean, torch.zeros(channels, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(std, torch.full((channels,), BASE.sigma_data, dtype=torch.float64), atol=1e-5, rtol=0)

    codec = load_codec(out)
    assert codec.latent_shape == codec.image_shape == (channels, 8, 8)
    assert torch.equal(codec.decode(codec.encode(images)), images)
    assert torch.equal(codec.encode(images[30:]), tensors["eval"])

    meta = json.loads((out / "codec.json").read_text())
    assert meta["kind"] == "identity" and meta["sigma_data"] == BASE.sigma_data and len(meta["std"]) == channels
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == {"recon_mse": 0.0, "recon_psnr_db": encode.PSNR_CAP_DB, "latent_shape": [channels, 8, 8]}
    assert json.loads((out / "provenance.json").read_text())["seconds"] == {"train": 0.0}
    assert result["recon_psnr_db"] == encode.PSNR_CAP_DB and result["n_train"] == 30
    assert not (out / "codec").exists()
    assert Image.open(out / "recon_grid.png").size == (8 * 10 + 2, 2 * 10 + 2)  # 10 eval images: 8 originals over 8 recons
    assert json.loads((out / "resolved_params.json").read_text())["params"]["encode"]["codec"] == "identity"


def test_pinned_statistics_are_used(prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "latents"
    encode.run(section("encode", codec="identity", latent_mean=(0.1,), latent_std=(0.2,)), BASE, prepared, out)
    x = encode.to_unit(encode.read_prepared(prepared)[1]["train"][0])
    # latent' = (latent − μ_c)·σ_d/σ_c
    torch.testing.assert_close(load_file(out / "latents.safetensors")["train"], (x - 0.1) * 0.5 / 0.2)
    assert json.loads((out / "codec.json").read_text())["mean"] == pytest.approx([0.1])
    with pytest.raises(StageError, match=r"encode\.latent_mean: expected 1 values"):
        encode.run(section("encode", codec="identity", latent_mean=(0.0, 0.0)), BASE, prepared, tmp_path / "other")


def test_train_few_steps_is_deterministic_and_round_trips(prepared: Path, tmp_path: Path) -> None:
    params = section("encode", **TINY_TRAIN)
    encode.run(params, BASE, prepared, tmp_path / "a")
    result = encode.run(params, BASE, prepared, tmp_path / "b")

    a, b = load_file(tmp_path / "a" / "latents.safetensors"), load_file(tmp_path / "b" / "latents.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "same seed, same latents"
    assert a["train"].shape == (30, 2, 4, 4) and result["latent_shape"] == [2, 4, 4]
    assert (tmp_path / "b" / "codec" / "config.json").is_file()
    assert (tmp_path / "b" / "codec" / "diffusion_pytorch_model.safetensors").is_file()

    codec = load_codec(tmp_path / "b", batch_size=7)  # a different batching gives the same pixels
    images = encode.read_prepared(prepared)[1]["eval"][0]
    recon = codec.decode(codec.encode(images))
    assert recon.dtype == torch.uint8 and recon.shape == images.shape
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert psnr(recon, images) == pytest.approx(metrics["recon_psnr_db"], abs=1e-3)
    assert json.loads((tmp_path / "b" / "provenance.json").read_text())["seconds"]["train"] > 0


def test_pretrained_local_directory_converts_channels_and_size(tmp_path: Path) -> None:
    tiny_vae(in_channels=3).save_pretrained(tmp_path / "vae")
    images = synthetic_images(20, 1, 7)  # grayscale 7×7 -> RGB 8×8 for the VAE -> 4×4×4 latents
    prepared = write_prepared(tmp_path / "prepared", images, n_eval=5)
    out = tmp_path / "latents"
    result = encode.run(section("encode", codec="pretrained", pretrained=str(tmp_path / "vae")), BASE, prepared, out)

    assert result["latent_shape"] == [4, 4, 4] and result["train_seconds"] == 0.0
    assert load_file(out / "latents.safetensors")["eval"].shape == (5, 4, 4, 4)
    codec = load_codec(out)
    assert codec.kind == "autoencoder" and codec.image_shape == (1, 7, 7)
    recon = codec.decode(codec.encode(images[15:]))
    assert recon.shape == (5, 1, 7, 7) and recon.dtype == torch.uint8
    assert psnr(recon, images[15:]) == pytest.approx(result["recon_psnr_db"], abs=1e-3)
    assert Image.open(out / "recon_grid.png").size == (5 * 9 + 2, 2 * 9 + 2)  # 5 eval images: 5 originals over 5 recons


def test_posterior_sample_stores_the_std_beside_the_mean_in_the_latents_units(tmp_path: Path) -> None:
    """encode.posterior: sample keeps the latents of posterior: mean bit for bit and adds the posterior's std, scaled
    by the same σ_d/σ_c (EDM2 stores mean and std and draws a latent at every use)."""
    from study.latents import load_latents

    tiny_vae(in_channels=3).save_pretrained(tmp_path / "vae")
    prepared = write_prepared(tmp_path / "prepared", synthetic_images(20, 3, 8), n_eval=5)
    runs = {mode: encode.run(section("encode", codec="pretrained", pretrained=str(tmp_path / "vae"), posterior=mode),
                             BASE, prepared, tmp_path / mode) for mode in ("mean", "sample")}
    mean, sample = load_file(tmp_path / "mean" / "latents.safetensors"), load_file(tmp_path / "sample" / "latents.safetensors")
    assert "train_std" not in mean and torch.equal(mean["train"], sample["train"]) and torch.equal(mean["eval"], sample["eval"])
    assert sample["train_std"].shape == sample["train"].shape and (sample["train_std"] > 0).all()
    # Independently: the VAE's posterior std of the training images times σ_d/σ_c of the codec.
    from diffusers import AutoencoderKL

    codec = load_codec(tmp_path / "sample")
    images = load_split_images(prepared, "train")
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    with torch.no_grad():
        std = vae.encode(images.float() / 127.5 - 1).latent_dist.std
    assert torch.allclose(sample["train_std"], std * (0.5 / codec.std).view(1, -1, 1, 1), rtol=1e-5, atol=1e-7)
    assert load_latents(tmp_path / "sample").training_set("all")[2].shape == (20, 4, 4, 4)
    assert runs["sample"]["recon_mse"] == runs["mean"]["recon_mse"]
    with pytest.raises(StageError, match="encode.posterior: 'sample' needs a VAE"):
        resolve(default_raw(), overrides={"encode": {"codec": "identity", "posterior": "sample"}})


def load_split_images(prepared: Path, split: str) -> torch.Tensor:
    from study.images import load_split

    return load_split(prepared, split)[0]


# --------------------------------------------------------------------------------------------------------------
# Bad input: one line, nothing written.


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_unreachable_hub_id_fails_in_one_line(prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time, so patch it too
    with pytest.raises(StageError) as error:
        encode.run(section("encode", codec="pretrained", pretrained="nobody-xyz/no-such-vae"), BASE, prepared, tmp_path / "out")
    assert "'nobody-xyz/no-such-vae'" in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_bad_pretrained_directory_is_named(prepared: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    with pytest.raises(StageError, match=f"{missing}: directory not found"):
        encode.run(section("encode", codec="pretrained", pretrained=str(missing)), BASE, prepared, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageError, match=f"{tmp_path / 'empty' / 'config.json'}: not found"):
        encode.run(section("encode", codec="pretrained", pretrained=str(tmp_path / "empty")), BASE, prepared, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_inputs_are_named(prepared: Path, tmp_path: Path) -> None:
    params = section("encode", codec="identity")
    with pytest.raises(StageError, match=f"{tmp_path / 'nowhere'}: prepared-data directory not found"):
        encode.run(params, BASE, tmp_path / "nowhere", tmp_path / "out")
    (prepared / "manifest.json").unlink()
    with pytest.raises(StageError, match=f"{prepared / 'manifest.json'}: not found"):
        encode.run(params, BASE, prepared, tmp_path / "out")


def test_non_finite_latents_leave_existing_output_unchanged(prepared: Path, tmp_path: Path) -> None:
    vae = tiny_vae(in_channels=1)
    with torch.no_grad():
        vae.encoder.conv_in.weight.fill_(float("nan"))
    vae.save_pretrained(tmp_path / "nan-vae")
    out = tmp_path / "latents"
    out.mkdir()
    (out / "keep.txt").write_text("previous run")

    with pytest.raises(StageError, match="the train latents are not finite"):
        encode.run(section("encode", codec="pretrained", pretrained=str(tmp_path / "nan-vae")), BASE, prepared, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "previous run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latents", "nan-vae", "prepared"]  # no temporary leftovers


# --------------------------------------------------------------------------------------------------------------
# Params and CLI.


def test_params_round_trip_and_unknown_codec() -> None:
    params = resolve(default_raw(), overrides={"encode": {"codec": "identity", "channels": [16, 32], "latent_std": [5.27, 5.91, 4.21, 4.31]}}).encode
    assert params.channels == (16, 32) and params.latent_std == (5.27, 5.91, 4.21, 4.31)
    assert resolve(default_raw(), overrides={"encode": to_plain(params)}).encode == params
    with pytest.raises(StageError, match=r"encode\.codec: expected one of 'identity', 'train', 'pretrained'"):
        resolve(default_raw(), overrides={"encode": {"codec": "jpeg"}})
    with pytest.raises(StageError, match=r"encode\.latent_mean: expected 4 values"):
        resolve(default_raw(), overrides={"encode": {"latent_mean": [0.0]}})


def test_cli_summary_and_errors(prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params_file = tmp_path / "params.yaml"
    params_file.write_text(params_text("base: {device: cpu}\nencode: {codec: train}\nprofiles: {smoke: {encode: {steps: 2}}}\n"))
    argv = ["--params", str(params_file), "--data", str(prepared), "--out", str(tmp_path / "out"),
            "-S", "encode.codec=identity"]
    assert cli(encode.main, argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "encode: profile default; -S encode.codec=identity"  # first: what the stage runs with
    assert len(lines) == 2 and lines[1].startswith("encode: codec=identity latents 1×8×8")

    assert cli(encode.main, [*argv[:-2], "--profile", "smoke", "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["encode"]["steps"] == 2  # the resolved params, as YAML

    assert cli(encode.main, [*argv[:2], "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'nowhere'}: prepared-data directory not found (run the data stage first)"]

    with pytest.raises(SystemExit) as exit_:
        encode.main(["--help"])
    assert exit_.value.code == 0 and "--data" in capsys.readouterr().out


def test_an_autoencoder_with_pickled_weights_is_refused_without_unpickling(prepared: Path, tmp_path: Path) -> None:
    """diffusers would torch.load a diffusion_pytorch_model.bin; the project loads safetensors weights only."""
    import pickle

    tiny_vae().save_pretrained(tmp_path / "vae-bin", safe_serialization=False)
    weights = tmp_path / "vae-bin" / "diffusion_pytorch_model.bin"
    assert weights.is_file() and not list((tmp_path / "vae-bin").glob("*.safetensors"))
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    weights.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(StageError, match=r"cannot load an AutoencoderKL from safetensors weights"):
        encode.run(section("encode", codec="pretrained", pretrained=str(tmp_path / "vae-bin")), BASE, prepared,
                   tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_damaged_codec_description_is_one_error_line(tmp_path: Path) -> None:
    (tmp_path / "latents").mkdir()
    for text in ("{not json", '{"kind": "identity"}', "[1, 2]"):
        (tmp_path / "latents" / "codec.json").write_text(text)
        with pytest.raises(StageError, match=r"codec.json: not a codec description written by the encode stage"):
            load_codec(tmp_path / "latents")


def test_the_reconstruction_grid_takes_the_classes_in_turn() -> None:
    """The eval split of a sorted dataset starts with one class; the grid must still show every class."""
    from study.images import class_interleaved

    labels = [0] * 20 + [1] * 5 + [2] * 20
    picked = class_interleaved(labels, 7)
    assert [labels[i] for i in picked] == [0, 1, 2, 0, 1, 2, 0]
    assert picked == [0, 20, 25, 1, 21, 26, 2]  # split order within a class
    assert class_interleaved([-1] * 5, 3) == [0, 1, 2]  # unlabelled: split order
