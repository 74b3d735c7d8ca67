"""The paper's networks through the training stages: each GPU preset's teacher and distill recipe (its network
family, optimiser, schedule, EMA, per-scale values and dropout levels), shrunk only in size, trains on CPU and
writes model files that load back as the same network."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scm import networks
from stages import distill, teacher
from study.files import REPO_ROOT
from study.models import load_model, read_model_meta
from study.params import load
from helpers import write_latents

SHRINK = ["base.device=cpu", "base.precision=fp32", "base.width=8", "base.checkpoint_dir=''", "teacher.steps=3",
          "teacher.batch_size=4", "teacher.log_every=1", "distill.steps=3", "distill.batch_size=4",
          "distill.log_every=1", "distill.tangent_warmup_steps=2"]


@pytest.mark.rehearsal  # each preset's recipe at its own scale (L, XXL): make rehearse (and CI), not make test
@pytest.mark.parametrize("profile, scale, kind", [("imagenet64-gpu", "L", "mpunet"), ("imagenet512-gpu", "XXL", "mpunet"),
                                                   ("cifar10-gpu", "ddpmpp", "ddpmpp")])
def test_a_preset_recipe_trains_its_network_on_cpu(tmp_path: Path, profile: str, scale: str, kind: str):
    latents = write_latents(tmp_path / "latents", shape=(3, 16, 16), n_train=8, n_eval=4)
    p = load(REPO_ROOT / "params.yaml", profile, SHRINK + [f"base.scales=[{scale}]"]).at(scale)
    out = {name: (tmp_path / name, tmp_path / f"{name}.json", tmp_path / f"{name}.csv") for name in ("teacher", "distill")}

    t = teacher.run(p.teacher, p.base, scale, latents, *out["teacher"], progress=False)
    net, meta = load_model(out["teacher"][0], expect_scale=scale)
    assert meta["kind"] == kind and networks.kind_of(net) == kind and net.cfg.model_channels == 8
    assert t["n_params"] == networks.count_params(net)

    d = distill.run(p.distill, p.base, scale, latents, out["teacher"][0], *out["distill"], progress=False)
    student, meta = load_model(out["distill"][0], expect_scale=scale)
    assert networks.kind_of(student) == kind and read_model_meta(out["distill"][0] / "model.safetensors")["role"] == f"student-{p.distill.method}"
    assert d["final_loss"] == d["final_loss"]  # finite (NaN != NaN)
    # The student moved away from its teacher, and both give finite outputs.
    moved = [not torch.equal(a, b) for a, b in zip(net.state_dict().values(), student.state_dict().values())]
    assert any(moved)
    x = torch.randn(2, 3, 16, 16)
    assert torch.isfinite(student(x, torch.full((2,), 1.0))).all()
    # The resolved per-scale values are what the stage trained with (the learning-rate column of its curve).
    lrs = [float(line.split(",")[4]) for line in out["distill"][2].read_text().splitlines()[1:]]
    assert max(lrs) <= p.distill.lr
    # Class conditioning: the ImageNet presets' networks take the data's 10 classes; CIFAR-10's none.
    assert networks.num_classes(net) == networks.num_classes(student) == (10 if p.base.conditional else 0)
    assert networks.has_guidance_embedding(student) == (p.distill.guidance_max > 1)


def test_the_imagenet512_recipe_is_class_conditional_and_guided_from_teacher_to_samples(tmp_path: Path):
    """ImageNet 512's recipe end to end on CPU, shrunk in size only: a conditional teacher with label dropout, sCD
    of its guided ODE at s ~ U[1, 2] into a student with a guidance input, and samples with per-seed labels and the
    Table 6 guidance of each sampler (S: teacher 1.4, 1-step 1.5, 2-step 1.4)."""
    import json

    from safetensors.torch import load_file

    from scm.samplers import labels_from_seeds
    from stages import sample

    latents = write_latents(tmp_path / "latents", shape=(3, 16, 16), n_train=8, n_eval=4)
    p = load(REPO_ROOT / "params.yaml", "imagenet512-gpu",
             SHRINK + ["base.scales=[S]", "sample.num_samples=4", "sample.seed_sets=1", "sample.teacher_steps=2",
                       "sample.batch_size=4", "sample.grid_size=4", "evaluate.kid_subset_size=2"]).at("S")
    assert (p.teacher.label_dropout, p.distill.guidance_max) == (0.1, 2.0)
    dirs = {name: (tmp_path / name, tmp_path / f"{name}.json", tmp_path / f"{name}.csv") for name in ("teacher", "distill")}
    teacher.run(p.teacher, p.base, "S", latents, *dirs["teacher"], progress=False)
    distill.run(p.distill, p.base, "S", latents, dirs["teacher"][0], *dirs["distill"], progress=False)
    student, meta = load_model(dirs["distill"][0])
    assert networks.has_guidance_embedding(student) and meta["guidance_max"] == 2.0
    assert student.emb_guidance_gain.item() != 0  # the guidance input was trained (it starts at 0)

    info = sample.run(p.sample, p.base, "S", latents, dirs["teacher"][0], dirs["distill"][0], tmp_path / "samples",
                      progress=False)
    assert info["num_classes"] == 10 and info["guidance"] == {"teacher": 1.4, "scm1": 1.5, "scm2": 1.4}
    stored = load_file(str(tmp_path / "samples" / "samples.safetensors"))
    assert torch.equal(stored["labels_s0"], labels_from_seeds(stored["seeds_s0"].tolist(), 10))
    assert json.loads((tmp_path / "samples" / "sampling.json").read_text())["guidance"]["scm1"] == 1.5

    # `generate` (the exported pipeline) gives the stage's images of the same seeds: labels from the seeds, guidance.
    from pipeline.generate import _labels
    from study.export import build_pipeline

    pipe = build_pipeline(dirs["distill"][0], latents, t_mid=p.sample.t_mid, name="student")
    seeds = stored["seeds_s0"].tolist()
    for steps, key, s in ((1, "scm1_s0", 1.5), (2, "scm2_s0", 1.4)):
        images = pipe(seeds=seeds, num_inference_steps=steps, class_labels=_labels(None, seeds, 10), guidance_scale=s,
                      output_type="pt").images
        assert torch.equal(images, stored[key]), key


def test_dropout_levels_reach_the_student():
    torch.manual_seed(0)
    net = networks.build(networks.network_config("S", in_channels=3, model_channels=8))
    student = distill.student_from_teacher(net, 0.45, seed=0, levels=(2, 3))
    rates = {name: m.dropout.p for name, m in [*student.enc.items(), *student.dec.items()] if hasattr(m, "dropout")}
    assert {r for name, r in rates.items() if name.startswith(("l2", "l3"))} == {0.45}
    assert {r for name, r in rates.items() if name.startswith(("l0", "l1"))} == {0.0}
    unet = networks.build(networks.network_config("cpu-xs", in_channels=3))
    with pytest.raises(Exception, match="distill.dropout_levels: dropout at chosen levels needs EDM2's U-Net"):
        distill.student_from_teacher(unet, 0.2, seed=0, levels=(1,))


@pytest.mark.parametrize("scale", ["cpu-xs", "S"])
def test_a_guided_student_starts_as_its_teacher_at_every_guidance_scale(scale: str):
    torch.manual_seed(0)
    net = networks.build(networks.network_config(scale, in_channels=3, num_classes=4, model_channels=8))
    with torch.no_grad():
        for p in net.parameters():  # non-zero outputs (the output layers start at zero)
            p.add_(0.05 * torch.randn_like(p)) if p.ndim else p.fill_(1.0)
    student = distill.student_from_teacher(net, 0.0, seed=0, guidance=True).eval()
    assert networks.has_guidance_embedding(student) and not networks.has_guidance_embedding(net)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 1.2]), torch.tensor([1, 4])
    with torch.no_grad():
        expected = net.eval()(x, t, y)
        assert expected.abs().max() > 0
        for s in (1.0, 1.7, 2.0):
            assert torch.equal(student(x, t, y, guidance=torch.full((2,), s)), expected)
    ddpmpp = networks.build(networks.network_config("ddpmpp", in_channels=3, model_channels=8))
    with pytest.raises(Exception, match="distill.guidance_max: a ddpmpp network has no guidance embedding"):
        distill.student_from_teacher(ddpmpp, 0.0, seed=0, guidance=True)
