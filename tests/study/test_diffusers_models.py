"""study/diffusers_models.py: a random-weight diffusers UNet2DModel saved with save_pretrained is a teacher through
``teacher.source``, its JVP equals the float64 finite difference, it round-trips through the model-file format, sCD
distils it for a few steps, and bad sources fail in one line."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from stages import distill, teacher
from study.diffusers_models import TrigFlowUNet2D, load_teacher
from study.errors import StageError
from study.models import load_model, save_model
from study.sampling import build_samplers, generate
from study.codec import load_codec
from study.export import export_pipeline, load_pipeline
from helpers import section, tiny_latents

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = (1, 8, 8)


def _unet(num_classes: int | None = None) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=8, num_class_embeds=num_classes)


def _save(folder, prediction="epsilon", layout="model", scheduler_cls=DDPMScheduler, **scheduler_kw):
    unet = _unet()
    scheduler = scheduler_cls(num_train_timesteps=1000, prediction_type=prediction, **scheduler_kw)
    if layout == "pipeline":
        DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(scheduler.config)).save_pretrained(folder)
    else:
        unet.save_pretrained(folder)
        scheduler.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_jvp_through_the_adapter_equals_the_float64_finite_difference(tmp_path, prediction):
    net = load_teacher(str(_save(tmp_path / "m", prediction)), "", data_shape=SHAPE, sigma_data=0.5, data_scale=1.0,
                       who="teacher.source").double()
    g = torch.Generator().manual_seed(0)
    x_hat = torch.randn(3, *SHAPE, generator=g, dtype=torch.float64)
    # t at mid-segment timesteps τ = k + 1/2, so a small step stays within one linear piece of the schedule.
    tau = torch.tensor([20.5, 300.5, 900.5], dtype=torch.float64)
    t = torch.atan(net.schedule.sigma(tau) / net.schedule.alpha(tau) / 0.5)
    dx = torch.randn(x_hat.shape, generator=g, dtype=torch.float64)

    # In x̂: as exact as float64 allows.
    _, tangent = torch.func.jvp(lambda x: net(x, t), (x_hat,), (dx,))
    h = 1e-6
    fd = (net(x_hat + h * dx, t) - net(x_hat - h * dx, t)) / (2 * h)
    assert (tangent - fd).abs().max() < 1e-6 * fd.abs().max()

    # In t: UNet2DModel's timestep embedding is float32 whatever the network's dtype, so the step moves τ by 0.01
    # (float32 resolves τ ≈ 900 to 6e-5: the difference quotient is good to ~1%), within τ's linear piece.
    _, tangent = torch.func.jvp(lambda tt: net(x_hat, tt), (t,), (torch.ones_like(t),))
    dtau_dt = torch.func.jvp(lambda tt: net.schedule.timestep(0.5 * torch.tan(tt)), (t,), (torch.ones_like(t),))[1]
    assert (dtau_dt > 1).all()  # the timestep moves with t: ∂/∂t reaches the network
    h = (0.01 / dtau_dt)[:, None, None, None]
    fd = (net(x_hat, t + h.flatten()) - net(x_hat, t - h.flatten())) / (2 * h)
    assert (tangent - fd).abs().max() < 2e-2 * fd.abs().max()


def test_model_file_round_trip_and_both_folder_layouts(tmp_path):
    for layout in ("model", "pipeline"):
        net = load_teacher(str(_save(tmp_path / layout, layout=layout, scheduler_cls=DDIMScheduler,
                                     rescale_betas_zero_snr=True, beta_schedule="scaled_linear")), "",
                           data_shape=SHAPE, sigma_data=0.5, data_scale=2.0, who="teacher.source")
        assert isinstance(net, TrigFlowUNet2D) and net.schedule.tau_max == 998  # zero terminal SNR
        path = tmp_path / f"{layout}.safetensors"
        save_model(path, net, {"role": "teacher", "scale": "cpu-xs", "latent_shape": list(SHAPE), "sigma_data": 0.5})
        back, meta = load_model(path, expect_shape=SHAPE, expect_scale="cpu-xs")
        assert meta["kind"] == "diffusers-unet2d" and meta["prediction"] == "eps" and meta["data_scale"] == 2.0
        x, t = torch.randn(2, *SHAPE), torch.tensor([0.3, 1.2])
        assert torch.equal(back(x, t), net.eval()(x, t))
        assert torch.equal(back.schedule.log_snr_table, net.schedule.log_snr_table)


def test_teacher_stage_converts_and_sCD_distils_through_it(tmp_path):
    latents = tiny_latents(tmp_path, "identity", latent_mean=[0.0], latent_std=[0.5])
    source = _save(tmp_path / "ddpm")
    base = section("base", scales=["cpu-xs"])
    params = section("teacher", source=str(source))
    m = teacher.run(params, base, "cpu-xs", latents, tmp_path / "teacher", tmp_path / "t.json", tmp_path / "t.csv",
                    progress=False)
    assert m["source"] == str(source)
    net, meta = load_model(tmp_path / "teacher", expect_shape=SHAPE, expect_scale="cpu-xs")
    assert isinstance(net, TrigFlowUNet2D) and meta["data_scale"] == 1.0  # std 0.5 = σ_d: the model's own [-1, 1]

    d = section("distill", method="scd", steps=3, batch_size=4, tangent_warmup_steps=2, log_every=1, checkpoint_every=0)
    m = distill.run(d, base, "cpu-xs", latents, tmp_path / "teacher", tmp_path / "student", tmp_path / "d.json",
                    tmp_path / "d.csv", progress=False)
    assert m["skipped_steps"] == 0 and m["final_r"] == 1.0
    student, _ = load_model(tmp_path / "student", expect_shape=SHAPE)
    assert isinstance(student, TrigFlowUNet2D)
    assert any(not torch.equal(a, b) for a, b in zip(student.state_dict().values(), net.state_dict().values()))
    samplers = build_samplers(section("sample", teacher_steps=2), 0.5, net, student)
    images = generate(samplers["scm2"], load_codec(latents), [0, 1], SHAPE, sigma_data=0.5, batch_size=2, device="cpu")
    assert images.shape == (2, *SHAPE) and images.dtype == torch.uint8

    # The student of a diffusers teacher exports like any other, and gives the same images.
    export_pipeline(tmp_path / "student", latents, tmp_path / "pipe")
    pipe = load_pipeline(tmp_path / "pipe")
    assert type(pipe.unet).__name__ == "SCMTrigFlowUNet2DModel"
    assert torch.equal(pipe(seeds=[0, 1], num_inference_steps=2, output_type="pt").images, images)
    from pipeline.cli import main
    assert main(["generate", "--model", str(tmp_path / "student"), "--latents", str(latents), "--n", "2",
                 "--out", str(tmp_path / "generated")]) == 0
    assert (tmp_path / "generated" / "grid.png").is_file()


def test_the_codec_must_scale_every_channel_alike(tmp_path):
    latents = tiny_latents(tmp_path, "identity")  # measured mean and std: not one scalar
    params = section("teacher", source=str(_save(tmp_path / "ddpm")))
    with pytest.raises(StageError, match=r"^teacher.source='.*ddpm': a diffusers teacher needs one scalar data scaling"):
        teacher.run(params, section("base"), "cpu-xs", latents, tmp_path / "out", tmp_path / "t.json",
                    tmp_path / "t.csv", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case,message", [
    ("not-diffusers", "not a diffusers model"),
    ("prediction", "prediction_type 'flow' is not supported (accepted: epsilon, v_prediction, sample)"),
    ("size", "the model takes 1×8×8 samples (1 output channels), but the data are 3×8×8"),
    ("class", "a 'UNet2DConditionModel', but only UNet2DModel teachers are supported"),
    ("hub-offline", "hub repository someone/ddpm-nowhere unavailable: offline"),
])
def test_bad_sources_fail_in_one_line(tmp_path, monkeypatch, case, message):
    shape = SHAPE
    source = str(_save(tmp_path / "m"))
    if case == "not-diffusers":
        source = str(tmp_path / "m" / "empty")
        (tmp_path / "m" / "empty" / "unet").mkdir(parents=True)
        (tmp_path / "m" / "empty" / "unet" / "x.json").write_text("{}")
    elif case == "prediction":
        cfg = json.loads((tmp_path / "m" / "scheduler_config.json").read_text())
        (tmp_path / "m" / "scheduler_config.json").write_text(json.dumps({**cfg, "prediction_type": "flow"}))
    elif case == "size":
        shape = (3, 8, 8)
    elif case == "class":
        cfg = json.loads((tmp_path / "m" / "config.json").read_text())
        (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "_class_name": "UNet2DConditionModel"}))
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        source = "someone/ddpm-nowhere"
    with pytest.raises(StageError) as e:
        load_teacher(source, "", data_shape=shape, sigma_data=0.5, data_scale=1.0, who=f"teacher.source={source!r}")
    assert str(e.value).startswith(f"teacher.source={source!r}: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_teacher_source_ddpm_trains_a_unet2dmodel_with_diffusers_recipe(tmp_path):
    latents = tiny_latents(tmp_path, "train")  # the standardised latents of a trained codec, any per-channel scaling
    shape = tuple(load_codec(latents).latent_shape)
    params = section("teacher", source="ddpm", steps=4, batch_size=8, lr_warmup_steps=1, log_every=1,
                     checkpoint_every=0, adaptive_weight=False)
    base = section("base", scales=["cpu-xs"])
    m = teacher.run(params, base, "cpu-xs", latents, tmp_path / "teacher", tmp_path / "t.json", tmp_path / "t.csv",
                    progress=False)
    folder = tmp_path / "teacher" / "diffusers"
    assert json.loads((folder / "config.json").read_text())["_class_name"] == "UNet2DModel"
    assert json.loads((folder / "scheduler_config.json").read_text())["beta_schedule"] == "linear"
    assert (folder / "diffusion_pytorch_model.safetensors").is_file()
    net, meta = load_model(tmp_path / "teacher", expect_shape=shape, expect_scale="cpu-xs")
    assert meta["source"] == "ddpm" and meta["data_scale"] == 2.0 and m["final_loss"] > 0  # ε-MSE, x0/σ_d
    # The converted teacher is the saved UNet2DModel behind the adapter: ε-prediction at the fractional timestep.
    unet = UNet2DModel.from_pretrained(folder, use_safetensors=True, low_cpu_mem_usage=False).eval()
    x_hat, t = torch.randn(2, *shape), torch.tensor([0.4, 1.3])
    tau = net.schedule.timestep(2.0 * 0.5 * torch.tan(t))
    a, b = net.schedule.alpha(tau)[:, None, None, None], net.schedule.sigma(tau)[:, None, None, None]
    x_prime = a * 2.0 * (0.5 * x_hat) / torch.cos(t)[:, None, None, None]
    with torch.no_grad():
        x0 = (x_prime - b * unet(x_prime, tau).sample) / a / 2.0
        F = (torch.cos(t)[:, None, None, None] * 0.5 * x_hat - x0) / torch.sin(t)[:, None, None, None] / 0.5
        assert torch.allclose(net(x_hat, t), F, atol=1e-5)


def test_ddpm_unet_refuses_latents_it_cannot_halve():
    from study.diffusers_models import ddpm_unet

    with pytest.raises(StageError, match=r"^teacher.source='ddpm': a UNet2DModel of scale cpu-s halves the resolution "
                                         r"1 time\(s\) and needs sizes divisible by 2, but the latents are 7×7"):
        ddpm_unet("cpu-s", (4, 7, 7))
