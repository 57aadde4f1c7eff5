"""Train a detector, a standalone IoU-Net or the joint model: one loop for every model kind.

    python -m workbench train --config neon-trees --model detector          # one process
    python -m workbench train --config neon-trees --model detector --resume # continue after a stop
    torchrun --standalone --nproc_per_node=8 -m workbench train --config coco --model joint

The model is anything that, in train mode, maps ``(images, targets)`` to a dict of scalar losses
(torchvision's detection convention); :func:`train` sums them and steps SGD. :func:`train` reads top
to bottom: setup, data, model + optimizer + schedule, resume, loop. It writes to ``config.out_dir``:

- ``ckpt.pt``: the checkpoint (every ``checkpoint_interval`` iterations, at the end and on a
  stop), replaced atomically; loads with ``torch.load(path, weights_only=True)``. Keys: ``format``,
  ``iteration`` (completed), ``config`` (dict), ``fingerprint``, ``world_size``, ``num_classes``,
  ``class_names``, ``model``, ``optimizer``, ``scheduler``, ``rng`` (one entry per rank), ``versions``,
  ``detector_fingerprint`` (kind ``iou``: the detector run it builds on; else None).
- ``config.json``: the resolved config (``--config runs/x/config.json`` repeats the run).
- ``log.jsonl``: one JSON object per ``log_interval``: iteration, lr, mean losses over the window and
  ranks, images/s.

SIGINT/SIGTERM stop the run after the current iteration: a checkpoint is saved and
:class:`TrainingStopped` (a ``KeyboardInterrupt``) is raised. ``resume=True`` continues from
``ckpt.pt`` to the same final iteration with the same lr at every iteration; on the CPU with
``deterministic`` the resumed weights equal an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from . import distributed
from .config import OPERATIONAL_KEYS, ConfigError, OptimConfig, TrainConfig
from .files import atomic_write, stale_temporaries

CHECKPOINT = "ckpt.pt"  # file names inside out_dir
LOG = "log.jsonl"
CONFIG = "config.json"
FORMAT = "workbench.train/1"  # bump when the checkpoint layout changes


class TrainingStopped(KeyboardInterrupt):
    """Raised by :func:`train` after a SIGINT/SIGTERM stop, once the checkpoint is saved."""

    def __init__(self, checkpoint: Path, iteration: int, signum: int):
        super().__init__(f"stopped by signal {signum} after iteration {iteration}; checkpoint {checkpoint} (continue with resume)")
        self.checkpoint, self.iteration, self.signum = checkpoint, iteration, signum


# ---------------------------------------------------------------------------------------------
# Learning-rate schedule


def lr_factor(it: int, optim: OptimConfig) -> float:
    """Multiplier of the base lr at (0-based) iteration ``it``: warm-up, then x ``gamma`` per step passed.

    Linear warm-up: ``warmup_factor`` at iteration 0 rising to 1 at ``warmup_iters``; constant warm-up
    (the paper's wording): ``warmup_factor`` for iterations ``< warmup_iters``, then 1.
    """
    warm = 1.0
    if it < optim.warmup_iters:
        if optim.warmup_mode == "linear":
            warm = optim.warmup_factor + (1.0 - optim.warmup_factor) * it / optim.warmup_iters
        else:
            warm = optim.warmup_factor
    return warm * optim.gamma ** sum(it >= s for s in optim.steps)


def base_lr(optim: OptimConfig, global_batch: int) -> float:
    """``lr``, scaled linearly to the global batch when ``lr_batch`` is set (Goyal et al. 2017)."""
    return optim.lr * global_batch / optim.lr_batch if optim.lr_batch else optim.lr


# ---------------------------------------------------------------------------------------------
# Factories: config -> dataset, config -> model. Imports are local so a missing module only
# matters to the kind that needs it.


def _import_object(spec: str) -> Any:
    """``"package.module:name"`` -> the object."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def build_dataset(config: TrainConfig) -> Dataset:
    """``workbench.data.get_dataset(name, split, root, **options)``, or ``fn(split, root, **options)`` for
    ``name = "module:fn"``. The dataset must have ``num_classes``; items are ``(image, target)``."""
    d = config.data
    if ":" in d.name:
        return _import_object(d.name)(d.split, d.root, **d.options)
    from .data import get_dataset

    return get_dataset(d.name, d.split, root=d.root, **d.options)


def build_model(config: TrainConfig, num_classes: int) -> nn.Module:
    """Model for ``config.model.kind``; ``"module:fn"`` calls ``fn(config, num_classes)``.

    ``"iou"`` rebuilds the detector of ``model.detector_checkpoint`` (a ``detector`` run's ``ckpt.pt``)
    from that checkpoint's own config, loads its weights and hands it to the standalone IoU-Net, which
    copies and freezes its backbone; ``backbone``, ``pretrained_backbone`` are then the detector's and
    ``model.options`` go to ``StandaloneIoUNet`` (e.g. ``freeze_backbone``).
    """
    m = config.model
    if ":" in m.kind:
        return _import_object(m.kind)(config, num_classes)
    from . import models

    common = dict(num_classes=num_classes, backbone=m.backbone, pretrained_backbone=m.pretrained_backbone,
                  min_size=m.min_size, max_size=m.max_size, **m.options)
    if m.kind == "detector":
        return models.build_detector(**common)
    if m.kind == "joint":
        return models.JointIoUNet(**common)
    if m.kind == "iou":
        ckpt = load_checkpoint(m.detector_checkpoint)
        det_cfg = TrainConfig.from_dict(ckpt["config"])
        if det_cfg.model.kind != "detector":
            raise ConfigError(f"config key 'model.detector_checkpoint': {m.detector_checkpoint} is a "
                              f"{det_cfg.model.kind!r} run, not 'detector'")
        if ckpt["iteration"] != det_cfg.iterations:
            raise ConfigError(f"config key 'model.detector_checkpoint': {m.detector_checkpoint} is unfinished "
                              f"(iteration {ckpt['iteration']} of {det_cfg.iterations}); finish it with --resume first")
        detector = build_model(det_cfg, ckpt["num_classes"])
        detector.load_state_dict(ckpt["model"])
        return models.StandaloneIoUNet(detector=detector, min_size=m.min_size, max_size=m.max_size, **m.options)
    raise ConfigError(f"config key 'model.kind': unknown kind {m.kind!r}")


# ---------------------------------------------------------------------------------------------
# Data order: a function of (seed, epoch, rank) only, so a resumed run sees the same batches.


class _SkipBatches:
    """A batch sampler that drops the first ``skip`` batches of its next pass (index lists only: no
    image is loaded for them). Resuming mid-epoch sets ``skip``; it falls back to 0 after one pass."""

    def __init__(self, batch_sampler: BatchSampler):
        self.batch_sampler, self.skip = batch_sampler, 0

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        for i, batch in enumerate(self.batch_sampler):
            if i >= skip:
                yield batch

    def __len__(self) -> int:
        return len(self.batch_sampler) - self.skip


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of the loader generator (worker seeds) for one epoch on one rank."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _batches(loader: DataLoader, ctx: distributed.DistContext, seed: int, start_iter: int) -> Iterator[Any]:
    """Endless batches from ``start_iter`` on, epoch after epoch."""
    batch_sampler: _SkipBatches = loader.batch_sampler
    sampler: DistributedSampler = batch_sampler.batch_sampler.sampler
    epoch, batch_sampler.skip = divmod(start_iter, len(batch_sampler.batch_sampler))
    while True:
        sampler.set_epoch(epoch)  # the shuffle of each epoch: seed + epoch, the same on every rank
        loader.generator.manual_seed(_epoch_seed(seed, epoch, ctx.rank))
        yield from loader
        epoch += 1


# ---------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, RNG states, loading.


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """``torch.save(state)`` to ``path`` atomically (see :func:`workbench.files.atomic_write`)."""
    with atomic_write(path) as f:
        torch.save(state, f)


def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint written by :func:`train`, on the CPU (plain tensors and containers: ``weights_only``).

    ``mmap=True`` maps the tensors instead of reading them (cheap when only the metadata is needed).

    Raises:
        ValueError: naming ``path`` when it cannot be read (e.g. truncated by a full disk or a copy
            cut short) or is not a checkpoint of this format.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch reports a damaged file as EOFError, RuntimeError or an unpickling error
        raise ValueError(f"{path}: cannot read this checkpoint ({type(e).__name__}: {e}); the file is damaged "
                         f"(e.g. truncated). Delete it to train again, or restore it from a copy") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} checkpoint (format: {ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt)})")
    return ckpt


