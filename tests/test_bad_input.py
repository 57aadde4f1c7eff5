"""What a hostile but realistic user feeds in (issue 10): every case ends in a clear error naming the
file, record or argument, or in a correct result. The last section fuzzes every public op."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.test_nms import ref_iou_guided_nms, ref_soft_nms
from tests.test_prroi_pool import oracle
from workbench import files
from workbench.config import ConfigError, get_config
from workbench.data import CocoDetection, get_dataset
from workbench.data.__main__ import main as data_main
from workbench.data.images import decode_image
from workbench.data.validate import load_results
from workbench.models import StandaloneIoUNet, build_detector
from workbench.models.iou_net import IoUHead
from workbench.ops import (PrRoIPool, batched_iou_guided_nms, batched_nms, batched_soft_nms, box_area, box_iou,
                           iou_guided_nms, nms, prroi_pool, soft_nms)
from workbench.pipeline import PipelineOutput, PipelineSettings, run_pipeline
from workbench.refine import MIN_BOX_SIZE, optimize_boxes
from workbench.reproduce import ReproduceOptions, _cached_pipeline, _config, reproduce, trained
from workbench.train import FORMAT, load_checkpoint, save_checkpoint

SIZE = 64


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def val(data_root):
    return get_dataset("shapes", "val", root=data_root, seed=0, num_train=4, num_val=2, image_size=SIZE)


@pytest.fixture(scope="module")
def models(val):
    torch.manual_seed(0)
    detector = build_detector(val.num_classes, pretrained_backbone=False, min_size=SIZE, max_size=SIZE).eval()
    return detector, StandaloneIoUNet(detector=detector).eval()


def _options(tmp_path: Path, data_root: Path, **kwargs) -> ReproduceOptions:
    return ReproduceOptions(
        preset="shapes",
        overrides=[f"data.root={data_root}", "data.options.num_train=4", "data.options.num_val=2",
                   f"data.options.image_size={SIZE}", f"model.min_size={SIZE}", f"model.max_size={SIZE}"],
        iterations={"detector": 2, "iou": 2}, joint=False, out_dir=str(tmp_path / "reports"),
        runs_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"), **kwargs)


SETTINGS = PipelineSettings(score_thresh=0.0, raw_max_detections=20, refine_top=5, refine_iterations=2,
                            regression_iterations=1)


# ---------------------------------------------------------------------------------------------
# 1. Images without detections


def test_refinement_of_no_boxes_is_an_empty_record():
    result = optimize_boxes(lambda b: b.sum(1), torch.zeros(0, 4), iterations=3)
    assert result.boxes.shape == (0, 4) and result.scores.shape == (0,)
    assert result.trajectory.shape == (4, 0, 4) and result.gradients.shape == (3, 0, 4)


@pytest.mark.parametrize("case", ["empty --detections", "--detections leave an image out", "high score threshold"])
def test_pipeline_goes_on_through_images_without_detections(val, models, case):
    detector, iou_net = models
    first = val.image_ids[0]
    if case == "high score threshold":  # softmax scores are never above 1
        out = run_pipeline(val, detector, iou_net, PipelineSettings(score_thresh=1.0, refine_iterations=2))
    else:
        external = [] if case == "empty --detections" else [
            {"image_id": first, "category_id": val.label_to_cat_id[1], "bbox": [4.0, 5.0, 20.0, 12.5], "score": 0.7}]
        out = run_pipeline(val, None, iou_net, SETTINGS, external_detections=external)
    expected = 1 if case == "--detections leave an image out" else 0
    for name in ("raw", "nms", "iou-nms", "nms+refine/2", "iou-nms+refine/2"):
        assert len(out.sets[name]) == expected, name
        assert all(r["image_id"] == first for r in out.sets[name])
    assert len(out.trajectories) == expected


# ---------------------------------------------------------------------------------------------
# 2. Content fingerprints in the cache keys


def _copy_split(src: CocoDetection, dst: Path) -> CocoDetection:
    (dst / "images").mkdir(parents=True)
    ann = json.loads(src.ann_file.read_text())
    for info in ann["images"]:
        (dst / "images" / Path(info["file_name"]).name).write_bytes((src.img_dir / info["file_name"]).read_bytes())
        info["file_name"] = Path(info["file_name"]).name
    (dst / "ann.json").write_text(json.dumps(ann))
    return CocoDetection(dst / "ann.json", dst / "images")


def test_fingerprint_follows_content_not_timestamps(val, tmp_path, monkeypatch):
    ds = _copy_split(val, tmp_path / "copy")
    cache = tmp_path / "hashes.json"
    first = ds.fingerprint(cache)
    assert ds.fingerprint() == first  # the cache only saves work

    hashed = []
    real = files.sha256_file
    monkeypatch.setattr(files, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    assert ds.fingerprint(cache) == first and hashed == []  # fast path: size and mtime unchanged
    image = ds.img_dir / ds.coco.imgs[ds.image_ids[0]]["file_name"]
    os.utime(image, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched, same bytes
    assert ds.fingerprint(cache) == first and hashed == [image.name]

    pixels = decode_image(image)
    Image.fromarray((255 - pixels * 255).round().astype(np.uint8)).save(image)  # replaced in place
    replaced = ds.fingerprint(cache)
    assert replaced != first
    ann = json.loads(ds.ann_file.read_text())
    ann["annotations"][0]["bbox"][0] += 1
    ds.ann_file.write_text(json.dumps(ann))  # an edited annotation
    assert CocoDetection(ds.ann_file, ds.img_dir).fingerprint(cache) not in (first, replaced)


def test_editing_train_json_or_a_val_image_changes_the_cache_keys(tmp_path):
    data_root = tmp_path / "data"  # its own copy: this test edits it
    opts = _options(tmp_path, data_root)
    before = _config(opts, "detector").out_dir
    train_json = next(data_root.glob("shapes-*/annotations/train.json"))
    ann = json.loads(train_json.read_text())
    ann["annotations"][0]["bbox"][0] += 1
    train_json.write_text(json.dumps(ann))
    after = _config(opts, "detector").out_dir
    assert after != before

    val_cfg = get_config("shapes", "detector", [*opts.overrides, "data.split=val"])
    from workbench.reproduce import data_fingerprint

    key = data_fingerprint(val_cfg)
    image = next(data_root.glob("shapes-*/images/val/*.png"))
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(image)
    assert data_fingerprint(val_cfg) != key


# ---------------------------------------------------------------------------------------------
# 3. Corrupt and unusual images


def _coco_folder(tmp_path: Path, images: dict[str, bytes], sizes: list[tuple[int, int]]) -> tuple[Path, Path]:
    (tmp_path / "img").mkdir()
    for name, data in images.items():
        (tmp_path / "img" / name).write_bytes(data)
    ann = {"images": [{"id": i + 1, "file_name": n, "width": w, "height": h}
                      for i, (n, (w, h)) in enumerate(zip(images, sizes))],
           "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    return tmp_path / "ann.json", tmp_path / "img"


def _encoded(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_data_check_decodes_images_and_names_a_truncated_jpeg(tmp_path, capsys):
    noise = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    jpeg = _encoded(noise, "JPEG", quality=95)
    ann, img = _coco_folder(tmp_path, {"good.png": _encoded(noise, "PNG"), "cut.jpg": jpeg[: len(jpeg) * 2 // 3]},
                            [(160, 120), (160, 120)])
    assert data_main(["check", str(ann), str(img), "--no-decode"]) == 0  # files exist: the old check passes
    assert data_main(["check", str(ann), str(img)]) == 1
    err = capsys.readouterr().err
    assert "image id 2" in err and "cut.jpg" in err and "1 of 2 images" in err and "good.png" not in err


def test_sixteen_bit_grayscale_is_scaled_to_unit_range(tmp_path):
    grey = (np.arange(32 * 48, dtype=np.uint32).reshape(32, 48) * 43).astype(np.uint16)  # 0 .. 66005 mod 2^16
    ann, img = _coco_folder(tmp_path, {"deep.png": _encoded(grey, "PNG")}, [(48, 32)])
    pixels = decode_image(img / "deep.png")
    expected = grey.astype(np.float64) / 65535
    assert pixels.shape == (32, 48, 3) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels, np.repeat(expected[:, :, None], 3, 2), rtol=0, atol=1e-7)
    loaded = CocoDetection(ann, img).load_image(1)
    assert loaded.shape == (3, 32, 48) and float((loaded == 1.0).float().mean()) < 0.01  # was ~99% at 1.0


def test_eight_bit_images_load_exactly_as_before(val):
    # The previous loader: PIL -> uint8 -> float32 / 255 in torch.
    info = val.coco.imgs[val.image_ids[0]]
    with Image.open(val.img_dir / info["file_name"]) as im:
        before = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).float().div_(255.0)
    assert torch.equal(val.load_image(val.image_ids[0]), before)


def test_decompression_bomb_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    path.write_bytes(_encoded(np.zeros((64, 64, 3), np.uint8), "PNG"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 4096 pixels > 2 x 100: PIL refuses
    with pytest.raises(ValueError, match=r"big\.png: image too large"):
        decode_image(path)


def test_not_an_image_names_the_file(tmp_path):
    (tmp_path / "x.png").write_text("hello")
    with pytest.raises(ValueError, match=r"x\.png: cannot decode"):
        decode_image(tmp_path / "x.png")


# ---------------------------------------------------------------------------------------------
# 4. --detections


GOOD = {"image_id": 1, "category_id": 1, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.5}


@pytest.mark.parametrize("record, match", [
    ({**GOOD, "bbox": [1.0, 2.0, float("nan"), 4.0]}, r"detection \[1\]: bbox must be 4 finite numbers"),
    ({**GOOD, "bbox": [1.0, 2.0, 3.0]}, r"detection \[1\]: bbox must be 4 finite numbers"),
    ({**GOOD, "bbox": [1.0, 2.0, 0.0, 4.0]}, r"detection \[1\]: bbox width and height must be > 0"),
    ({**GOOD, "score": "0.9"}, r"detection \[1\]: score must be a finite number"),
    ({**GOOD, "image_id": 99}, r"detection \[1\]: image_id 99 is not an image"),
    ({**GOOD, "category_id": 7}, r"detection \[1\]: category_id 7 is not a category"),
    ({k: v for k, v in GOOD.items() if k != "score"}, r"detection \[1\]: missing \['score'\]"),
])
def test_bad_detection_records_are_named(tmp_path, record, match):
    path = tmp_path / "dets.json"
    path.write_text(json.dumps([GOOD, record]))
    with pytest.raises(ValueError, match=f"dets.json: {match}"):
        load_results(path, {1, 2}, {1})


def test_malformed_or_missing_detections_file_is_named(tmp_path):
    (tmp_path / "broken.json").write_text('[{"image_id": 1,')
    with pytest.raises(ValueError, match=r"broken\.json: not a valid JSON file"):
        load_results(tmp_path / "broken.json", {1}, {1})
    with pytest.raises(FileNotFoundError, match=r"nope\.json: detections file not found"):
        load_results(tmp_path / "nope.json", {1}, {1})


def test_detections_are_checked_before_any_training(tmp_path, data_root, monkeypatch):
    import workbench.reproduce as rep

    monkeypatch.setattr(rep, "train", lambda *a, **k: pytest.fail("trained before checking --detections"))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        reproduce(_options(tmp_path, data_root, external_detections=str(tmp_path / "missing.json")))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{**GOOD, "image_id": 12345}]))
    with pytest.raises(ValueError, match=r"bad\.json: detection \[0\]: image_id 12345"):
        reproduce(_options(tmp_path, data_root, external_detections=str(bad)))


# ---------------------------------------------------------------------------------------------
# 5. Damaged artefacts


def test_truncated_pipeline_cache_is_named_and_recomputed(tmp_path, capsys):
    path = tmp_path / "cache" / "p.pt"
    calls = []

    def compute():
        calls.append(1)
        return PipelineOutput(image_ids=[1, 2, 3], seconds={"x": [0.5] * 1000})

    _cached_pipeline(path, compute)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    out = _cached_pipeline(path, compute)
    assert out.image_ids == [1, 2, 3] and len(calls) == 2
    assert f"{path}: cached pipeline output cannot be read" in capsys.readouterr().err
    assert _cached_pipeline(path, compute).image_ids == [1, 2, 3] and len(calls) == 2  # whole again


def test_truncated_checkpoint_is_refused_with_its_path(tmp_path):
    cfg = get_config("shapes", "detector", [f"out_dir={tmp_path / 'run'}"], iterations=2)
    path = tmp_path / "run" / "ckpt.pt"
    save_checkpoint(path, {"format": FORMAT, "iteration": 2, "fingerprint": cfg.fingerprint(),
                           "model": {"w": torch.randn(1000)}})
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(ValueError, match=f"{path}: cannot read this checkpoint"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match=f"{path}: cannot read this checkpoint"):
        trained(cfg)


def test_atomic_write_leaves_the_old_file_on_error(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), files.atomic_write(path) as f:
        f.write(b"new, half written")
        raise RuntimeError("killed")
    assert path.read_bytes() == b"old" and files.stale_temporaries(path) == []
    with files.atomic_write(path) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new" and oct(path.stat().st_mode & 0o777) == oct(0o644)


# ---------------------------------------------------------------------------------------------
# 6. Config


@pytest.mark.parametrize("override, key", [
    ("optim.lr=inf", "optim.lr"), ("optim.lr=nan", "optim.lr"), ("optim.weight_decay=nan", "optim.weight_decay"),
    ("optim.weight_decay=-1e-4", "optim.weight_decay"), ("optim.momentum=1.5", "optim.momentum"),
    ("optim.gamma=inf", "optim.gamma"), ("model.min_size=-5", "model.min_size"), ("model.max_size=10", "model.max_size"),
    ("seed=-1", "seed"), ("optim.warmup_factor=nan", "optim.warmup_factor"),
])
def test_config_numbers_must_be_finite_and_in_range(override, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        get_config("shapes", "detector", [override])


def test_malformed_config_json_is_named(tmp_path, capsys):
    from workbench.__main__ import main

    (tmp_path / "config.json").write_text('{"iterations": 3,')
    with pytest.raises(ConfigError, match=r"config\.json: not a valid JSON config file"):
        get_config(str(tmp_path / "config.json"))
    (tmp_path / "config.json").write_text('{"optim": {"lr": -1}}')
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(tmp_path / "config.json"), "--dry-run"])
    assert e.value.code == 2 and "config key 'optim.lr'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 7. Two runs in one folder


def test_a_second_run_waits_for_the_first_and_reuses_its_checkpoint(tmp_path, monkeypatch):
    import workbench.reproduce as rep

    cfg = get_config("shapes", "detector", [f"out_dir={tmp_path / 'run'}"], iterations=2)
    trainings = []

    def fake_train(config, resume):
        trainings.append(threading.current_thread().name)
        time.sleep(1.5)  # the other run arrives meanwhile
        path = Path(config.out_dir) / "ckpt.pt"
        save_checkpoint(path, {"format": FORMAT, "iteration": config.iterations, "fingerprint": config.fingerprint()})
        return path

    monkeypatch.setattr(rep, "train", fake_train)
    results = []
    runs = [threading.Thread(target=lambda: results.append(trained(cfg)), name=f"run{i}") for i in range(2)]
    for run in runs:
        run.start()
        time.sleep(0.3)
    for run in runs:
        run.join(30)
    assert len(trainings) == 1 and results == [Path(cfg.out_dir) / "ckpt.pt"] * 2


def test_a_lock_says_who_holds_it_and_a_dead_holders_lock_is_taken_over(tmp_path):
    lock = tmp_path / "run.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from workbench.files import locked\n"
         f"with locked({str(lock)!r}, 'training the detector'):\n    print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        said, got = [], threading.Event()

        def second():
            with files.locked(lock, "second run", poll_s=0.1, say=said.append):
                got.set()

        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(1.0)
        assert not got.is_set()
        assert len(said) == 1 and f"process {holder.pid}" in said[0] and "training the detector" in said[0]
        os.kill(holder.pid, signal.SIGKILL)  # dies holding the lock
        assert got.wait(10)
        waiter.join(10)
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_ranks_agree_under_torchrun_and_keep_the_group_across_trainings(tmp_path):
    # reproduce under torchrun: its process group must survive each training's teardown (gloo cannot
    # form a group twice under torchrun), and every rank must take rank 0's locked view.
    script = tmp_path / "ranks.py"
    script.write_text(
        "import sys, torch.distributed as dist\n"
        "from pathlib import Path\n"
        "from workbench import distributed\n"
        "import workbench.reproduce as rep\n"
        "from workbench.config import get_config\n"
        "from workbench.train import FORMAT, save_checkpoint\n"
        "outer = distributed.setup('cpu')\n"
        "cfg = get_config('shapes', 'detector', [f'out_dir={sys.argv[1]}'], iterations=2)\n"
        "calls = []\n"
        "def fake_train(config, resume):\n"
        "    ctx = distributed.setup('cpu')\n"
        "    calls.append(1)\n"
        "    if ctx.is_main:\n"
        "        save_checkpoint(Path(config.out_dir) / 'ckpt.pt', {'format': FORMAT, 'iteration': config.iterations,\n"
        "                                                       'fingerprint': config.fingerprint()})\n"
        "    distributed.teardown(ctx)\n"
        "    return Path(config.out_dir) / 'ckpt.pt'\n"
        "rep.train = fake_train\n"
        "rep.trained(cfg); rep.trained(cfg)\n"
        "print(f'rank {outer.rank}: trainings {len(calls)}, group {dist.is_initialized()}', flush=True)\n"
        "distributed.teardown(outer)\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                           str(script), str(tmp_path / "run")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(line for line in proc.stdout.splitlines() if line.startswith("rank")) == [
        "rank 0: trainings 1, group True", "rank 1: trainings 1, group True"]


# ---------------------------------------------------------------------------------------------
# 8. Refinement keeps boxes valid; the IoU head scores every box


def _pyramid(size: int = SIZE, channels: int = 256) -> OrderedDict:
    g = torch.Generator().manual_seed(0)
    return OrderedDict((str(i), torch.randn(1, channels, size // 4 // 2**i, size // 4 // 2**i, generator=g))
                       for i in range(4))


DEGENERATE = torch.tensor([[10.0, 10.0, 50.0, 50.0], [30.0, 10.0, 20.0, 50.0], [5.0, 5.0, 5.0, 5.0],
                           [-1e4, -1e4, 1e4, 1e4], [70.0, 70.0, 90.0, 90.0], [10.0, 40.0, 40.0, 30.0]])


def test_iou_head_returns_one_score_per_box_whatever_the_boxes():
    # Before: a box inverted on one axis (negative area) got no FPN level, so the head returned
    # fewer rows than boxes and crashed in the per-class gather (models/iou_net.py).
    torch.manual_seed(0)
    head = IoUHead(num_classes=3).eval()
    labels = torch.tensor([1, 2, 3, 1, 2, 3])
    scores = head.predict_iou(_pyramid(), [DEGENERATE], [labels], [(SIZE, SIZE)])
    assert scores.shape == (6,) and bool(torch.isfinite(scores).all())
    with pytest.raises(ValueError, match=r"boxes\[0\]"):
        head.predict_iou(_pyramid(), [DEGENERATE[:, :3]], [labels], [(SIZE, SIZE)])
    with pytest.raises(ValueError, match=r"labels\[0\]"):
        head.predict_iou(_pyramid(), [DEGENERATE], [labels[:2]], [(SIZE, SIZE)])


def _assert_valid(boxes: torch.Tensor, height: int, width: int) -> None:
    w, h = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    assert bool((w >= MIN_BOX_SIZE - 1e-4).all() and (h >= MIN_BOX_SIZE - 1e-4).all())
    assert bool((boxes[..., 0::2] >= 0).all() and (boxes[..., 0::2] <= width).all())
    assert bool((boxes[..., 1::2] >= 0).all() and (boxes[..., 1::2] <= height).all())


@pytest.mark.parametrize("name, score_fn", [
    ("grow past the image", lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / 100),
    ("shrink to nothing", lambda b: -(b[:, 2] - b[:, 0]) - (b[:, 3] - b[:, 1])),
    ("drift off the image", lambda b: -b[:, 0] - b[:, 1] - b[:, 2] - b[:, 3]),
])
def test_refinement_keeps_every_box_inside_the_image_with_a_positive_size(name, score_fn):
    start = torch.tensor([[10.0, 10.0, 40.0, 30.0], [0.0, 0.0, 60.0, 48.0], [1.0, 1.0, 3.0, 3.0]])
    result = optimize_boxes(score_fn, start, iterations=5, step_size=2.0, degeneration=-1e9, image_size=(48, 60))
    _assert_valid(result.trajectory[1:], 48, 60)


@pytest.mark.parametrize("step_size, step_scaling", [(0.5, "log"), (500.0, "width")])
def test_large_steps_with_the_real_head_never_crash(step_size, step_scaling):
    # The crash: λ = 0.5 with the gradient scaled by w² (the "log" reading) made boxes
    # degenerate and the head fail; so does a large λ. Every step must now hand the head valid boxes.
    torch.manual_seed(0)
    head = IoUHead(num_classes=3).eval()
    feats, labels = _pyramid(), torch.tensor([1, 2, 3, 1, 2, 3])
    seen = []

    def score(b):
        seen.append(b.detach().clone())
        return head.predict_iou(feats, [b], [labels], [(SIZE, SIZE)])

    start = DEGENERATE.clamp(0, SIZE)
    result = optimize_boxes(score, start, iterations=5, step_size=step_size, degeneration=-1e9, image_size=(SIZE, SIZE),
                            step_scaling=step_scaling)
    assert result.predicted.shape == (6, 6)
    _assert_valid(torch.stack(seen[1:]), SIZE, SIZE)


# ---------------------------------------------------------------------------------------------
# 9. Ops edges


def test_box_iou_float16_large_boxes_do_not_overflow():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 300], 1).half()  # 300 x 300 px: area 90000 > float16's 65504
    ours = box_iou(boxes, boxes)
    assert ours.dtype == torch.float16 and bool(torch.isfinite(ours).all())
    torch.testing.assert_close(ours.float(), torchvision.ops.box_iou(boxes, boxes), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("shape", [(1, 2, 0, 5), (1, 0, 5, 5), (1, 2, 5, 0)])
def test_prroi_pool_rejects_empty_feature_maps(shape):
    with pytest.raises(ValueError, match="features must have C, H, W >= 1"):
        prroi_pool(torch.zeros(shape), torch.tensor([[0.0, 1, 1, 3, 3]]), 2)


def test_prroi_pool_rejects_rois_that_overflow_once_scaled():
    with pytest.raises(ValueError, match=r"rois\[:, 1:\] \* spatial_scale"):
        prroi_pool(torch.zeros(1, 1, 4, 4), torch.tensor([[0.0, 0, 0, 3e38, 3e38]]), 2, spatial_scale=16.0)
    with pytest.raises(ValueError, match="extents"):
        prroi_pool(torch.zeros(1, 1, 4, 4), torch.tensor([[0.0, -3e38, 0, 3e38, 1]]), 2)


def test_soft_nms_sigma_and_prroi_module_scale_are_checked_early():
    boxes, scores = torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([0.5])
    for sigma in (-1, 0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
            soft_nms(boxes, scores, method="gaussian", sigma=sigma)
    with pytest.raises(ValueError, match="spatial_scale must be a finite number > 0"):
        PrRoIPool(2, -0.5)


# ---------------------------------------------------------------------------------------------
# Fuzzing every public op: a named ValueError/TypeError, or the reference result.

MODERATE = [0.0, 1.0, 2.5, 7.0, 10.0, -3.0, 3.25, 40.0]
SPECIAL = [float("nan"), float("inf"), -float("inf")]
# Value scales: 100 makes float16 areas overflow (past 65504), 6e4 float16 coordinates, 1e30 float32 areas.
SCALES = [1.0, 1.0, 1.0, 100.0, 100.0, 6e4, 1e30, -1e30]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.bool]
FLOATS = DTYPES[:4]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def tensors(draw, rows=st.integers(0, 5), cols=(4,), values=MODERATE):
    """Mostly well-shaped floating tensors of moderate values; sometimes huge values, one NaN or
    inf, another dtype or shape, or not a tensor at all."""
    kind = draw(st.sampled_from(["tensor"] * 12 + ["shape", "list", "none"]))
    if kind == "none":
        return None
    n = draw(rows)
    shape = (n, draw(st.sampled_from(cols))) if len(cols) else (n,)
    if kind == "shape":
        shape = draw(st.sampled_from([(n,), (n, 3), (n, 4, 1), (), (n, 6)]))
    numel = int(np.prod(shape)) if shape else 1
    data = np.array(draw(st.lists(st.sampled_from(values), min_size=numel, max_size=numel)), dtype=np.float64)
    data *= draw(st.sampled_from(SCALES))
    if numel and draw(st.integers(0, 4)) == 0:
        data[draw(st.integers(0, numel - 1))] = draw(st.sampled_from(SPECIAL))
    array = data.reshape(shape)
    if kind == "list":
        return array.tolist()
    dtype = draw(st.sampled_from(FLOATS * 3 + DTYPES))
    if not dtype.is_floating_point:
        array = np.nan_to_num(array, posinf=0, neginf=0).clip(-1e6, 1e6)
    return torch.from_numpy(np.asarray(array)).to(dtype)


@st.composite
def detections(draw) -> dict:
    """boxes, scores, ious, idxs for the NMS family: mostly one length N, sometimes not."""
    n = draw(st.integers(0, 6))
    rows = st.sampled_from([n] * 6 + [n + 1])
    d = {"boxes": draw(tensors(rows=rows)), "scores": draw(tensors(rows=rows, cols=())),
         "ious": draw(tensors(rows=rows, cols=(), values=[0.3, 0.5, 0.9, 1.0])),
         "idxs": draw(tensors(rows=rows, cols=(), values=[0.0, 1.0, 2.0]))}
    if all(isinstance(t, torch.Tensor) for t in d.values()) and draw(st.integers(0, 4)):  # mostly consistent dtypes
        d["scores"], d["ious"] = d["scores"].to(d["boxes"].dtype), d["ious"].to(d["boxes"].dtype)
        d["idxs"] = d["idxs"].long()
    return d


NUMBERS = st.sampled_from([0.0, 0.3, 0.5, 0.7, 1.0, 0.3, 0.5, 1.5, -0.2, 2,
                           float("nan"), float("inf"), True, "0.5", None])


def _named(error: Exception, names: tuple[str, ...]) -> None:
    event(f"rejected: {type(error).__name__}")
    assert isinstance(error, (ValueError, TypeError)), repr(error)
    assert any(n in str(error) for n in names), str(error)


def _moderate(*ts: torch.Tensor) -> bool:
    return all(t.numel() == 0 or float(t.double().abs().max()) < 1e4 for t in ts)


@settings(FUZZ, max_examples=400)
@given(a=tensors(), b=tensors())
@example(a=torch.tensor([[0.0, 0.0, 1.0003e30, 1.0003e30]], dtype=torch.bfloat16),  # found by CI
         b=torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1e30, 1e30]], dtype=torch.float64))
@example(a=torch.tensor([[0.0, 0.0, 300.0, 300.0]], dtype=torch.float16),
         b=torch.tensor([[0.0, 0.0, 300.0, 150.0]], dtype=torch.float16))
def test_fuzz_box_iou(a, b):
    try:
        ours = box_iou(a, b)
    except Exception as e:
        _named(e, ("boxes1", "boxes2", "device"))
        return
    dtype = torch.promote_types(a.dtype, b.dtype)
    if {a.dtype, b.dtype} & {torch.float16, torch.bfloat16}:
        # The documented contract: half-precision boxes are computed in float32 (or the wider
        # input's dtype) and the IoU cast back. torchvision computes the areas in the input dtype,
        # which overflows for large boxes (bfloat16 1e30 px: area inf, IoU 0), so it is the oracle
        # only in the compute dtype.
        compute = torch.promote_types(dtype, torch.float32)
        theirs = torchvision.ops.box_iou(a.to(compute), b.to(compute)).to(dtype)
        torch.testing.assert_close(ours, theirs, equal_nan=True)
    else:
        theirs = torchvision.ops.box_iou(a, b)
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0, equal_nan=True)


@FUZZ
@given(boxes=tensors())
def test_fuzz_box_area(boxes):
    try:
        ours = box_area(boxes)
    except Exception as e:
        _named(e, ("boxes",))
        return
    torch.testing.assert_close(ours, torchvision.ops.box_area(boxes), atol=0, rtol=0)


@FUZZ
@given(d=detections(), thr=NUMBERS)
def test_fuzz_nms(d, thr):
    boxes, scores = d["boxes"], d["scores"]
    try:
        keep = nms(boxes, scores, thr)
    except Exception as e:
        _named(e, ("boxes", "scores", "iou_threshold"))
        return
    dtype = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    assert torch.equal(keep, torchvision.ops.nms(boxes.to(dtype), scores.to(dtype), float(thr)))


@FUZZ
@given(d=detections(), thr=NUMBERS)
def test_fuzz_batched_nms(d, thr):
    boxes, scores, idxs = d["boxes"], d["scores"], d["idxs"]
    try:
        keep = batched_nms(boxes, scores, idxs, thr)
    except Exception as e:
        _named(e, ("boxes", "scores", "idxs", "iou_threshold"))
        return
    dtype = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    boxes, scores = boxes.to(dtype), scores.to(dtype)
    per_class = [int(members[k]) for c in idxs.unique().tolist() for members in [torch.where(idxs == c)[0]]
                 for k in torchvision.ops.nms(boxes[members], scores[members], float(thr))]
    assert sorted(keep.tolist()) == sorted(per_class)


@FUZZ
@given(d=detections(), thr=NUMBERS, sigma=NUMBERS, score_thr=NUMBERS,
       method=st.sampled_from(["linear", "gaussian", "linear", "gaussian", "hard", 1]))
def test_fuzz_soft_nms(d, thr, sigma, score_thr, method):
    boxes, scores = d["boxes"], d["scores"]
    try:
        keep, new = soft_nms(boxes, scores, thr, sigma=sigma, score_threshold=score_thr, method=method)
    except Exception as e:
        _named(e, ("boxes", "scores", "iou_threshold", "sigma", "score_threshold", "method"))
        return
    assert keep.dtype == torch.int64 and new.dtype == scores.dtype and keep.shape == new.shape
    if _moderate(boxes, scores):  # the reference computes in float64, the op in float32 or float64
        ref_keep, ref_scores, _ = ref_soft_nms(boxes.double(), scores.double(), float(thr), float(sigma),
                                               float(score_thr), method)
        if boxes.dtype == torch.float64:
            assert keep.tolist() == ref_keep
            torch.testing.assert_close(new, torch.tensor(ref_scores, dtype=new.dtype).reshape(-1))
        else:
            assert set(keep.tolist()) <= set(range(len(boxes)))


@FUZZ
@given(d=detections(), thr=NUMBERS)
def test_fuzz_iou_guided_nms(d, thr):
    boxes, scores, ious = d["boxes"], d["scores"], d["ious"]
    try:
        keep, new = iou_guided_nms(boxes, scores, ious, thr)
    except Exception as e:
        _named(e, ("boxes", "scores", "ious", "iou_threshold", "device", "dtype"))
        return
    if _moderate(boxes) and boxes.dtype == torch.float64:
        ref_keep, ref_scores, _ = ref_iou_guided_nms(boxes, scores, ious, float(thr))
        assert keep.tolist() == ref_keep
        assert new.tolist() == ref_scores
    assert keep.shape == new.shape and len(set(keep.tolist())) == len(keep)


@FUZZ
@given(d=detections(), thr=NUMBERS, soft=st.booleans())
def test_fuzz_batched_soft_and_iou_guided_nms(d, thr, soft):
    boxes, scores, ious, idxs = d["boxes"], d["scores"], d["ious"], d["idxs"]
    try:
        if soft:
            keep, new = batched_soft_nms(boxes, scores, idxs, thr)
        else:
            keep, new = batched_iou_guided_nms(boxes, scores, ious, idxs, thr)
    except Exception as e:
        _named(e, ("boxes", "scores", "ious", "idxs", "iou_threshold", "device", "dtype"))
        return
    assert keep.shape == new.shape and len(set(keep.tolist())) == len(keep)
    assert set(keep.tolist()) <= set(range(len(boxes)))


@st.composite
def prroi_args(draw):
    size = st.sampled_from([1, 2, 3, 5, 1, 2, 3, 5, 0])
    n, c, h, w = draw(st.sampled_from([1, 2, 1, 2, 0])), draw(size), draw(size), draw(size)
    dtype = draw(st.sampled_from(FLOATS * 3 + DTYPES))
    features = torch.from_numpy(np.random.default_rng(draw(st.integers(0, 9))).normal(size=(n, c, h, w))).to(dtype)
    if draw(st.booleans()) and features.numel() and dtype.is_floating_point:
        features.view(-1)[0] = draw(st.sampled_from([float("nan"), float("inf"), 1e30]))
    rois = draw(tensors(cols=(5,), values=[0.0, 1.0, 0.5, 2.7, 4.0, -1.5]))
    if isinstance(rois, torch.Tensor) and rois.dim() == 2 and rois.shape[1] == 5:
        rois[:, 0] = draw(st.sampled_from([0, 0, 0, 1, -1, 0.5]))  # the batch column
    output_size = draw(st.sampled_from([1, 2, (2, 3), 3] * 3 + [0, -1, (2,), True, 2.0]))
    scale = draw(st.sampled_from([1.0, 0.5, 1 / 16, 16.0] * 3 + [0.0, -0.5, float("nan"), float("inf"), 1e30, True]))
    return features, rois, output_size, scale


@FUZZ
@given(args=prroi_args())
@example(args=(torch.tensor([[[[float("inf")]]]]),  # found by CI: NaN in float32 where float64 gives inf
               torch.tensor([[0.0, -1.5e30, -1.5e30, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]]), 1, 1.0))
def test_fuzz_prroi_pool(args):
    features, rois, output_size, scale = args
    try:
        out = prroi_pool(features, rois, output_size, scale)
    except Exception as e:
        _named(e, ("features", "rois", "output_size", "spatial_scale", "device", "dtype"))
        return
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    assert out.shape == (len(rois), features.shape[1], ph, pw) and out.dtype == features.dtype
    scaled = rois[:, 1:].double() * scale
    if bool(torch.isfinite(features).all()) and (scaled.numel() == 0 or float(scaled.abs().max()) < 50):
        expected = oracle(features.double().numpy(), rois.double().numpy(), ph, pw, scale)
        tol = 1e-2 if features.dtype in (torch.float16, torch.bfloat16) else 1e-5
        np.testing.assert_allclose(out.double().numpy(), expected, rtol=tol, atol=tol)
    else:  # far outside the oracle's reach: the same op in float64 is the reference
        reference = prroi_pool(features.double(), rois.double(), output_size, scale)
        # Where the reference is inf/NaN (non-finite features), the output must be non-finite too;
        # which one depends on the dtype's range (a 1e30 px box's area is inf in float32: inf/inf).
        finite = torch.isfinite(reference)
        assert not torch.isfinite(out.double()[~finite]).any()
        torch.testing.assert_close(out.double()[finite], reference[finite], rtol=1e-2, atol=1e-3)
