"""Benchmark the ops against their torchvision peers in the same run, and the pipeline's stages.

    python benchmarks/bench_ops.py [--device cpu|cuda|all] [--repeat N] [--quick] [--pipeline-images N]

Prints a table and writes ``benchmarks/results/ops-<device name>.md`` and ``.json``. Timings are
medians over at least ``--repeat`` runs after a warm-up, ours and the peer's calls alternating;
ratios (ours / peer) are what carries across machines. PrRoIPool's peer is
``torchvision.ops.roi_align`` (sampling_ratio 2, the usual setting): it reads 4 points per bin where
PrRoIPool integrates exactly, so PrRoIPool does more work. The peer of every NMS variant is
``torchvision.ops.nms`` on the same boxes (the issue's yardstick: Soft-NMS has no torchvision
counterpart).

On the CPU it also times the pipeline (:func:`workbench.pipeline.run_pipeline`) per stage and per
image on the validation images of the ``shapes`` and ``neon-trees`` presets, with the checkpoints
``reproduce --config <preset> --no-joint`` uses (without its IoU-Net checkpoint, an untrained IoU
head on the detector's backbone, which costs the same), the first image left out as warm-up. The row
that matters is refinement (after IoU-guided NMS) / detector; beside it, the IoU head's fully
connected layers alone on the batches refinement scored (:func:`head_layers_seconds`), a floor no
faster pooling can go below. The same products are counted in floating-point operations beside the
detector's (:func:`detector_flops`), which says, whatever the host, how much arithmetic refinement
asks of a CPU against the detector it is compared with. The IoU-Net stage reuses the detector's maps
when its frozen backbone has the same weights; refinement after NMS refines only the boxes IoU-guided
NMS did not keep (the others' refinement is the same).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from workbench import ops
from workbench.files import atomic_write

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = Path(__file__).resolve().parents[1] / "runs"
PRESETS = ("shapes", "neon-trees")
DETECTOR_STAGE, REFINE_STAGE = "detector (backbone + heads)", "refinement (iou-nms)"
FC_FLOOR = "refinement (iou-nms): the IoU head's fully connected layers alone"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def timeit(fns: list[Callable[[], object]], device: str, repeat: int, budget_s: float = 1.0) -> list[float]:
    """Median wall time of each of ``fns`` in milliseconds, the calls alternating.

    Alternating, not timing one function ``repeat`` times and then the next, so that a host whose
    speed drifts (a shared VM) slows both sides of a ratio alike. At least ``repeat`` rounds, more
    (up to 200) while they fit in ``budget_s``: a millisecond op needs many for a stable median.
    """

    def once(fn: Callable[[], object]) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3

    round_ms = sum(once(fn) for fn in fns)  # also the warm-up
    rounds = max(repeat, min(200, int(budget_s * 1e3 / max(round_ms, 1e-3))))
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, spent in zip(fns, times):
            spent.append(once(fn))
    return [statistics.median(spent) for spent in times]


def fpn_like_inputs(device: str, quick: bool, seed: int = 0):
    """Stride-8 FPN level of two 800x1216 images, 512 RoIs of 16-256 px (the scales that map there)."""
    gen = torch.Generator().manual_seed(seed)
    channels, h, w, k = (64, 50, 76, 128) if quick else (256, 100, 152, 512)
    features = torch.randn(2, channels, h, w, generator=gen)
    size = 16 + 240 * torch.rand(k, 2, generator=gen)
    corner = torch.rand(k, 2, generator=gen) * (torch.tensor([w, h]) * 8 - size)
    rois = torch.cat([torch.randint(0, 2, (k, 1), generator=gen).float(), corner, corner + size], 1)
    return features.to(device), rois.to(device)


def detection_inputs(device: str, n: int, seed: int = 0):
    """``n`` boxes in clusters, as a detector emits them before NMS."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.rand(max(1, n // 20), 2, generator=gen) * 1000
    pick = torch.randint(0, len(centres), (n,), generator=gen)
    xy = centres[pick] + 10 * torch.randn(n, 2, generator=gen)
    wh = 40 + 10 * torch.randn(n, 2, generator=gen).abs()
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(n, generator=gen)
    ious = torch.rand(n, generator=gen)
    return boxes.to(device), scores.to(device), ious.to(device)


