"""study/export.py: a student written as a diffusers pipeline gives the sample stage's images, bit for bit on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline

from study.codec import load_codec
from study.errors import StageError
from study.export import export_pipeline, load_pipeline
from study.sampling import seeds_of
from helpers import stage_images, tiny_latents, tiny_student

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("export")
    latents = tiny_latents(tmp, "train")
    student = tiny_student(tmp, tuple(load_codec(latents).latent_shape))
    export_pipeline(student, latents, tmp / "pipe", t_mid=1.1)
    return latents, student, tmp / "pipe"


def test_the_directory_is_a_diffusers_pipeline_of_safetensors(exported):
    _, _, pipe_dir = exported
    index = json.loads((pipe_dir / "model_index.json").read_text())
    assert index["_class_name"] == ["scm_pipeline", "SCMPipeline"]
    assert index["unet"] == ["study.export", "SCM" + "UNet2DModel"] and index["scheduler"] == ["diffusers", "SCMScheduler"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert (pipe_dir / "unet/diffusion_pytorch_model.safetensors").is_file()
    assert (pipe_dir / "vae/diffusion_pytorch_model.safetensors").is_file()
    assert not list(pipe_dir.rglob("*.bin")) and not list(pipe_dir.rglob("*.pt"))
    scheduler = json.loads((pipe_dir / "scheduler/scheduler_config.json").read_text())
    assert scheduler["sigma_data"] == 0.5 and scheduler["prediction_type"] == "trigflow"


@pytest.mark.parametrize("steps,method", [(1, "scm1"), (2, "scm2")])
def test_diffusion_pipeline_from_pretrained_gives_the_samplestage_images(exported, steps, method):
    latents, student, pipe_dir = exported
    # The directory names its pipeline class in a one-line local module; diffusers runs it only when trusted.
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(pipe_dir)
    pipe = DiffusionPipeline.from_pretrained(pipe_dir, trust_remote_code=True, low_cpu_mem_usage=False)
    assert type(pipe).__name__ == "SCMPipeline"
    seeds = seeds_of(2, 5)
    expected = stage_images(latents, student, seeds, method)  # in batches of 3, as the pipeline is called here
    images = torch.cat([pipe(seeds=seeds[i:i + 3], num_inference_steps=steps, output_type="pt").images for i in (0, 3)])
    assert images.dtype == torch.uint8 and images.shape == expected.shape == (5, 1, 8, 8)
    assert torch.equal(images, expected)
    assert images.float().std() > 0  # not a constant image


def test_times_are_the_projects_and_other_step_counts_run(exported):
    _, _, pipe_dir = exported
    pipe = load_pipeline(pipe_dir)
    t_max = pipe.times(1)[0]
    assert t_max == pytest.approx(1.5645, abs=1e-4) and pipe.times(2) == [t_max, 1.1, 0.0]
    four = pipe(seeds=[0, 1], num_inference_steps=4, output_type="pt").images
    assert four.shape == (2, 1, 8, 8)
    assert pipe.scheduler.timesteps.tolist() == pytest.approx(pipe.times(4))
    # The diffusers convention (a generator, the scheduler's own noise) is deterministic in the generator.
    a = pipe(batch_size=3, generator=torch.Generator().manual_seed(7), output_type="np").images
    b = pipe(batch_size=3, generator=torch.Generator().manual_seed(7), output_type="np").images
    assert a.shape == (3, 8, 8, 1) and (a == b).all() and 0 <= a.min() and a.max() <= 1
    pil = pipe(seeds=[0], num_inference_steps=1).images
    assert pil[0].size == (8, 8)


def test_a_pixel_model_exports_without_a_vae(tmp_path):
    latents = tiny_latents(tmp_path, "identity")
    student = tiny_student(tmp_path, (1, 8, 8))
    export_pipeline(student, latents, tmp_path / "pipe")
    assert not (tmp_path / "pipe/vae").exists()
    pipe = load_pipeline(tmp_path / "pipe")
    seeds = [5, 6]
    assert torch.equal(pipe(seeds=seeds, output_type="pt").images, stage_images(latents, student, seeds, "scm2"))


def test_a_student_of_another_shape_is_refused_and_nothing_is_written(tmp_path, exported):
    latents, _, _ = exported
    student = tiny_student(tmp_path, (3, 5, 5))
    with pytest.raises(StageError, match=r"student: a model of latent shape \[3, 5, 5\], but the codec"):
        export_pipeline(student, latents, tmp_path / "pipe")
    assert not (tmp_path / "pipe").exists()
    with pytest.raises(StageError, match=r"not an exported pipeline directory"):
        load_pipeline(tmp_path)


def test_loading_runs_nothing_from_the_directory(tmp_path, exported):
    """load_pipeline reads weights and configs only: a planted scm_pipeline.py payload never runs."""
    import shutil

    _, _, pipe_dir = exported
    copy = tmp_path / "copy"
    shutil.copytree(pipe_dir, copy)
    marker = tmp_path / "ran"
    (copy / "scm_pipeline.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nfrom study.export import SCMPipeline\n")
    pipe = load_pipeline(copy)
    assert pipe(seeds=[0], num_inference_steps=1, output_type="pt").images.shape == (1, 1, 8, 8)
    assert not marker.exists()
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(StageError, match=r"copy: cannot load the exported pipeline \(model_index.json names the "
                                         r"pipeline 'StableDiffusionPipeline', not an sCM export\)"):
        load_pipeline(copy)


@pytest.mark.parametrize("scale", ["S", "ddpmpp"])
def test_a_student_of_the_papers_networks_exports_and_gives_the_samplestage_images(tmp_path, scale):
    from scm import networks
    from study.models import save_model

    latents = tiny_latents(tmp_path, "identity")
    torch.manual_seed(1)
    net = networks.build(networks.network_config(scale, in_channels=1, model_channels=8)).eval()
    with torch.no_grad():
        for p in net.parameters():  # EDM2's output gain starts at 0, DDPM++'s last layers near 0
            p.add_(0.05 * torch.randn_like(p))
    student = tmp_path / "student"
    student.mkdir()
    save_model(student / "model.safetensors", net, {"role": "student-sct", "scale": scale, "latent_shape": [1, 8, 8],
                                                    "sigma_data": 0.5})
    index = export_pipeline(student, latents, tmp_path / "pipe")
    assert index["unet"] == ["study.export", "SCMNetworkModel"]
    pipe = load_pipeline(tmp_path / "pipe")
    seeds = [5, 6, 7]
    for steps, method in ((1, "scm1"), (2, "scm2")):
        images = pipe(seeds=seeds, num_inference_steps=steps, output_type="pt").images
        assert torch.equal(images, stage_images(latents, student, seeds, method))
        assert images.float().std() > 0
