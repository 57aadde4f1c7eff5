"""Tests of the trainer (workbench.train), its config (workbench.config) and the ``train`` CLI.

CPU only and small: a tiny Faster R-CNN (three strided convs, no batch norm) and a tiny box
regressor on 64-px ``shapes`` images. Subprocess tests run the real CLI (SIGKILL, SIGINT) and
torchrun with two gloo processes. This file is also the torchrun worker: ``python -m
torch.distributed.run ... tests/test_train.py CONFIG_JSON DUMP_DIR`` trains and dumps each rank's
weights.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

from workbench.__main__ import main as cli_main
from workbench.config import ConfigError, TrainConfig, apply_overrides, get_config
from workbench.train import (
    CHECKPOINT, FORMAT, LOG, build_dataset, build_model, load_checkpoint, lr_factor, save_checkpoint, train,
)

REPO = Path(__file__).resolve().parents[1]
THIS_MODULE = __name__  # "test_train" (or "tests.test_train"): how factories are named in configs
SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH", "")])}


# ---------------------------------------------------------------------------------------------
# Tiny models, named in configs as "<this module>:<function>" so subprocesses can build them.

_LAST_MODEL: nn.Module | None = None  # the model the last factory call built (the torchrun worker dumps it)


def tiny_detector(config: TrainConfig, num_classes: int) -> FasterRCNN:
    """Faster R-CNN with a 3-conv stride-8 backbone and a 64-d box head: ~0.1 s per iteration."""
    global _LAST_MODEL
    backbone = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                             nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU())
    backbone.out_channels = 32
    _LAST_MODEL = FasterRCNN(
        backbone, num_classes=None, min_size=config.model.min_size, max_size=config.model.max_size,
        rpn_anchor_generator=AnchorGenerator(((8, 16, 32),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), box_head=TwoMLPHead(32 * 7 * 7, 64),
        box_predictor=FastRCNNPredictor(64, num_classes + 1),
        rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_batch_size_per_image=64,
        box_batch_size_per_image=64)
    return _LAST_MODEL


class TinyRegressor(nn.Module):
    """Predicts each image's mean box (normalized) and its object count class.

    The loss is a mean of per-image losses, with no random sampling and no batch norm, so a batch of
    2K images in one process has exactly the mean gradient of K processes with 2 images each: the
    property the DDP test compares. (Faster R-CNN lacks it: its RPN and R-CNN losses are normalized
    by the number of anchors/RoIs sampled *per batch*, drawn at random from the global RNG.)
    """

    def __init__(self, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (B, 16)
        self.num_counts = num_classes + 1
        self.head = nn.Linear(16, 4 + self.num_counts)

    def forward(self, images: list[torch.Tensor], targets: list[dict]) -> dict[str, torch.Tensor]:
        out = self.head(self.features(torch.stack(images)))  # (B, 4 + C)
        size = images[0].shape[-1]
        box = torch.stack([t["boxes"].mean(0) / size if len(t["boxes"]) else torch.zeros(4) for t in targets])  # (B, 4)
        count = torch.tensor([min(len(t["boxes"]), self.num_counts - 1) for t in targets])
        return {"loss_box": F.smooth_l1_loss(out[:, :4], box, reduction="none").mean(1).mean(),
                "loss_count": F.cross_entropy(out[:, 4:], count)}


def tiny_regressor(config: TrainConfig, num_classes: int) -> TinyRegressor:
    global _LAST_MODEL
    _LAST_MODEL = TinyRegressor(num_classes)
    return _LAST_MODEL


# ---------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


def tiny_config(data_root: Path, out_dir: Path, model: str = "tiny_detector", **overrides: object) -> TrainConfig:
    """The ``shapes`` preset shrunk: 16 images of 64 px, a tiny model, a 30-iteration schedule."""
    base = {
        "data.root": data_root, "data.options.num_train": 16, "data.options.num_val": 0, "data.options.image_size": 64,
        "model.kind": f"{THIS_MODULE}:{model}", "model.min_size": 64, "model.max_size": 64,
        "batch_size": 2, "iterations": 30, "checkpoint_interval": 10, "log_interval": 1, "device": "cpu",
        "optim.lr": 0.02, "optim.warmup_iters": 4, "optim.steps": "20", "out_dir": out_dir,
    }
    base.update({k.replace("__", "."): v for k, v in overrides.items()})
    return apply_overrides(get_config("shapes", "detector"), [f"{k}={v}" for k, v in base.items()]).validate()


def write_config(config: TrainConfig, path: Path) -> Path:
    path.write_text(json.dumps(config.to_dict()))
    return path


def read_log(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / LOG).read_text().splitlines()]


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Poll ``predicate`` every 10 ms until true; fail if ``proc`` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"training process exited early (rc {proc.returncode}):\n{proc.stderr_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the training process")
        time.sleep(0.01)


def start_cli(config_path: Path) -> subprocess.Popen:
    """``python -m workbench train --config CONFIG_JSON``; stderr (progress bar) goes to a file beside it,
    not to a pipe that nobody reads while it runs."""
    stderr_path = config_path.with_suffix(".stderr")
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "workbench", "train", "--config", str(config_path)],
                                cwd=REPO, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=stderr)
    proc.stderr_path = stderr_path
    return proc


def dataset_loss(model: nn.Module, config: TrainConfig) -> float:
    """Sum of the train-mode losses over the whole dataset, with a fixed RNG for the RoI sampling."""
    from workbench.data import collate_fn

    dataset = build_dataset(config)
    images, targets = collate_fn([dataset[i] for i in range(len(dataset))])
    model.train()
    torch.manual_seed(1234)
    with torch.no_grad():
        return float(sum(model(images, targets).values()))


# ---------------------------------------------------------------------------------------------
# Config and schedule


def test_lr_schedule_matches_hand_computed_values():
    optim = get_config("shapes", "detector", ["iterations=10", "optim.lr=0.01", "optim.warmup_iters=4",
                                                "optim.warmup_factor=0.4", "optim.steps=6,8"]).optim
    # Linear warm-up from 0.004 to 0.01 over 4 iterations, then x0.1 at 6 and at 8.
    linear = [0.004, 0.0055, 0.007, 0.0085, 0.01, 0.01, 0.001, 0.001, 0.0001, 0.0001]
    # The paper's wording: lr held at 0.004 for the warm-up iterations.
    constant = [0.004, 0.004, 0.004, 0.004, 0.01, 0.01, 0.001, 0.001, 0.0001, 0.0001]
    for mode, expected in (("linear", linear), ("constant", constant)):
        optim.warmup_mode = mode
        assert [0.01 * lr_factor(it, optim) for it in range(10)] == pytest.approx(expected, rel=1e-12)
        # The same through LambdaLR, as the trainer drives it (one scheduler.step() per iteration).
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: lr_factor(it, optim))
        used = []
        for _ in range(10):
            used.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert used == pytest.approx(expected, rel=1e-12)


def test_presets_follow_the_paper_schedule():
    coco = get_config("coco", "detector")
    assert (coco.iterations, coco.optim.steps, coco.optim.warmup_iters) == (160_000, (120_000,), 10_000)
    assert (coco.optim.lr, coco.optim.lr_batch, coco.optim.warmup_factor * coco.optim.lr) == (0.01, 16, pytest.approx(0.004))
    assert (coco.optim.momentum, coco.optim.weight_decay, coco.model.min_size, coco.model.max_size) == (0.9, 1e-4, 800, 1200)
    assert coco.model.backbone == "resnet50"
    for preset in ("neon-trees", "shapes"):
        for kind in ("detector", "iou", "joint"):
            cfg = get_config(preset, kind)
            # Same shape as the paper's: decay at 3/4 of the run, warm-up over the first 1/16 (to
            # within rescale_schedule's rounding: the shapes IoU head's 1000 iterations rescale 300).
            assert cfg.optim.steps == (cfg.iterations * 3 // 4,)
            assert abs(cfg.optim.warmup_iters - cfg.iterations / 16) <= 3
    assert get_config("neon-trees", "iou").model.detector_checkpoint == "runs/neon-trees-detector/ckpt.pt"


def test_overrides_are_typed_and_bad_keys_are_named(capsys):
    cfg = get_config("shapes", "detector", ["optim.lr=0.5", "optim.steps=10,20", "deterministic=false",
                                            "data.options.num_train=7", "iterations=30"])
    assert (cfg.optim.lr, cfg.optim.steps, cfg.deterministic, cfg.data.options["num_train"]) == (0.5, (10, 20), False, 7)
    for key, value in (("optim.lrr", "1"), ("nonsense", "1"), ("iterations", "ten"), ("optim", "1"), ("iterations.x", "1")):
        with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
            apply_overrides(cfg, [f"{key}={value}"])
    with pytest.raises(ConfigError, match="'optim.steps'"):
        get_config("shapes", "detector", ["optim.steps=500"])  # beyond the last iteration
    with pytest.raises(ConfigError, match="'model.bogus'"):
        TrainConfig.from_dict({"model": {"bogus": 1}})
    # The CLI: exit status 2 and one line naming the key.
    with pytest.raises(SystemExit) as exc:
        cli_main(["train", "--config", "shapes", "--set", "optim.momentun=0.5"])
    assert exc.value.code == 2
    assert "'optim.momentun'" in capsys.readouterr().err


def test_fingerprint_ignores_operational_fields_only(capsys):
    cfg = get_config("shapes", "detector")
    same = apply_overrides(cfg, ["out_dir=elsewhere", "num_workers=3", "checkpoint_interval=7", "log_interval=3"])
    assert same.fingerprint() == cfg.fingerprint()
    for change in ("optim.lr=0.03", "seed=1", "data.options.num_train=5", "batch_size=3"):
        assert apply_overrides(cfg, [change]).fingerprint() != cfg.fingerprint(), change
    assert cli_main(["train", "--config", "shapes", "--out", "x", "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["fingerprint"] == cfg.fingerprint() and printed["config"]["out_dir"] == "x"
    # --iterations keeps the schedule's proportions: shapes' 300 / step 225 / warm-up 18 -> 100 / 75 / 6.
    assert cli_main(["train", "--config", "shapes", "--iterations", "100", "--dry-run"]) == 0
    optim = json.loads(capsys.readouterr().out)["config"]["optim"]
    assert (optim["steps"], optim["warmup_iters"]) == ([75], 6)


def test_iou_model_refuses_an_unfinished_detector_checkpoint(tmp_path):
    detector = get_config("shapes", "detector")
    save_checkpoint(tmp_path / CHECKPOINT, {"format": FORMAT, "config": detector.to_dict(), "iteration": 5})
    iou = get_config("shapes", "iou", [f"model.detector_checkpoint={tmp_path / CHECKPOINT}"])
    with pytest.raises(ConfigError, match=r"'model.detector_checkpoint'.*unfinished \(iteration 5 of 300\)"):
        build_model(iou, num_classes=3)


# ---------------------------------------------------------------------------------------------
# Training


def test_training_reduces_the_loss(data_root, tmp_path):
    cfg = tiny_config(data_root, tmp_path / "run", iterations=30, batch_size=4, checkpoint_interval=100,
                      optim__lr=0.04, optim__steps="26")
    torch.manual_seed(cfg.seed)
    untrained = dataset_loss(tiny_detector(cfg, 3), cfg)
    handler = signal.getsignal(signal.SIGINT)
    path = train(cfg)
    assert signal.getsignal(signal.SIGINT) is handler  # the trainer's handler is gone again
    ckpt = load_checkpoint(path)
    assert ckpt["iteration"] == 30 and ckpt["fingerprint"] == cfg.fingerprint()
    model = tiny_detector(cfg, ckpt["num_classes"])
    model.load_state_dict(ckpt["model"])
    trained = dataset_loss(model, cfg)
    assert trained < 0.8 * untrained, (untrained, trained)  # measured: 2.24 -> 1.62
    # The lr each logged iteration used: linear warm-up 0.016 -> 0.04 over 4 iterations, x0.1 from 26 on.
    lrs = [r["lr"] for r in read_log(tmp_path / "run")]
    assert lrs == pytest.approx([0.016, 0.022, 0.028, 0.034] + [0.04] * 22 + [0.004] * 4, rel=1e-9)


def test_atomic_save_keeps_the_previous_checkpoint_when_writing_fails(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    path = tmp_path / CHECKPOINT
    save_checkpoint(path, {"weights": torch.arange(3)})
    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_checkpoint(path, {"weights": torch.arange(5), "bad": Unpicklable()})
    assert torch.equal(torch.load(path, weights_only=True)["weights"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT]  # no temporary file left behind


def test_resume_after_sigkill_matches_an_uninterrupted_run(data_root, tmp_path):
    cfg = tiny_config(data_root, tmp_path / "killed", iterations=30, checkpoint_interval=3)
    build_dataset(cfg)  # generate the images here, not in the subprocess's time
    proc = start_cli(write_config(cfg, tmp_path / "killed.json"))
    ckpt_path = tmp_path / "killed" / CHECKPOINT
    wait_for(ckpt_path.exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted_at = load_checkpoint(ckpt_path)["iteration"]  # loads: not a partial file
    assert 3 <= interrupted_at < 30, "the run must be killed part way for this test to mean anything"

    with pytest.raises(FileExistsError):  # no accidental overwrite without resume
        train(cfg)
    with pytest.raises(ConfigError, match="optim.lr"):  # resuming under another schedule is refused
        train(apply_overrides(cfg, ["optim.lr=0.03"]), resume=True)
    resumed = load_checkpoint(train(cfg, resume=True))
    reference = load_checkpoint(train(apply_overrides(cfg, [f"out_dir={tmp_path / 'reference'}"])))

    assert resumed["iteration"] == reference["iteration"] == 30
    for name, tensor in reference["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name  # bit for bit (deterministic CPU run)
    # Same batches, losses and lr at every iteration; the killed run's extra log lines were dropped.
    strip = lambda rows: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]  # noqa: E731
    assert strip(read_log(tmp_path / "killed")) == strip(read_log(tmp_path / "reference"))


def test_sigint_stops_after_saving_a_checkpoint(data_root, tmp_path):
    cfg = tiny_config(data_root, tmp_path / "run", iterations=10_000, checkpoint_interval=10_000)
    build_dataset(cfg)
    proc = start_cli(write_config(cfg, tmp_path / "run.json"))
    wait_for(lambda: (tmp_path / "run" / LOG).exists() and len(read_log(tmp_path / "run")) >= 2, proc)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    stderr = proc.stderr_path.read_text()
    assert proc.returncode == 128 + signal.SIGINT, stderr[-3000:]
    # The only checkpoint is the one the stop wrote (the interval is never reached), after the last
    # logged iteration; it resumes.
    ckpt = load_checkpoint(tmp_path / "run" / CHECKPOINT)
    assert 2 <= ckpt["iteration"] == read_log(tmp_path / "run")[-1]["iteration"] < 10_000
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted([CHECKPOINT, LOG, "config.json"])
    assert "stopped by signal 2" in stderr


def test_two_gloo_processes_match_one_process_with_the_global_batch(data_root, tmp_path):
    # 12 images; 8 iterations of 2 images cross an epoch boundary (6 iterations per epoch).
    common = dict(model="tiny_regressor", data__options__num_train=12, iterations=8, checkpoint_interval=4,
                  optim__lr=0.05, optim__warmup_iters=2, optim__steps="6")
    ddp = tiny_config(data_root, tmp_path / "ddp", batch_size=1, **common)
    build_dataset(ddp)
    dump = tmp_path / "dump"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).resolve()), str(write_config(ddp, tmp_path / "ddp.json")), str(dump)]
    run = subprocess.run(cmd, cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-5000:]
    ranks = [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in range(2)]
    ddp_ckpt = load_checkpoint(tmp_path / "ddp" / CHECKPOINT)
    assert ddp_ckpt["world_size"] == 2 and ddp_ckpt["iteration"] == 8
    single = load_checkpoint(train(tiny_config(data_root, tmp_path / "single", batch_size=2, **common)))
    assert single["world_size"] == 1
    for name, tensor in single["model"].items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # DDP keeps the replicas identical
        assert torch.equal(ranks[0][name], ddp_ckpt["model"][name]), name  # rank 0 saved what it had
        # Same global batch, same images per iteration: equal up to float summation order.
        torch.testing.assert_close(ranks[0][name], tensor, rtol=1e-5, atol=1e-6)
    # The comparison can fail: one process with half the global batch ends far outside the tolerance.
    half = load_checkpoint(train(tiny_config(data_root, tmp_path / "half", batch_size=1, **common)))
    assert any(not torch.allclose(half["model"][k], t, rtol=1e-3, atol=1e-4) for k, t in single["model"].items())


def _torchrun_worker(config_json: str, dump_dir: str) -> None:
    """Entry point under torchrun: train, then dump this rank's weights as ``rank<RANK>.pt``."""
    config = TrainConfig.from_dict(json.loads(Path(config_json).read_text()))
    train(config)
    module = importlib.import_module(config.model.kind.partition(":")[0])  # where the factory stored the model
    Path(dump_dir).mkdir(parents=True, exist_ok=True)
    torch.save(module._LAST_MODEL.state_dict(), Path(dump_dir) / f"rank{os.environ['RANK']}.pt")


if __name__ == "__main__":
    _torchrun_worker(*sys.argv[1:3])
