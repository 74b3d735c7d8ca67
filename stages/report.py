"""Report stage: every scale's numbers in one place, under ``reports/<profile>/``.

Consumes ``metrics/<scale>/{teacher,distill,evaluate}.json``, ``plots/<scale>/*_history.csv`` and the sample grids.
Produces, in ``reports/<profile>/`` (only ``reports/default`` is committed): ``summary.json`` (one entry per scale),
``report.md``, ``fid_vs_params.png`` (the paper's scaling figure at our scale: FID against parameter count for the
teacher and sCM, and every ratio), ``loss_curves.png`` (with the tangent warm-up's r), ``samples/<scale>.png`` (real |
teacher | sCM 1-step | sCM 2-step grids side by side, labelled with the NFE and fid_clf; the real panel when the
prepared data is given) and ``curves/*.csv`` (the tables ``dvc plots show`` draws).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path
from typing import Any

from study import layout
from study.cli import add_params_args, cli, load_args
from study.errors import StageError
from study.files import atomic_output_dir, check_paths, git_commit, write_json, write_provenance
from study.images import class_interleaved, decode_split, save_grid
from study.params import BaseParams, ReportParams, to_plain

STAGES = ("teacher", "distill", "evaluate")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise StageError(f"{path}: not found (run the pipeline up to evaluate for this scale)")
    try:
        metrics = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StageError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(metrics, dict):
        raise StageError(f"{path}: expected a JSON object of metrics")
    return metrics


def _read_csv(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def summarise(scale: str, metrics_dir: Path) -> dict[str, Any]:
    """One scale's entry of ``summary.json``, from the metrics files of its stages."""
    m = {s: _read_json(layout.metrics_file(scale, s, metrics_dir)) for s in STAGES}
    ev = m["evaluate"]
    each = lambda key, methods=layout.METHODS: {k: ev.get(key(k)) for k in methods}
    return {
        "scale": scale,
        "n_params": m["teacher"]["n_params"],
        "distill_method": m["distill"].get("method"),
        "teacher_nfe": ev.get(layout.nfe("teacher")),
        "nfe": each(layout.nfe),
        "clf_accuracy": ev.get("clf_accuracy"),
        "fid_clf": each(lambda k: layout.metric("fid_clf", k), (*layout.METHODS, "recon")),
        "fid_clf_std": each(lambda k: layout.metric_std("fid_clf", k)),
        "fid_clf_ratio": each(layout.ratio, layout.STUDENTS),
        "clf2_accuracy": ev.get("clf2_accuracy"),
        **{key: value for space in layout.FEATURE_SPACES[1:] for key, value in space_entry(ev, space).items()},
        "sec_per_image": {**each(lambda k: layout.metric("sec_per_image", k)), "decoder": ev.get("decoder_sec_per_image")},
        "speedup": each(layout.speedup, layout.STUDENTS),
        "speedup_fraction_of_nfe_ratio": each(lambda k: f"{layout.speedup(k)}_fraction_of_nfe_ratio", layout.STUDENTS),
        "wall_seconds": {s: m[s].get("wall_seconds") for s in STAGES},
    }


def space_entry(ev: dict[str, Any], space: str) -> dict[str, Any]:
    """A feature space's Fréchet distances (with ``status`` for the detectors), spreads and ratios in ``summary.json``."""
    fd = layout.fd(space)
    values = {k: ev.get(layout.metric(fd, k)) for k in (*layout.METHODS, "recon")}
    if space in ("inception", "dinov2"):
        values["status"] = ev.get(f"{space}_status")
    return {fd: values, f"{fd}_std": {k: ev.get(layout.metric_std(fd, k)) for k in layout.METHODS},
            f"{fd}_ratio": {k: ev.get(layout.ratio(k, space)) for k in layout.STUDENTS}}