def run(device: str, repeat: int, quick: bool) -> list[dict]:
    rows = []

    def add(op: str, size: str, ours: Callable, peer: Callable, peer_name: str) -> None:
        t_ours, t_peer = timeit([ours, peer], device, repeat)
        rows.append({"op": op, "size": size, "ours_ms": round(t_ours, 3), "peer": peer_name,
                     "peer_ms": round(t_peer, 3), "ratio": round(t_ours / t_peer, 2)})
        print(f"  {op:<28} {size:<22} {t_ours:9.3f} ms   {peer_name} {t_peer:9.3f} ms  x{t_ours / t_peer:.2f}")

    features, rois = fpn_like_inputs(device, quick)
    size = f"{tuple(features.shape)} K={len(rois)}"
    scale = 1 / 8
    add("prroi_pool fwd 7x7", size, lambda: ops.prroi_pool(features, rois, 7, scale),
        lambda: torchvision.ops.roi_align(features, rois, 7, scale, sampling_ratio=2), "roi_align")

    f_grad, r_grad = features.clone().requires_grad_(True), rois.clone().requires_grad_(True)

    def prroi_fwd_bwd():
        ops.prroi_pool(f_grad, r_grad, 7, scale).sum().backward()

    def roi_align_fwd_bwd():
        torchvision.ops.roi_align(f_grad, rois, 7, scale, sampling_ratio=2).sum().backward()

    add("prroi_pool fwd+bwd (f, box)", size, prroi_fwd_bwd, roi_align_fwd_bwd, "roi_align (f only)")

    for n in ((500, 2000) if quick else (1000, 5000)):
        boxes, scores, ious = detection_inputs(device, n)
        peer = lambda: torchvision.ops.nms(boxes, scores, 0.5)  # noqa: E731
        add("nms 0.5", f"N={n}", lambda: ops.nms(boxes, scores, 0.5), peer, "torchvision nms")
        add("iou_guided_nms 0.5", f"N={n}", lambda: ops.iou_guided_nms(boxes, scores, ious, 0.5),
            lambda: torchvision.ops.nms(boxes, ious, 0.5), "torchvision nms")
        add("soft_nms linear", f"N={n}", lambda: ops.soft_nms(boxes, scores, method="linear"), peer, "torchvision nms")
        add("soft_nms gaussian", f"N={n}", lambda: ops.soft_nms(boxes, scores, method="gaussian"), peer,
            "torchvision nms")
    return rows


def pipeline_stages(preset: str, images: int) -> dict | None:
    """Mean seconds per image of each pipeline stage on ``images`` validation images of ``preset`` (CPU)."""
    # reproduce's paths are relative to the repository root: data, checkpoints (the IoU-Net's config
    # names its detector's by one, and its run folder is named after its config).
    with contextlib.chdir(RUNS.parent):
        return _pipeline_stages(preset, images)


