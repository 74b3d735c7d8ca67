"""The student outside the pipeline: export it as a diffusers pipeline, or generate images from it.

  python -m pipeline export --scale cpu-s                          # -> exports/cpu-s (a diffusers pipeline folder)
  python -m pipeline generate --model artifacts/cpu-s/distill --steps 2 --n 64 --out generated/
  python -m pipeline generate --model exports/cpu-s --steps 1 --seed 1000000 --n 16 --out set1/
  python -m pipeline generate --model models:/scm-student-cpu-s@champion --n 16 --out registered/

``generate`` takes a model file or directory of this project (with its codec, ``--latents``), an exported pipeline
directory, or a registered MLflow model (``models:/name/version``, ``models:/name@alias``). Image i has seed
``--seed`` + i, as in the sample stage (seed set k is ``--seed k·10⁶``; a class-conditional image's label, unless
``--labels`` gives them, is drawn from its seed as there; ``--guidance`` is a guided student's s), so the same seed
gives the same image there and here: bit for bit with the stage's batches (``--batch-size`` = ``sample.batch_size``, 500 by default), else up to
one gray level on a few pixels (the VAE's float sums depend on the batch). It writes one PNG per image
(``seed<seed>.png``) and ``grid.png``; ``--out`` must not exist yet.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from scm.constants import T_MID
from scm.samplers import labels_from_seeds
from study.errors import StageError
from study.files import atomic_output_dir, check_paths
from study.images import save_grid
from study.progress import bar as progress_bar
from study.runtime import pick_device


def add_export_parser(sub: Any) -> None:
    p = sub.add_parser("export", help="write a distilled student as a diffusers pipeline directory",
                       description="Write the student of --scale (or --student) with its codec as a diffusers pipeline "
                                   "folder: SCMUNet2DModel + SCMScheduler (+ the VAE), safetensors only. Load it with "
                                   "study.export.load_pipeline(dir) or DiffusionPipeline.from_pretrained(dir, "
                                   "trust_remote_code=True).")
    p.add_argument("--scale", default=None, help="the student of this scale: artifacts/<scale>/distill")
    p.add_argument("--student", type=Path, default=None, help="a student model file or directory (instead of --scale)")
    p.add_argument("--latents", type=Path, default=Path("data/latents"), help="the encode stage's output (the codec)")
    p.add_argument("--t-mid", type=float, default=T_MID, help=f"the 2-step sampler's middle time (default {T_MID})")
    p.add_argument("--out", type=Path, default=None, help="the pipeline directory (default exports/<scale>)")


def add_generate_parser(sub: Any) -> None:
    p = sub.add_parser("generate", help="images from a student: PNGs and a grid, for people",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="a model file/directory, an exported pipeline directory, or models:/name/version|@alias")
    p.add_argument("--latents", type=Path, default=Path("data/latents"),
                   help="the codec for a model file or a registered model (default data/latents)")
    p.add_argument("--steps", type=int, default=2, help="sampling steps: 1, 2 (t_max, t_mid) or more (default 2)")
    p.add_argument("--t-mid", type=float, default=None, help=f"middle time of 2+ steps (default: the export's, or {T_MID})")
    p.add_argument("--n", type=int, default=16, help="images (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i has seed --seed + i (default 0)")
    p.add_argument("--labels", type=int, nargs="+", default=None,
                   help="class labels (one, or one per image) for a class-conditional model (default: each image's "
                        "label drawn from its seed, as the sample stage does)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale s of a student distilled with guidance (sCD, distill.guidance_max > 1); "
                        "within [1, guidance_max] (default: the network's s = 1)")
    p.add_argument("--batch-size", type=int, default=500, help="images per batch (default 500, as sample.batch_size)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--out", type=Path, required=True, help="output directory (must not exist)")


def add_convert_parser(sub: Any) -> None:
    p = sub.add_parser("convert-edm", help="read an EDM/EDM2 network pickle without running its code -> safetensors",
                       description="Read the network under --key of an EDM or EDM2 checkpoint pickle with a restricted "
                                   "unpickler (tensors and containers only; the pickled source code is never "
                                   "executed, any other global is refused) and write its state dict as safetensors, "
                                   "with the class name and constructor arguments in the metadata.")
    p.add_argument("pickle", type=Path, help="e.g. edm-cifar10-32x32-uncond-vp.pkl or edm2-img512-s-fid.pkl")
    p.add_argument("--key", default="ema", help="the network's key in the pickle (default ema)")
    p.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")


def convert_main(args: argparse.Namespace) -> int:
    from study.edm_pickles import convert

    check_paths(inputs={"pickle": args.pickle}, outputs={"--out": args.out})
    info = convert(args.pickle, args.out, args.key)
    print(f"convert-edm: {info['class_name']} ({info['parameters'] / 1e6:.1f} M parameters, {info['tensors']} tensors) "
          f"-> {args.out}")
    return 0


def export_main(args: argparse.Namespace) -> int:
    from study.export import export_pipeline

    if (args.scale is None) == (args.student is None):
        raise StageError("export: give exactly one of --scale and --student")
    student = args.student or Path("artifacts") / args.scale / "distill"
    out = args.out or Path("exports") / (args.scale or student.resolve().parent.name)
    check_paths(inputs={"--student": student, "--latents": args.latents}, outputs={"--out": out})
    export_pipeline(student, args.latents, out, t_mid=args.t_mid)
    print(f"export: {student} -> {out} (load: study.export.load_pipeline({str(out)!r}), or "
          f"DiffusionPipeline.from_pretrained({str(out)!r}, trust_remote_code=True))")
    return 0


def load_any(model: str, latents: Path, device: str, t_mid: float | None) -> Any:
    """An :class:`study.export.SCMPipeline` from any of the three kinds of ``--model``."""
    from study.export import build_pipeline, load_pipeline
    from study.fetch import fetch
    from study.models import MODEL_FILE

    if model.startswith(("models:/", "runs:/")):
        with tempfile.TemporaryDirectory(prefix="scm-generate-") as tmp:
            path = fetch(model, "", Path(tmp) / MODEL_FILE)
            pipe = build_pipeline(path, latents, t_mid=t_mid or T_MID, name=model)
    elif (Path(model) / "model_index.json").is_file():
        pipe = load_pipeline(Path(model))
        if t_mid is not None:
            pipe.register_to_config(t_mid=t_mid)
    elif Path(model).exists():
        pipe = build_pipeline(Path(model), latents, t_mid=t_mid or T_MID, name=model)
    else:
        raise StageError(f"--model {model}: not found (a model file or directory, an exported pipeline, or models:/...)")
    return pipe.to(device)


def generate_main(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.n < 1 or args.batch_size < 1:
        raise StageError("generate: --steps, --n and --batch-size must be >= 1")
    if args.seed < 0:
        raise StageError(f"generate: --seed must be >= 0, got {args.seed}")
    check_paths(inputs={}, outputs={"--out": args.out})
    if args.out.exists():
        raise StageError(f"--out {args.out}: exists; generate writes a new directory")
    device = pick_device(args.device)
    pipe = load_any(args.model, args.latents, device, args.t_mid)
    seeds = list(range(args.seed, args.seed + args.n))
    labels = _labels(args.labels, seeds, pipe.unet.num_classes)
    if args.guidance is not None and not pipe.unet.guidance_embedding:
        raise StageError("--guidance: the student has no guidance input (distilled with distill.guidance_max = 1)")

    images = []
    chunks = range(0, args.n, args.batch_size)
    for i in progress_bar(chunks, desc=f"generate {args.steps}-step", unit="batch", total=len(chunks)):
        part = seeds[i:i + args.batch_size]
        batch_labels = labels[i:i + args.batch_size] if labels is not None else None
        images.append(pipe(seeds=part, num_inference_steps=args.steps, class_labels=batch_labels,
                           guidance_scale=args.guidance, output_type="pt").images)
    images = torch.cat(images)

    from PIL import Image

    with atomic_output_dir(args.out) as tmp:
        width = len(str(seeds[-1]))
        for seed, image in zip(seeds, images):
            array = image.permute(1, 2, 0).numpy()
            Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(tmp / f"seed{seed:0{width}d}.png")
        save_grid(tmp / "grid.png", images, max(1, int(math.sqrt(args.n))))
    print(f"generate: {args.n} images, {args.steps}-step, seeds {seeds[0]}..{seeds[-1]} -> {args.out}/ (grid.png)")
    return 0


def _labels(labels: list[int] | None, seeds: list[int], num_classes: int) -> torch.Tensor | None:
    """The labels of ``seeds``' images: ``--labels`` as given, or each drawn from its seed like the sample stage's."""
    n = len(seeds)
    if num_classes == 0:
        if labels is not None:
            raise StageError("--labels: the model is unconditional (no class embedding)")
        return None
    if labels is None:
        return labels_from_seeds(seeds, num_classes)
    if len(labels) not in (1, n) or any(not 0 <= c < num_classes for c in labels):
        raise StageError(f"--labels: give one label or {n}, each in 0..{num_classes - 1}")
    return torch.tensor(labels * n if len(labels) == 1 else labels, dtype=torch.int64)