def _rng_state(device: torch.device) -> dict[str, Any]:
    """Every generator a training step may draw from (torch, CUDA, NumPy, Python), as plain objects."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _check_resumable(ckpt: dict[str, Any], config: TrainConfig, world_size: int) -> None:
    """The checkpoint must come from the same run: same fingerprint and the same number of processes."""
    if ckpt["fingerprint"] != config.fingerprint():
        old, new = _flatten(ckpt["config"]), _flatten(config.to_dict())
        diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and k not in OPERATIONAL_KEYS]
        raise ConfigError(f"cannot resume: the checkpoint's config differs in {', '.join(diff)} "
                          f"(checkpoint: {', '.join(f'{k}={old.get(k)!r}' for k in diff)})")
    if ckpt["world_size"] != world_size:
        raise ConfigError(f"cannot resume: the checkpoint was written with WORLD_SIZE={ckpt['world_size']}, this run has "
                          f"{world_size}; the data order and global batch depend on it")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


# ---------------------------------------------------------------------------------------------
# Stopping on SIGINT / SIGTERM


class _StopOnSignals:
    """Context manager: the first SIGINT/SIGTERM sets ``signum``; a second SIGINT interrupts at once.

    Previous handlers come back on exit. Outside the main thread (signals cannot be caught there)
    it does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> _StopOnSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


