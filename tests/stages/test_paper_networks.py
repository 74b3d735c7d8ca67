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