def plot_scaling(entries: list[dict[str, Any]], path: Path) -> None:
    """Left: fid_clf of each method against parameters. Right: each student's ratio to the teacher in every feature
    space that was scored, with the paper's 2-step target (1.10)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    fig, (ax, ax_ratio) = plt.subplots(1, 2, figsize=(11, 4))
    n = [e["n_params"] / 1e6 for e in entries]
    for key, label, style in (("teacher", "teacher (ODE)", "o-"), ("scm1", "sCM 1-step", "s--"), ("scm2", "sCM 2-step", "^-")):
        y = [e["fid_clf"][key] for e in entries]
        err = [e["fid_clf_std"].get(key) or 0 for e in entries]
        ax.errorbar(n, y, yerr=err, fmt=style, capsize=3, label=label)
    ax.set_ylabel("FID (classifier features, fid_clf)")
    ax.set_title("Sample quality against model size")
    for i, space in enumerate(layout.FEATURE_SPACES):  # one colour per space; solid 2-step, dashed 1-step
        fd = layout.fd(space)
        for method, style in (("scm2", "^-"), ("scm1", "s--")):
            ratios = [e.get(f"{fd}_ratio", {}).get(method) for e in entries]
            if all(r is not None for r in ratios):
                ax_ratio.plot(n, ratios, style, color=f"C{i}", label=f"{fd}, {method[-1]}-step")
    ax_ratio.axhline(1.10, color="gray", linestyle=":", label="2-step target 1.10")
    ax_ratio.axhline(1.0, color="black", linewidth=0.5)
    ax_ratio.set_ylabel("student FD / teacher FD")
    ax_ratio.set_title("Ratio to the teacher, per feature space")
    for a in (ax, ax_ratio):
        a.set_xscale("log")
        a.xaxis.set_major_locator(FixedLocator(n))  # one tick per scale, labelled in plain numbers
        a.xaxis.set_minor_locator(NullLocator())
        a.set_xticklabels([f"{e['scale']}\n{v:.2f} M" for e, v in zip(entries, n)])
        a.set_xlabel("parameters")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_losses(histories: dict[str, dict[str, list[dict[str, float]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, stage in zip(axes, ("teacher", "distill")):
        for scale, h in histories.items():
            rows = [r for r in h[stage] if "loss" in r]
            if rows:
                ax.plot([r["kimg"] for r in rows], [r.get("mse", r["loss"]) for r in rows], label=scale)
        ax.set_title(f"{stage}: " + ("diffusion MSE (F-space)" if stage == "teacher" else "sCM ‖F − F⁻ − g‖²/D"))
        ax.set_xlabel("thousands of images")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
        warmup = next(([r for r in h[stage] if "r" in r] for h in histories.values() if stage == "distill"), [])
        if warmup:  # the loss grows with the tangent warm-up's r (paper §4.2): not a divergence
            ax_r = ax.twinx()
            ax_r.plot([r["kimg"] for r in warmup], [r["r"] for r in warmup], color="gray", linestyle=":", label="r")
            ax_r.set_ylim(0, 1.05)
            ax_r.set_ylabel("tangent warm-up r (dotted)")
            ax_r.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


PANEL_LABELS = {"teacher": "teacher", "scm1": "sCM 1-step", "scm2": "sCM 2-step"}
GRID_PAD = 2  # the sample stage's grids: save_grid's default padding


def write_curves(histories: dict[str, dict[str, list[dict[str, float]]]], entries: list[dict[str, Any]], out: Path) -> None:
    """``curves/{teacher,distill}.csv`` (every scale's training curve in one long table, a ``scale`` column) and
    ``curves/scaling.csv`` (fid_clf per method against parameters): what ``dvc.yaml``'s top-level plots overlay."""
    out.mkdir(parents=True, exist_ok=True)
    for stage, columns in (("teacher", ("kimg", "mse")), ("distill", ("kimg", "mse", "r"))):
        with open(out / f"{stage}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(("scale", *columns))
            for scale, h in histories.items():
                for row in h[stage]:
                    if all(c in row for c in columns):
                        writer.writerow((scale, *(f"{row[c]:.6g}" for c in columns)))
    with open(out / "scaling.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("scale", "params_M", *(f"fid_clf_{m}" for m in layout.METHODS)))
        for e in entries:
            writer.writerow((e["scale"], f"{e['n_params'] / 1e6:.4g}", *(f"{e['fid_clf'][m]:.6g}" for m in layout.METHODS)))


def real_grid(prepared_dir: Path, like: Path, out: Path) -> None:
    """Held-out images, the classes in turn, in a grid of the same geometry as the sample grid ``like``."""
    from PIL import Image

    pixels, labels = decode_split(prepared_dir, "eval")  # (N, H, W, C); no torch in this stage
    h, w = pixels.shape[1:3]
    with Image.open(like) as grid:
        width, height = grid.size
    columns, rows = (width - GRID_PAD) // (w + GRID_PAD), (height - GRID_PAD) // (h + GRID_PAD)
    picked = class_interleaved(labels.tolist(), columns * rows)
    save_grid(out, pixels[picked].transpose(0, 3, 1, 2), columns, pad=GRID_PAD)


def side_by_side(panels: list[tuple[Path, str]], path: Path, zoom: int = 2) -> None:
    """The grids next to each other, enlarged ``zoom`` times, each under its label."""
    from PIL import Image, ImageDraw, ImageFont

    images = [Image.open(g).convert("RGB") for g, _ in panels]
    images = [im.resize((im.width * zoom, im.height * zoom), Image.Resampling.NEAREST) for im in images]
    pad, header = 8, 22
    font = ImageFont.load_default(size=14)
    canvas = Image.new("RGB", (sum(i.width for i in images) + pad * (len(images) - 1), header + max(i.height for i in images)), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for im, (_, label) in zip(images, panels):
        draw.text((x + 2, 3), label, fill="black", font=font)
        canvas.paste(im, (x, header))
        x += im.width + pad
    canvas.save(path)


TARGETS = {"scm1": 1.5, "scm2": 1.10}  # the quality targets of the study: student fid_clf / teacher fid_clf


def verdict(ratio: float | None, method: str) -> str:
    """``1.07 ✓`` or ``1.62 ✗`` against the study's target for ``method``; ``n/a`` when not scored."""
    return "n/a" if ratio is None else f"{ratio:.2f} {'✓' if ratio <= TARGETS[method] else '✗'}"


def machine() -> str:
    """The machine in one line: OS, architecture, CPU count, Python and torch versions (torch is not imported)."""
    import os
    import platform
    from importlib import metadata

    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = "n/a"
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"torch {torch}")


def markdown(entries: list[dict[str, Any]], title: str, recon_grid: bool = False, real_panel: bool = False,
             provenance: str = "") -> str:
    f = lambda v, d=2: "n/a" if v is None else f"{v:.{d}f}"
    accuracy = entries[0].get("clf_accuracy") if entries else None
    clf = f"a classifier with {accuracy:.1%} held-out accuracy" if accuracy is not None else "a classifier"
    lines = [f"# {title}", "", f"FID in the feature space of {clf} (`fid_clf`, mean ± std over sample seed sets); "
             f"ratio = sCM / teacher, ✓ within the targets (1-step ≤ {TARGETS['scm1']}, 2-step ≤ {TARGETS['scm2']}).", "",
             "| scale | params (M) | sCM | FID teacher (NFE) | FID 1-step | FID 2-step | rFID floor | ratio 1-step | ratio 2-step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        fc, sd = e["fid_clf"], e["fid_clf_std"]
        pm = lambda k: f"{f(fc[k])} ± {f(sd.get(k))}"
        method = {"scd": "sCD", "sct": "sCT"}.get(e.get("distill_method"), "n/a")
        lines.append(f"| {e['scale']} | {e['n_params'] / 1e6:.2f} | {method} | {pm('teacher')} ({e['teacher_nfe']}) | "
                     f"{pm('scm1')} | {pm('scm2')} | {f(fc['recon'])} | {verdict(e['fid_clf_ratio']['scm1'], 'scm1')} | "
                     f"{verdict(e['fid_clf_ratio']['scm2'], 'scm2')} |")
    lines += ["", "Sampling speed: milliseconds per image on one batch, decoder excluded; speedup = teacher sampler time / "
              "sCM sampler time (in parentheses: as a fraction of the NFE ratio).", "",
              "| scale | ms/img teacher | ms/img 1-step | ms/img 2-step | speedup 1-step | speedup 2-step |",
              "|---|---|---|---|---|---|"]
    for e in entries:
        t = e["sec_per_image"]
        lines.append(f"| {e['scale']} | {f(t['teacher'] * 1e3, 3)} | {f(t['scm1'] * 1e3, 3)} | {f(t['scm2'] * 1e3, 3)} | "
                     f"{f(e['speedup']['scm1'], 1)}x ({f(e['speedup_fraction_of_nfe_ratio']['scm1'])}) | "
                     f"{f(e['speedup']['scm2'], 1)}x ({f(e['speedup_fraction_of_nfe_ratio']['scm2'])}) |")
    lines += ["", "![FID against parameters](fid_vs_params.png)", "", "![Training curves](loss_curves.png)", ""]
    if recon_grid:
        lines += ["The autoencoder (the floor of every latent model): held-out digits above their reconstructions.", "",
                  "![Reconstructions](recon_grid.png)", ""]
    for e in entries:
        panels = "real | teacher | sCM 1-step | sCM 2-step" if real_panel else "teacher | sCM 1-step | sCM 2-step"
        lines += [f"## {e['scale']}: {panels}", "", f"![samples {e['scale']}](samples/{e['scale']}.png)", ""]
    lines += ["## Every feature space", "",
              "The same samples in each feature space: the two classifiers trained here (`clf`, `clf2`: other "
              "architecture, other seed) and, when on, the field's Inception-v3 and DINOv2. The paper's claim for "
              "2 steps is a ratio within about 10% of the teacher.", "",
              "| scale | space | teacher | 1-step | 2-step | ratio 1-step | ratio 2-step |",
              "|---|---|---|---|---|---|---|"]
    for e in entries:
        for space in layout.FEATURE_SPACES:
            fd = layout.fd(space)
            values, ratio = e[fd], e[f"{fd}_ratio"]
            if values.get("teacher") is None:
                continue
            lines.append(f"| {e['scale']} | `{fd}` | {f(values['teacher'])} | {f(values['scm1'])} | {f(values['scm2'])} "
                         f"| {verdict(ratio['scm1'], 'scm1')} | {verdict(ratio['scm2'], 'scm2')} |")
    for space in ("inception", "dinov2"):
        status = entries[0][layout.fd(space)].get("status") if entries else None
        if status and status != "ok":
            lines += ["", f"`{layout.fd(space)}`: {status}."]
    if provenance:
        lines += ["", "---", "", provenance]
    lines.append("")
    return "\n".join(lines)


def run(params: ReportParams, base: BaseParams, *, metrics_dir: Path, plots_dir: Path,
        artifacts_dir: Path, out_dir: Path, latents_dir: Path | None = None,
        prepared_dir: Path | None = None, profile: str = "default") -> dict[str, Any]:
    entries = [summarise(s, metrics_dir) for s in base.scales]
    histories = {s: {st: _read_csv(layout.history_file(s, st, plots_dir)) for st in ("teacher", "distill")}
                 for s in base.scales}
    with atomic_output_dir(out_dir) as tmp:
        write_json(tmp / layout.SUMMARY, {"scales": entries})
        plot_scaling(entries, tmp / "fid_vs_params.png")
        plot_losses(histories, tmp / "loss_curves.png")
        write_curves(histories, entries, tmp / "curves")
        (tmp / "samples").mkdir()
        for s, e in zip(base.scales, entries):
            grids = [layout.stage_dir(s, "samples", artifacts_dir) / layout.grid_file(m) for m in layout.METHODS]
            missing = [g for g in grids if not g.is_file()]
            if missing:
                raise StageError(f"{missing[0]}: not found (run the sample stage for scale {s!r})")
            panels = [(g, f"{PANEL_LABELS[m]}, NFE {e['nfe'][m]}, fid_clf {e['fid_clf'][m]:.1f}")
                      for g, m in zip(grids, layout.METHODS)]
            if prepared_dir is not None:
                real_grid(prepared_dir, grids[0], tmp / f".real_{s}.png")
                panels.insert(0, (tmp / f".real_{s}.png", "real (held-out eval split)"))
            side_by_side(panels, tmp / "samples" / f"{s}.png")
            (tmp / f".real_{s}.png").unlink(missing_ok=True)
        recon_grid = latents_dir is not None and (Path(latents_dir) / "recon_grid.png").is_file()
        if recon_grid:
            shutil.copyfile(Path(latents_dir) / "recon_grid.png", tmp / "recon_grid.png")
        footer = f"Profile `{profile}`, commit `{git_commit()}`, {machine()}."
        (tmp / layout.REPORT).write_text(markdown(entries, params.title, recon_grid, prepared_dir is not None, footer))
        write_provenance(tmp, {"base": to_plain(base), "report": to_plain(params)})
    return {"scales": entries}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m stages.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_params_args(parser)
    parser.add_argument("--metrics", type=Path, default=Path(layout.METRICS))
    parser.add_argument("--plots", type=Path, default=Path(layout.PLOTS))
    parser.add_argument("--artifacts", type=Path, default=Path(layout.ARTIFACTS))
    parser.add_argument("--latents", type=Path, default=Path(layout.LATENTS), help="for the reconstruction grid")
    parser.add_argument("--data", type=Path, default=Path(layout.PREPARED), help="for the real-data panel")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: reports/<profile>)")
    args = parser.parse_args(argv)
    p = load_args(args)
    args.out = args.out or layout.reports_dir(p.profile)
    check_paths(inputs={"--metrics": args.metrics, "--plots": args.plots, "--artifacts": args.artifacts, "--latents": args.latents,
                        "--data": args.data},
                outputs={"--out": args.out})
    out = run(p.report, p.base, metrics_dir=args.metrics, plots_dir=args.plots, artifacts_dir=args.artifacts, out_dir=args.out,
              latents_dir=args.latents, prepared_dir=args.data, profile=p.profile)
    for e in out["scales"]:
        print(f"report: {e['scale']}: fid_clf teacher {e['fid_clf']['teacher']:.3f} / 1-step {e['fid_clf']['scm1']:.3f} / "
              f"2-step {e['fid_clf']['scm2']:.3f}; speedup 2-step {e['speedup']['scm2']:.1f}x")
    return out


if __name__ == "__main__":
    raise SystemExit(cli(main))