# ---------------------------------------------------------------------------------------------
# The training loop


def train(config: TrainConfig, resume: bool = False) -> Path:
    """Train per ``config``; return the path of the final checkpoint (``<out_dir>/ckpt.pt``).

    Args:
        config: a validated :class:`~workbench.config.TrainConfig`.
        resume: continue from ``<out_dir>/ckpt.pt`` when it exists (else start afresh). Without it,
            an existing checkpoint is an error, so a finished run is never overwritten by accident.

    Raises:
        TrainingStopped: after SIGINT/SIGTERM, once the checkpoint is written.
        FloatingPointError: on a non-finite loss (nothing is saved for that iteration).
    """
    config.validate()
    # --- setup: process group, device, seeds, determinism -----------------------------------
    ctx = distributed.setup(config.device)
    device = ctx.device
    out_dir = Path(config.out_dir)
    ckpt_path = out_dir / CHECKPOINT
    deterministic_before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    clean_exit = False
    try:
        if device.type == "cuda" and config.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for determinism
        torch.use_deterministic_algorithms(config.deterministic, warn_only=True)
        seed = config.seed + ctx.rank  # model init is broadcast from rank 0 by DDP; sampling differs per rank
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        global_batch = config.batch_size * ctx.world_size

        ckpt = None
        if ckpt_path.exists():
            if not resume:
                raise FileExistsError(f"{ckpt_path} exists: pass resume=True (--resume) to continue it, or use another out_dir")
            ckpt = load_checkpoint(ckpt_path)
            _check_resumable(ckpt, config, ctx.world_size)

        # --- data: every rank reads its own 1/world_size of each epoch ------------------------
        with distributed.main_first(ctx):  # rank 0 prepares (downloads, generates); others then read
            dataset = build_dataset(config)
        from .data import collate_fn

        if len(dataset) < global_batch:
            raise ValueError(f"dataset has {len(dataset)} images, fewer than one global batch ({config.batch_size} x {ctx.world_size})")
        # One sampler for 1 or K processes: the K per-rank batches of an iteration are together the
        # batch of a single process with batch_size x K (rank r takes positions r, r+K, ...).
        sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                     seed=config.seed, drop_last=True)
        loader = DataLoader(dataset, batch_sampler=_SkipBatches(BatchSampler(sampler, config.batch_size, drop_last=True)),
                            num_workers=config.num_workers, collate_fn=collate_fn, generator=torch.Generator(),
                            pin_memory=device.type == "cuda")

        # --- model, optimizer, lr schedule ------------------------------------------------------
        with distributed.main_first(ctx):  # e.g. pretrained weights fetched once
            raw_model = build_model(config, dataset.num_classes).to(device)
        model = raw_model
        if ctx.enabled:  # averages gradients over ranks in backward; broadcasts rank 0's weights now
            model = DistributedDataParallel(raw_model, device_ids=[device.index] if device.type == "cuda" else None,
                                            find_unused_parameters=config.ddp_find_unused_parameters)
        params = [p for p in raw_model.parameters() if p.requires_grad]  # frozen parts stay out
        optimizer = torch.optim.SGD(params, lr=base_lr(config.optim, global_batch), momentum=config.optim.momentum,
                                    weight_decay=config.optim.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, config.optim))

        # --- resume: weights, optimizer and schedule state, every rank's RNG ------------------
        start, resumed = 0, ckpt is not None
        if resumed:
            raw_model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            _set_rng_state(ckpt["rng"][ctx.rank], device)
            start = ckpt["iteration"]
            del ckpt
        if ctx.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            for stale in stale_temporaries(ckpt_path):  # left by a run killed mid-write
                stale.unlink(missing_ok=True)
            with atomic_write(out_dir / CONFIG) as f:
                f.write((json.dumps(config.to_dict(), indent=2) + "\n").encode())
            _truncate_log(out_dir / LOG, start)

        detector_fingerprint = None  # kind "iou": the run its backbone comes from (for cache checks)
        if config.model.kind == "iou":
            detector_fingerprint = load_checkpoint(config.model.detector_checkpoint, mmap=True)["fingerprint"]

        def checkpoint(iteration: int) -> None:
            rng = distributed.all_gather_objects(ctx, _rng_state(device))  # collective: every rank calls
            if ctx.is_main:
                save_checkpoint(ckpt_path, {
                    "format": FORMAT, "iteration": iteration, "config": config.to_dict(),
                    "fingerprint": config.fingerprint(), "world_size": ctx.world_size,
                    "num_classes": dataset.num_classes, "class_names": list(getattr(dataset, "class_names", [])),
                    "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": rng, "detector_fingerprint": detector_fingerprint,
                    "versions": {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__)},
                })

        # --- loop -----------------------------------------------------------------------------
        model.train()
        batches = _batches(loader, ctx, config.seed, start)
        bar = tqdm(total=config.iterations, initial=start, disable=not ctx.is_main, desc=f"train {config.model.kind}",
                   unit="it", dynamic_ncols=True)
        window: dict[str, torch.Tensor] = {}  # summed losses since the last log line
        window_start, window_iters, it = time.perf_counter(), 0, start
        saved = start if resumed else -1  # last iteration with a checkpoint on disk
        stopped = False  # agreed by all ranks
        with _StopOnSignals() as stop, bar:
            for it in range(start, config.iterations):
                if distributed.any_rank(ctx, stop.signum != 0):  # all ranks stop at the same iteration
                    stopped = True
                    break
                images, targets = next(batches)
                images = [im.to(device, non_blocking=True) for im in images]
                targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
                           for t in targets]
                losses = model(images, targets)  # dict of scalar losses
                loss = sum(losses.values())
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss at iteration {it}: "
                                             f"{ {k: v.item() for k, v in losses.items()} }; lr {scheduler.get_last_lr()[0]:.3g}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # DDP all-reduces (averages) gradients here
                optimizer.step()
                lr = scheduler.get_last_lr()[0]  # the lr this iteration used
                scheduler.step()
                bar.update(1)

                for k, v in {"loss": loss, **losses}.items():
                    window[k] = window.get(k, 0.0) + v.detach()
                window_iters += 1
                done = it + 1
                if done % config.log_interval == 0 or done == config.iterations:
                    names = sorted(window)
                    means = distributed.all_reduce_mean(ctx, torch.stack([window[k] for k in names]) / window_iters)
                    elapsed = time.perf_counter() - window_start
                    record = {"iteration": done, "lr": lr, **{k: round(v, 6) for k, v in zip(names, means.tolist())},
                              "images_per_s": round(window_iters * global_batch / elapsed, 3)}
                    if ctx.is_main:
                        with open(out_dir / LOG, "a") as f:
                            f.write(json.dumps(record) + "\n")
                        bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}", lr=f"{lr:.2g}")
                    window, window_start, window_iters = {}, time.perf_counter(), 0
                if done % config.checkpoint_interval == 0 or done == config.iterations:
                    checkpoint(done)
                    saved = done
            if stopped:  # `it` iterations are done
                if saved != it:
                    checkpoint(it)
        clean_exit = True  # teardown waits for every rank, so none exits while rank 0 still writes
        if stopped:
            raise TrainingStopped(ckpt_path, it, stop.signum or signal.SIGINT)
        return ckpt_path
    finally:
        torch.use_deterministic_algorithms(deterministic_before[0], warn_only=deterministic_before[1])
        distributed.teardown(ctx, clean=clean_exit)


def _truncate_log(path: Path, iteration: int) -> None:
    """Keep the log lines up to ``iteration`` (0: none): lines a killed run wrote after its last
    checkpoint would otherwise appear twice after resuming."""
    kept = []
    for line in path.read_text().splitlines() if path.exists() and iteration > 0 else []:
        with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):  # a line cut short by a kill
            if json.loads(line)["iteration"] <= iteration:
                kept.append(line + "\n")
    with atomic_write(path) as f:
        f.write("".join(kept).encode())