def _pipeline_stages(preset: str, images: int) -> dict | None:
    from workbench.models import StandaloneIoUNet
    from workbench.pipeline import PipelineSettings, run_pipeline
    from workbench.reproduce import ReproduceOptions, load_model
    from workbench.reproduce import stages as reproduce_stages
    from workbench.train import build_dataset

    plan = reproduce_stages(ReproduceOptions(preset=preset, joint=False))
    det_ckpt, iou_ckpt = (Path(plan.train[kind].out_dir) / "ckpt.pt" for kind in ("detector", "iou"))
    if not det_ckpt.is_file():
        print(f"  {preset}: no detector checkpoint {det_ckpt}, pipeline not timed")
        return None
    cpu = torch.device("cpu")
    detector = load_model(det_ckpt, cpu)
    iou_net = load_model(iou_ckpt, cpu) if iou_ckpt.is_file() else StandaloneIoUNet(detector=detector).eval()
    settings = PipelineSettings(max_images=images + 1)
    dataset = build_dataset(plan.val)
    out = run_pipeline(dataset, detector, iou_net, settings)
    stages = {name: float(np.mean(values[1:])) for name, values in out.seconds.items()}
    stop_steps = [out.trajectories.stop_step[out.trajectories.image_id == image_id] for image_id in out.image_ids[1:]]
    head, iterations = iou_net.iou_head, settings.refine_iterations
    stages[FC_FLOOR] = float(np.mean([head_layers_seconds(head, steps, iterations) for steps in stop_steps]))
    for name, seconds in stages.items():
        print(f"  {preset:<11} {name:<46} {seconds * 1e3:9.1f} ms / image")
    ratio = stages[REFINE_STAGE] / stages[DETECTOR_STAGE]
    floor = stages[FC_FLOOR] / stages[DETECTOR_STAGE]
    print(f"  {preset:<11} refinement / detector: {ratio:.2f} (its fully connected layers alone: {floor:.2f})")
    # The images the stages were averaged over: the pipeline's, but the warm-up.
    gflop = {"detector": float(np.mean([detector_flops(detector, dataset[i][0], settings.score_thresh)
                                        for i in range(1, images + 1)])) / 1e9,
             "refinement FC": float(np.mean([head_layers_flops(head, steps, iterations) for steps in stop_steps])) / 1e9}
    rate = {"detector": gflop["detector"] / stages[DETECTOR_STAGE],
            "refinement FC": gflop["refinement FC"] / stages[FC_FLOOR]}
    flop_ratio = gflop["refinement FC"] / gflop["detector"]
    print(f"  {preset:<11} GFLOP / image: detector {gflop['detector']:.1f} ({rate['detector']:.0f} GFLOP/s), "
          f"refinement's FC products {gflop['refinement FC']:.1f} ({rate['refinement FC']:.0f} GFLOP/s): "
          f"{flop_ratio:.2f} of the detector's")
    return {"preset": preset, "images": images, "detector_checkpoint": str(det_ckpt),
            "iou_checkpoint": str(iou_ckpt) if iou_ckpt.is_file() else "untrained IoU head",
            "ms_per_image": {k: round(v * 1e3, 1) for k, v in stages.items()},
            "refinement_over_detector": round(ratio, 3), "fc_layers_over_detector": round(floor, 3),
            "gflop_per_image": {k: round(v, 2) for k, v in gflop.items()},
            "gflop_per_second": {k: round(v, 1) for k, v in rate.items()},
            "fc_flops_over_detector": round(flop_ratio, 3)}


def detector_flops(detector: torch.nn.Module, image: torch.Tensor, score_thresh: float) -> int:
    """Floating-point operations of the pipeline's detector stage on ``image`` (Tensor[3, H, W]) as
    ``FlopCounterMode`` counts them: convolutions and matrix products (its box head's included), not
    ``roi_align``'s interpolation, which it does not know."""
    from workbench.models import extract_features, raw_detections

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        raw_detections(detector, extract_features(detector, [image]), score_thresh)
    return counter.get_total_flops()


def _head_layers(head: torch.nn.Module, stop_step: np.ndarray, iterations: int) -> None:
    """The IoU head's fully connected layers on the batches Algorithm 2 scored in one image: before the
    first step every box, at step ``t`` the boxes still running (``stop_step >= t``), each scoring with
    its input gradient but the last. Pooled inputs are random: a matrix product's time and operation
    count do not depend on the values."""
    for step in range(iterations + 1):
        k = int((stop_step >= step).sum())
        if k == 0:
            break
        pooled = torch.randn(k, head.fc.fc6.in_features, requires_grad=step < iterations)
        with torch.set_grad_enabled(step < iterations):
            out = head.predictor(head.fc(pooled))[:, 0]
            if step < iterations:
                # backward(inputs=) as refinement's autograd.grad(inputs) computes: the input's gradient only
                # (FlopCounterMode's hooks refuse autograd.grad on a leaf).
                out.sum().backward(inputs=[pooled])


