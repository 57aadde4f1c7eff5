"""Run configuration: typed dataclasses, one preset per dataset, ``--set key=value`` overrides, a fingerprint.

    from workbench.config import get_config
    cfg = get_config("neon-trees", "detector", overrides=["optim.lr=0.02"], iterations=100)
    cfg.fingerprint()  # '3f0c...': equal fingerprints = the same training (given the world size)

The paper's schedule (Sec. 3.4) for MS-COCO, global batch 16: 160k iterations, lr 0.01 decreased
x0.1 after 120k, "warm up the training by setting the learning rate to 0.004 for the first 10k
iterations", weight decay 1e-4, momentum 0.9, images resized to 800 px short side / 1200 px max.
The smaller presets keep its *shape*: decay at 3/4 of the run, warm-up over the first 1/16, warm-up
lr 0.4x the base lr (see :func:`paper_schedule`); only the length and image size shrink.

Batch size is per process: the global batch is ``batch_size x WORLD_SIZE`` under torchrun. With
``optim.lr_batch`` set, the lr is scaled linearly with the global batch (Goyal et al. 2017).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_KINDS = ("detector", "iou", "joint")  # or "package.module:function" for a custom builder
WARMUP_MODES = ("linear", "constant")

# Fields that change how a run is carried out or recorded, not the weights it produces:
# left out of the fingerprint so a cached checkpoint is reused whatever they were.
OPERATIONAL_KEYS = ("out_dir", "num_workers", "checkpoint_interval", "log_interval", "device")


class ConfigError(ValueError):
    """A bad config key or value; the message names the key."""


@dataclass
class DataConfig:
    name: str = "shapes"  # "neon-trees" | "shapes" | "coco" (workbench.data.get_dataset), or "module:function"
    split: str = "train"  # split trained on
    root: str = "cache/data"  # parent folder of prepared datasets
    options: dict[str, Any] = field(default_factory=dict)  # extra get_dataset kwargs (shapes: seed, num_train...; coco: ann_file, img_dir)


@dataclass
class ModelConfig:
    kind: str = "detector"  # "detector" (Faster R-CNN FPN) | "iou" (standalone IoU-Net) | "joint" (detector + IoU head), or "module:function"
    backbone: str = "mobilenet_v2"  # "mobilenet_v2" | "resnet50"
    pretrained_backbone: bool = True  # ImageNet init (MobileNetV2 works offline; ResNet-50 needs a download)
    min_size: int = 800  # image short side after resizing, px (paper: 800)
    max_size: int = 1200  # cap on the long side, px (paper: 1200)
    detector_checkpoint: str = ""  # kind "iou": ckpt.pt of a trained "detector" run; its backbone is copied and frozen
    options: dict[str, Any] = field(default_factory=dict)  # extra constructor kwargs: detector/joint: anchor_sizes, box_batch_size_per_image...; iou: freeze_backbone...


@dataclass
class OptimConfig:
    lr: float = 0.01  # base learning rate after warm-up (paper: 0.01 at global batch 16)
    lr_batch: int = 0  # global batch `lr` is quoted for; > 0: applied lr = lr * global_batch / lr_batch; 0: lr as is
    momentum: float = 0.9  # SGD momentum (paper: 0.9)
    weight_decay: float = 1e-4  # L2 on every trained parameter (paper: 1e-4)
    warmup_iters: int = 10_000  # length of the warm-up in iterations (paper: 10k of 160k)
    warmup_factor: float = 0.4  # lr multiplier at iteration 0 (paper: 0.004 / 0.01)
    warmup_mode: str = "linear"  # "linear": factor ramps to 1 over warmup_iters; "constant": factor held, then 1
    steps: tuple[int, ...] = (120_000,)  # iterations at which lr is multiplied by gamma (paper: 120k)
    gamma: float = 0.1  # lr decay factor per step (paper: 0.1)


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)  # what to train on
    model: ModelConfig = field(default_factory=ModelConfig)  # what to train
    optim: OptimConfig = field(default_factory=OptimConfig)  # how: SGD + warm-up + step decay
    batch_size: int = 2  # images per process per iteration; global batch = batch_size * WORLD_SIZE
    iterations: int = 160_000  # optimizer steps in the whole run (paper: 160k); resuming keeps it
    checkpoint_interval: int = 1000  # save <out_dir>/ckpt.pt every this many iterations (and at the end)
    log_interval: int = 20  # append mean losses to <out_dir>/log.jsonl every this many iterations
    seed: int = 0  # seeds torch (+rank), the data order and model init
    deterministic: bool = True  # torch.use_deterministic_algorithms (warn_only); bit-exact resume on the CPU
    num_workers: int = 0  # DataLoader worker processes per training process
    device: str = "auto"  # "auto" (cuda:LOCAL_RANK if available, else cpu) | "cpu" | "cuda"
    ddp_find_unused_parameters: bool = False  # DDP option, for models with parameters unused in some steps
    out_dir: str = "runs/run"  # checkpoint, config.json and log.jsonl go here

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready nested dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError` naming them."""
        return _from_dict(cls, d, prefix="")

    def fingerprint(self) -> str:
        """16 hex digits of sha256 over the fields that determine the trained weights.

        Leaves out :data:`OPERATIONAL_KEYS`. A ``detector_checkpoint`` counts by its path, so
        keep the fingerprint of the detector run in that path (the default ``out_dir`` does not).
        """
        d = self.to_dict()
        for key in OPERATIONAL_KEYS:
            d.pop(key)
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def validate(self) -> TrainConfig:
        """Raise :class:`ConfigError` naming the first inconsistent field; return self."""
        def need(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"config key {key!r}: {msg}")

        m, o = self.model, self.optim
        need(m.kind in MODEL_KINDS or ":" in m.kind, "model.kind", f"expected one of {MODEL_KINDS} or 'module:function', got {m.kind!r}")
        need(m.kind != "iou" or bool(m.detector_checkpoint), "model.detector_checkpoint", "kind 'iou' needs a trained detector checkpoint")
        need(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        need(self.iterations >= 1, "iterations", f"must be >= 1, got {self.iterations}")
        need(self.checkpoint_interval >= 1, "checkpoint_interval", f"must be >= 1, got {self.checkpoint_interval}")
        need(self.log_interval >= 1, "log_interval", f"must be >= 1, got {self.log_interval}")
        need(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        need(self.device in ("auto", "cpu", "cuda"), "device", f"expected 'auto', 'cpu' or 'cuda', got {self.device!r}")
        need(m.min_size >= 1, "model.min_size", f"must be >= 1 (pixels), got {m.min_size}")
        need(m.max_size >= m.min_size, "model.max_size", f"must be >= model.min_size={m.min_size} (pixels), got {m.max_size}")
        need(0 <= self.seed < 2**32, "seed", f"must be in [0, 2**32) (NumPy's seed range), got {self.seed}")
        # NaN compares false with everything, so each check below also rejects it.
        need(0 < o.lr < math.inf, "optim.lr", f"must be a finite number > 0, got {o.lr}")
        need(0 <= o.momentum < 1, "optim.momentum", f"must be in [0, 1), got {o.momentum}")
        need(0 <= o.weight_decay < math.inf, "optim.weight_decay", f"must be a finite number >= 0, got {o.weight_decay}")
        need(0 < o.gamma < math.inf, "optim.gamma", f"must be a finite number > 0, got {o.gamma}")
        need(o.lr_batch >= 0, "optim.lr_batch", f"must be >= 0, got {o.lr_batch}")
        need(0 <= o.warmup_iters <= self.iterations, "optim.warmup_iters",
             f"must be in [0, iterations={self.iterations}], got {o.warmup_iters}")
        need(0 < o.warmup_factor <= 1, "optim.warmup_factor", f"must be in (0, 1], got {o.warmup_factor}")
        need(o.warmup_mode in WARMUP_MODES, "optim.warmup_mode", f"expected one of {WARMUP_MODES}, got {o.warmup_mode!r}")
        need(list(o.steps) == sorted(o.steps) and all(0 < s < self.iterations for s in o.steps), "optim.steps",
             f"must be increasing iterations in (0, iterations={self.iterations}), got {tuple(o.steps)}")
        return self


def paper_schedule(iterations: int, lr: float, lr_batch: int = 0, warmup_mode: str = "linear") -> tuple[int, OptimConfig]:
    """The paper's schedule shape squeezed into ``iterations``: decay x0.1 at 3/4, warm-up over 1/16.

    Paper: 160k iterations, step at 120k (= 3/4), warm-up 10k (= 1/16) at 0.4x the lr.
    Returns ``(iterations, OptimConfig)``.
    """
    optim = OptimConfig(lr=lr, lr_batch=lr_batch, warmup_iters=max(1, iterations // 16), warmup_factor=0.4,
                        warmup_mode=warmup_mode, steps=(iterations * 3 // 4,), gamma=0.1)
    return iterations, optim


# ---------------------------------------------------------------------------------------------
# Presets: one function per dataset, taking the model kind. Each says how it scales the paper.


def _neon_trees(kind: str) -> TrainConfig:
    """NEON tree crowns (62 train tiles of 400x400, 1 class), MobileNetV2-FPN, sized for 2 CPU cores.

    Budget: detector + standalone IoU-Net in <= 15 min on 2 cores. Measured on the project's idle
    2-core machine: 411 s for the detector (1.4 s per iteration; 2.1 s on one thread); the IoU-Net
    head on cached frozen features costs 0.72 CPU-s per iteration (600 iterations: 435 CPU-s, one
    thread). A core busy with something else can make it several times slower (OpenMP threads wait
    on each other). The paper's 160k iterations x 16 images (2.56M images, ~22 passes over COCO
    train2017) become 300 x 2 = 600 images (~10 passes over the 62 tiles) for the detector and
    600 x 2 for the IoU-Net head (its backbone frozen, its features cached), with the same shape (:func:`paper_schedule`: warm-up 1/16, x0.1 at 3/4). lr 0.005 for a batch
    8x smaller than the paper's: 4x the linear-scaled 0.00125, which moves too little in 300 steps;
    the paper's unscaled 0.01 diverged (NaN at iteration ~65). Images stay at their
    native 400 px (paper: 800 px): the crowns are 8-108 px, so the FPN anchors are 16..256 px instead
    of torchvision's 32..512, and the R-CNN head samples 128 RoIs per image instead of 512 (CPU time;
    tiles hold at most ~50 trees).
    """
    iterations = {"detector": 300, "iou": 600, "joint": 300}.get(kind, 300)
    iterations, optim = paper_schedule(iterations, lr=0.005)
    return TrainConfig(
        data=DataConfig(name="neon-trees"),
        model=ModelConfig(kind=kind, backbone="mobilenet_v2", pretrained_backbone=True, min_size=400, max_size=400,
                          detector_checkpoint="runs/neon-trees-detector/ckpt.pt" if kind == "iou" else "",
                          options={} if kind == "iou" else {"anchor_sizes": [16, 32, 64, 128, 256],
                                                            "box_batch_size_per_image": 128}),
        optim=optim, batch_size=2, iterations=iterations, checkpoint_interval=50, log_interval=10,
        num_workers=0, out_dir=f"runs/neon-trees-{kind}",
    )


def _shapes(kind: str) -> TrainConfig:
    """Synthetic shapes (1000 train images of 128 px, 3 classes): small and fast, for teaching and demos.

    300 iterations x 4 images (~1.2 passes) at the native 128 px, ImageNet MobileNetV2-FPN (offline
    weights; frozen batch norm suits batch 4), anchors 8..128 px, 128 RoIs per image, the paper's
    schedule shape (warm-up 18, x0.1 at 225). The detector trains in 4.5 min on 2 idle cores
    (measured: 266 s, loss 1.56 -> 0.51). lr 0.01 (0.0025 per image, 4x the linear-scaled paper
    value, for speed; 0.02 diverged).

    The standalone IoU-Net keeps the detector's backbone frozen and trains its head for 1000
    iterations on cached FPN maps (``StandaloneIoUNet(cache_features=True)``, the default when
    frozen). It beat the paper's own-backbone IoU-Net (``--set model.options.freeze_backbone=false``,
    300 iterations; 313 CPU-s against 549) on 100 val images: Pearson r of predicted with true IoU
    0.720 vs 0.668 on detections (classification score: 0.401) and 0.821 vs 0.773 on jittered
    ground truth; AP90 after IoU-NMS 9.8 vs 7.7 (NMS 5.2); after 5 refinement steps (log, λ = 0.05)
    AP 47.9 vs 45.2, AP90 20.0 vs 14.2.
    """
    iterations, optim = paper_schedule(300, lr=0.01)
    cfg = TrainConfig(
        data=DataConfig(name="shapes", options={"seed": 0, "num_train": 1000, "num_val": 200, "image_size": 128}),
        model=ModelConfig(kind=kind, backbone="mobilenet_v2", pretrained_backbone=True, min_size=128, max_size=128,
                          detector_checkpoint="runs/shapes-detector/ckpt.pt" if kind == "iou" else "",
                          options={} if kind == "iou" else {"anchor_sizes": [8, 16, 32, 64, 128],
                                                            "box_batch_size_per_image": 128}),
        optim=optim, batch_size=4, iterations=iterations, checkpoint_interval=100, log_interval=10,
        num_workers=0, out_dir=f"runs/shapes-{kind}",
    )
    # The IoU head trains on cached frozen features, cheaply: 1000 iterations, the schedule rescaled.
    return rescale_schedule(cfg, 1000) if kind == "iou" else cfg


def _coco(kind: str) -> TrainConfig:
    """MS-COCO 2017 train, ResNet-50-FPN, the paper's schedule, for GPUs via torchrun.

    Exactly Sec. 3.4 at global batch 16 (e.g. ``torchrun --nproc_per_node=8``, 2 images per GPU):
    160k iterations, lr 0.01 held at 0.004 for the first 10k ("setting the learning rate to 0.004
    for the first 10k iteration", hence warmup_mode "constant"), x0.1 after 120k, 800/1200 px.
    ``lr_batch=16`` scales the lr linearly with any other global batch; the iteration counts are
    not rescaled (set ``iterations``, ``optim.steps``, ``optim.warmup_iters`` to keep epochs).
    Needs ``data.options.ann_file`` and ``data.options.img_dir``.
    """
    return TrainConfig(
        data=DataConfig(name="coco", options={"ann_file": "cache/data/coco/annotations/instances_train2017.json",
                                              "img_dir": "cache/data/coco/train2017"}),
        model=ModelConfig(kind=kind, backbone="resnet50", pretrained_backbone=True, min_size=800, max_size=1200,
                          detector_checkpoint="runs/coco-detector/ckpt.pt" if kind == "iou" else "",
                          options={} if kind == "iou" else {"box_batch_size_per_image": 512}),
        optim=OptimConfig(lr=0.01, lr_batch=16, warmup_iters=10_000, warmup_factor=0.4, warmup_mode="constant",
                          steps=(120_000,), gamma=0.1),
        batch_size=2, iterations=160_000, checkpoint_interval=5000, log_interval=20, deterministic=False,
        num_workers=4, out_dir=f"runs/coco-{kind}",
    )


PRESETS = {"neon-trees": _neon_trees, "shapes": _shapes, "coco": _coco}


def get_config(preset: str, kind: str = "detector", overrides: typing.Sequence[str] = (),
               iterations: int | None = None) -> TrainConfig:
    """A preset (or a saved ``config.json``) with ``key=value`` overrides applied, validated.

    Args:
        preset: a name in :data:`PRESETS`, or the path of a ``config.json`` written by a run
            (``kind`` is then ignored: the file has it).
        kind: model kind, one of :data:`MODEL_KINDS` or ``"module:function"``.
        overrides: ``"dotted.key=value"`` strings, see :func:`apply_overrides`.
        iterations: a new run length with the schedule scaled to it (:func:`rescale_schedule`),
            applied before ``overrides``.
    """
    if preset in PRESETS:
        cfg = PRESETS[preset](kind)
    elif preset.endswith(".json") and Path(preset).is_file():
        try:
            data = json.loads(Path(preset).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{preset}: not a valid JSON config file ({e})") from None
        try:
            cfg = TrainConfig.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{preset}: {e}") from None
    else:
        raise ConfigError(f"unknown config {preset!r}: expected one of {sorted(PRESETS)} or a config.json path")
    if iterations is not None:
        cfg = rescale_schedule(cfg, iterations)
    return apply_overrides(cfg, overrides).validate()


def rescale_schedule(cfg: TrainConfig, iterations: int) -> TrainConfig:
    """A copy running ``iterations`` steps, with warm-up and decay steps at the same fractions of the run."""
    if iterations < 1:
        raise ConfigError(f"config key 'iterations': must be >= 1, got {iterations}")
    ratio = iterations / cfg.iterations
    steps = tuple(sorted({min(max(1, round(s * ratio)), iterations - 1) for s in cfg.optim.steps if iterations > 1}))
    optim = dataclasses.replace(cfg.optim, warmup_iters=min(iterations, round(cfg.optim.warmup_iters * ratio)), steps=steps)
    return dataclasses.replace(cfg, iterations=iterations, optim=optim)


def apply_overrides(cfg: TrainConfig, overrides: typing.Iterable[str]) -> TrainConfig:
    """A copy of ``cfg`` with ``"key=value"`` overrides applied, values parsed by the field's type.

    Keys are dotted paths (``optim.lr``, ``iterations``); inside a dict field any sub-key is allowed
    (``data.options.num_train=200``) and its value is read as JSON, else kept as a string. Tuples
    take comma-separated values (``optim.steps=100,150``); bools take true/false/1/0.
    """
    d = cfg.to_dict()
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        parts = key.split(".")
        cls: Any = TrainConfig
        node = d
        for depth, part in enumerate(parts):
            hints = typing.get_type_hints(cls)
            if part not in hints:
                where = ".".join(parts[:depth]) or "the top level"
                raise ConfigError(f"unknown config key {key!r}: no field {part!r} in {where} (valid: {', '.join(hints)})")
            typ = hints[part]
            if dataclasses.is_dataclass(typ) and depth < len(parts) - 1:
                cls, node = typ, node[part]
                continue
            if _origin(typ) is dict:
                if depth == len(parts) - 1:
                    node[part] = _parse(text, typ, key)
                else:  # free-form sub-keys of an options dict
                    sub = node[part]
                    for p in parts[depth + 1:-1]:
                        sub = sub.setdefault(p, {})
                    sub[parts[-1]] = _parse_json(text)
                break
            here = ".".join(parts[:depth + 1])
            if dataclasses.is_dataclass(typ):
                raise ConfigError(f"config key {key!r} is a section: set one of its fields ({', '.join(typing.get_type_hints(typ))})")
            if depth != len(parts) - 1:
                raise ConfigError(f"unknown config key {key!r}: {here!r} is a plain value, not a section")
            node[part] = _parse(text, typ, key)
    return TrainConfig.from_dict(d)


# ---------------------------------------------------------------------------------------------
# Helpers: typed parsing and dict -> dataclass.


def _origin(typ: Any) -> Any:
    return typing.get_origin(typ) or typ


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse(text: str, typ: Any, key: str) -> Any:
    """Parse one override value as ``typ`` (bool, int, float, str, tuple[int, ...], dict)."""
    text = text.strip()
    try:
        if typ is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if typ in (int, float, str):
            return typ(text)
        if _origin(typ) is tuple:
            (item_type, _) = typing.get_args(typ)
            return [item_type(t) for t in text.split(",") if t.strip()]
        if _origin(typ) is dict:
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError("expected a JSON object")
            return value
    except ValueError as e:
        raise ConfigError(f"config key {key!r}: cannot read {text!r} as {getattr(typ, '__name__', typ)} ({e})") from None
    raise ConfigError(f"config key {key!r}: unsupported field type {typ}")


def _from_dict(cls: Any, d: dict[str, Any], prefix: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"config key {prefix.rstrip('.') or '<root>'!r}: expected a section (dict), got {d!r}")
    hints = typing.get_type_hints(cls)
    unknown = [k for k in d if k not in hints]
    if unknown:
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r} (valid: {', '.join(hints)})")
    kwargs = {}
    for name, value in d.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            value = _from_dict(typ, value, prefix + name + ".")
        elif _origin(typ) is tuple:
            value = tuple(value)
        elif _origin(typ) is dict:
            value = dict(value)
        elif typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if typ in (bool, int, float, str) and (type(value) is not typ):
            raise ConfigError(f"config key {prefix + name!r}: expected {typ.__name__}, got {value!r}")
        kwargs[name] = value
    return cls(**kwargs)


__all__ = ["ConfigError", "DataConfig", "ModelConfig", "OptimConfig", "TrainConfig", "MODEL_KINDS", "PRESETS",
           "apply_overrides", "get_config", "paper_schedule", "rescale_schedule"]
