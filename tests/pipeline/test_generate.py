"""``python -m pipeline export`` and ``generate``: the same seed gives the sample stage's image from a model file, an
exported pipeline and a model registered in a real MLflow store; bad input fails in one line and writes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cli import main
from study.codec import load_codec
from study.sampling import seeds_of
from helpers import stage_images, tiny_latents, tiny_student

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("generate")
    latents = tiny_latents(tmp, "train")
    student = tiny_student(tmp, tuple(load_codec(latents).latent_shape))
    return tmp, latents, student


def _read(out, seeds) -> torch.Tensor:
    width = len(str(seeds[-1]))
    arrays = [np.asarray(Image.open(out / f"seed{s:0{width}d}.png")) for s in seeds]
    return torch.from_numpy(np.stack(arrays))[:, None]  # grayscale (N, 1, H, W)


@pytest.mark.parametrize("steps,method", [(1, "scm1"), (2, "scm2")])
def test_a_model_file_and_its_export_give_the_sample_stage_images(run_dir, steps, method, capsys):
    tmp, latents, student = run_dir
    seeds = seeds_of(1, 5)  # seed set 1: --seed 1000000
    expected = stage_images(latents, student, seeds, method)
    out = tmp / f"from-file-{steps}"
    assert main(["generate", "--model", str(student), "--latents", str(latents), "--steps", str(steps), "--n", "5",
                 "--seed", str(seeds[0]), "--batch-size", "3", "--out", str(out)]) == 0
    assert torch.equal(_read(out, seeds), expected)
    assert (out / "grid.png").is_file() and len(list(out.glob("seed*.png"))) == 5

    exported = tmp / f"export-{steps}"
    assert main(["export", "--student", str(student), "--latents", str(latents), "--out", str(exported)]) == 0
    assert "trust_remote_code=True" in capsys.readouterr().out
    out = tmp / f"from-export-{steps}"
    assert main(["generate", "--model", str(exported), "--steps", str(steps), "--n", "5", "--seed", str(seeds[0]),
                 "--batch-size", "3", "--out", str(out)]) == 0
    assert torch.equal(_read(out, seeds), expected)
    # Other batches: the VAE's float sums differ, by at most one gray level on a few pixels.
    out = tmp / f"from-export-{steps}-one-batch"
    assert main(["generate", "--model", str(exported), "--steps", str(steps), "--n", "5", "--seed", str(seeds[0]),
                 "--out", str(out)]) == 0
    diff = (_read(out, seeds).int() - expected.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.02


def test_a_registered_mlflow_model_gives_the_same_images(run_dir, monkeypatch):
    from mlflow import MlflowClient

    tmp, latents, student = run_dir
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = c.create_experiment("students", artifact_location=(tmp / "mlartifacts").as_uri())
    run = c.create_run(exp)
    c.log_artifact(run.info.run_id, str(student / "model.safetensors"), "student")
    c.create_registered_model("scm-student-tiny")
    c.create_model_version("scm-student-tiny", source=f"runs:/{run.info.run_id}/student", run_id=run.info.run_id)
    c.set_registered_model_alias("scm-student-tiny", "champion", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp / "from-registry"
    assert main(["generate", "--model", "models:/scm-student-tiny@champion", "--latents", str(latents), "--n", "3",
                 "--batch-size", "3", "--out", str(out)]) == 0
    assert torch.equal(_read(out, [0, 1, 2]), stage_images(latents, student, [0, 1, 2], "scm2"))


@pytest.mark.parametrize("args,message", [
    (["--model", "{tmp}/nothing"], "--model {tmp}/nothing: not found"),
    (["--model", "{student}", "--labels", "3"], "--labels: the model is unconditional"),
    (["--model", "{student}", "--steps", "0"], "generate: --steps, --n and --batch-size must be >= 1"),
    (["--model", "{student}", "--out", "{tmp}"], "--out {tmp}: exists"),
    (["--model", "{tmp}/prepared/manifest.json"], "not a readable safetensors model file"),
])
def test_bad_input_is_one_line_and_writes_nothing(run_dir, args, message, capsys):
    tmp, latents, student = run_dir
    fill = lambda s: s.format(tmp=tmp, student=student)
    argv = ["generate", "--latents", str(latents), "--out", str(tmp / "bad"), *map(fill, args)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and fill(message) in err and "\n" not in err
    assert not (tmp / "bad").exists()