def head_layers_seconds(head: torch.nn.Module, stop_step: np.ndarray, iterations: int) -> float:
    """Seconds of :func:`_head_layers`: what no faster pooling or bookkeeping can remove."""
    start = time.perf_counter()
    _head_layers(head, stop_step, iterations)
    return time.perf_counter() - start


def head_layers_flops(head: torch.nn.Module, stop_step: np.ndarray, iterations: int) -> int:
    """Floating-point operations of :func:`_head_layers` (its forward and input-gradient products)."""
    with FlopCounterMode(display=False) as counter:
        _head_layers(head, stop_step, iterations)
    return counter.get_total_flops()


def write(rows: list[dict], device: str, pipelines: list[dict]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = device_name(device)
    meta = {"device": name, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "date": time.strftime("%Y-%m-%d")}
    slug = "".join(c if c.isalnum() else "-" for c in ("cpu" if device == "cpu" else name)).strip("-").lower()
    with atomic_write(RESULTS / f"ops-{slug}.json") as f:
        f.write(json.dumps({"meta": meta, "rows": rows, "pipeline": pipelines}, indent=1).encode())
    lines = [f"# Ops benchmark on {name}", "", f"torch {meta['torch']}, torchvision {meta['torchvision']}, "
             f"{meta['date']}. Median ms; ratio = ours / peer (lower is better for us).", "",
             "| op | size | ours (ms) | peer | peer (ms) | ratio |", "|---|---|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['size']} | {r['ours_ms']} | {r['peer']} | {r['peer_ms']} | {r['ratio']} |")
    for p in pipelines:
        lines += ["", f"## Pipeline, {p['preset']}: ms per image ({p['images']} validation images)", "",
                  f"Checkpoints: {p['detector_checkpoint']}, {p['iou_checkpoint']}. "
                  f"Refinement (after IoU-guided NMS) / detector: **{p['refinement_over_detector']}**; "
                  f"its fully connected layers alone / detector: {p['fc_layers_over_detector']}. "
                  f"GFLOP per image (convolutions and matrix products): detector {p['gflop_per_image']['detector']} "
                  f"at {p['gflop_per_second']['detector']} GFLOP/s, refinement's fully connected products "
                  f"{p['gflop_per_image']['refinement FC']} at {p['gflop_per_second']['refinement FC']} GFLOP/s: "
                  f"{p['fc_flops_over_detector']} of the detector's.", "",
                  "| stage | ms / image |", "|---|---:|"]
        lines += [f"| {name} | {ms} |" for name, ms in p["ms_per_image"].items()]
    path = RESULTS / f"ops-{slug}.md"
    with atomic_write(path) as f:
        f.write(("\n".join(lines) + "\n").encode())
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smaller inputs, for a smoke run")
    parser.add_argument("--pipeline-images", type=int, default=10,
                        help="validation images per preset for the pipeline's stage times on the CPU (0: skip)")
    args = parser.parse_args()
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            raise SystemExit("--device cuda: no CUDA GPU is available")
        devices.remove("cuda")
    for device in devices:
        print(f"{device_name(device)}:")
        rows = run(device, args.repeat, args.quick)
        pipelines = []
        if device == "cpu" and args.pipeline_images:
            pipelines = [p for p in (pipeline_stages(preset, args.pipeline_images) for preset in PRESETS) if p]
        print(f"wrote {write(rows, device, pipelines)}")


if __name__ == "__main__":
    main()
