"""Training boxes for the IoU predictor: jittered ground truth, uniform in IoU (paper Sec. 3.1).

"For all ground-truth bounding boxes [...] we manually transform them with a set of randomized
parameters, resulting in a candidate bounding box set. We then remove from this candidate set
the bounding boxes having an IoU less than Omega_train = 0.5 with the matched ground-truth. We
uniformly sample training data from this candidate set w.r.t. the IoU."

Candidates: each ground truth ``(cx, cy, w, h)`` becomes
``(cx + w s e0, cy + h s e1, w exp(s e2), h exp(s e3))`` with ``e ~ N(0, I)`` and a magnitude
``s ~ U(0, max_sigma)`` drawn per candidate. All four parameters are relative to the box, so the
IoU of a candidate with its ground truth does not depend on the box's size or aspect ratio, and
mixing magnitudes spreads the IoUs over the whole range. With ``max_sigma = 0.3`` about 73% of
candidates have IoU >= 0.5 and every tenth of ``[0.5, 1]`` receives at least 6% of them.

Uniform sampling: the range ``[min_iou, 1]`` is cut into ``num_bins`` equal bins and the
``num_per_gt`` output slots of each ground truth are dealt round-robin over the bins, from a
random starting bin per ground truth (so every bin gets ``num_per_gt / num_bins`` slots on
average, exactly when that divides). Candidates are drawn in rounds, for all ground truths at
once, and each falls into the first empty slot of its bin (rejection sampling); rounds continue
until every slot is filled. Within a bin, IoUs follow the candidate density, which varies by
less than 10% across a tenth of the range with the defaults.

:func:`jitter_targets` applies this to a batch of detection targets with the settings of a
:class:`JitterConfig`, which both IoU-Net models use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.boxes import matched_iou

from workbench.ops._checks import check_boxes


def _candidates(gt: Tensor, count: int, max_sigma: float, generator: torch.Generator | None) -> Tensor:
    """``count`` random transforms of each ground truth: ``Tensor[G, count, 4]`` ``(x0, y0, x1, y1)``."""
    device = generator.device if generator is not None else gt.device
    magnitude = torch.rand(gt.shape[0], count, 1, generator=generator, device=device, dtype=gt.dtype) * max_sigma
    noise = torch.randn(gt.shape[0], count, 4, generator=generator, device=device, dtype=gt.dtype) * magnitude
    noise = noise.to(gt.device)  # drawn where the generator lives, used where the boxes live
    size = gt[:, None, 2:] - gt[:, None, :2]  # (G, 1, 2) as (w, h)
    center = (gt[:, None, 2:] + gt[:, None, :2]) / 2 + noise[..., :2] * size
    half = size * torch.exp(noise[..., 2:]) / 2
    return torch.cat([center - half, center + half], dim=-1)


def jitter_boxes(
    gt_boxes: Tensor,
    num_per_gt: int,
    min_iou: float = 0.5,
    num_bins: int = 10,
    generator: torch.Generator | None = None,
    max_sigma: float = 0.3,
    max_rounds: int = 100,
) -> tuple[Tensor, Tensor, Tensor]:
    """Randomly transformed copies of each ground-truth box, IoU >= ``min_iou``, uniform in IoU.

    Args:
        gt_boxes (Tensor[G, 4]): ``(x0, y0, x1, y1)``, floating point, positive width and height.
        num_per_gt (int): boxes to return per ground truth.
        min_iou (float): ``Omega_train`` of the paper, in ``[0, 1)``; every returned box has at
            least this IoU with its ground truth.
        num_bins (int): number of equal IoU bins over ``[min_iou, 1]`` that receive equal counts.
        generator (torch.Generator, optional): source of randomness; the same generator state
            gives the same boxes. Default: PyTorch's global generator.
        max_sigma (float): largest relative perturbation (see the module docstring). It must let
            candidates reach low IoUs; 0.3 suits ``min_iou = 0.5``, higher ``min_iou`` can use less.
        max_rounds (int): rounds of candidates before giving up.

    Returns:
        (Tensor[G * num_per_gt, 4], Tensor[G * num_per_gt], Int64Tensor[G * num_per_gt]):
        the boxes ``(x0, y0, x1, y1)``, their IoU with their ground truth (dtype of
        ``gt_boxes``), and the index of that ground truth; grouped by ground truth in order.

    Raises:
        RuntimeError: if some bin is still short of candidates after ``max_rounds`` rounds
            (``max_sigma`` too small or too large for ``min_iou``).
    """
    gt = check_boxes("gt_boxes", gt_boxes)
    if not 0.0 <= min_iou < 1.0:
        raise ValueError(f"min_iou must lie in [0, 1), got {min_iou}")
    if num_per_gt < 0 or num_bins < 1:
        raise ValueError(f"need num_per_gt >= 0 and num_bins >= 1, got {num_per_gt} and {num_bins}")
    if gt.numel() and not bool(((gt[:, 2:] - gt[:, :2]) > 0).all()):
        raise ValueError("gt_boxes must have positive width and height")
    num_gt, device = gt.shape[0], gt.device
    gt_index = torch.arange(num_gt, device=device).repeat_interleave(num_per_gt)
    out_boxes = gt.new_zeros(num_gt, num_per_gt, 4)
    out_ious = gt.new_zeros(num_gt, num_per_gt)
    if num_gt == 0 or num_per_gt == 0:
        return out_boxes.reshape(-1, 4), out_ious.reshape(-1), gt_index

    # Slot j of ground truth g wants bin (j + start_g) mod B: a round-robin deal over the bins.
    gen_device = generator.device if generator is not None else device
    start = torch.randint(num_bins, (num_gt, 1), generator=generator, device=gen_device).to(device)
    slot_bin = (torch.arange(num_per_gt, device=device) + start) % num_bins  # (G, S)
    filled = torch.zeros(num_gt, num_per_gt, dtype=torch.bool, device=device)
    # Enough candidates per round that the rarest bin usually fills in a round or two.
    per_round = 4 * num_per_gt + 16
    rows = torch.arange(num_gt, device=device)[:, None]

    for _ in range(max_rounds):
        cand = _candidates(gt, per_round, max_sigma, generator)  # (G, R, 4)
        cand_iou = matched_iou(cand, gt[:, None, :])  # (G, R)
        valid = cand_iou >= min_iou
        cand_bin = ((cand_iou - min_iou) / (1.0 - min_iou) * num_bins).floor().clamp(0, num_bins - 1).long()
        cand_bin = torch.where(valid, cand_bin, num_bins)  # invalid candidates go to an extra bin

        # Rank of each candidate among the candidates of its (ground truth, bin), in draw order,
        # and rank of each empty slot among the empty slots of its (ground truth, bin).
        cand_onehot = F.one_hot(cand_bin, num_bins + 1)  # (G, R, B + 1)
        cand_rank = (cand_onehot.cumsum(1) - 1).gather(2, cand_bin[..., None])[..., 0]  # (G, R)
        slot_onehot = F.one_hot(slot_bin, num_bins) * (~filled)[..., None]  # (G, S, B)
        slot_rank = (slot_onehot.cumsum(1) - 1).gather(2, slot_bin[..., None])[..., 0]  # (G, S)

        # table[g, b, r] = the candidate of rank r in bin b of ground truth g, or -1.
        table = torch.full((num_gt, num_bins + 1, per_round), -1, dtype=torch.long, device=device)
        table[rows, cand_bin, cand_rank] = torch.arange(per_round, device=device).expand(num_gt, -1)
        wanted = (~filled) & (slot_rank < per_round)
        pick = torch.where(wanted, table[rows, slot_bin, slot_rank.clamp(max=per_round - 1)], -1)  # (G, S)
        take = pick >= 0
        pick = pick.clamp(min=0)
        out_boxes = torch.where(take[..., None], cand.gather(1, pick[..., None].expand(-1, -1, 4)), out_boxes)
        out_ious = torch.where(take, cand_iou.gather(1, pick), out_ious)
        filled |= take
        if bool(filled.all()):
            return out_boxes.reshape(-1, 4), out_ious.reshape(-1), gt_index
    raise RuntimeError(
        f"jitter_boxes could not fill every IoU bin in {max_rounds} rounds of {per_round} candidates; "
        f"adjust max_sigma ({max_sigma}) for min_iou={min_iou}"
    )


@dataclass(frozen=True)
class JitterConfig:
    """How IoU-head training boxes are drawn from each image's ground truth (Sec. 3.1)."""

    num_per_gt: int = 16  # jittered boxes per ground-truth box (the paper does not give a number)
    max_per_image: int = 512  # fewer per box in crowded images, so one image costs at most this many
    min_iou: float = 0.5  # Omega_train: no training box has a lower IoU with its ground truth
    num_bins: int = 10  # equal-count IoU bins over [min_iou, 1]
    max_sigma: float = 0.3  # largest relative perturbation of the candidates


def jitter_targets(
    targets: list[dict[str, Tensor]],
    config: JitterConfig = JitterConfig(),
    generator: torch.Generator | None = None,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """IoU-head training data for a batch: jittered ground truth per image, with labels and IoUs.

    Args:
        targets (List[Dict[str, Tensor]]): per image, ``boxes`` (``Tensor[G_i, 4]``,
            ``(x0, y0, x1, y1)``) and ``labels`` (``Int64Tensor[G_i]``), in any one pixel frame.
        config (JitterConfig): sampling settings.
        generator (torch.Generator, optional): see :func:`jitter_boxes`.

    Returns:
        (List[Tensor[M_i, 4]], List[Int64Tensor[M_i]], List[Tensor[M_i]]): per image the jittered
        boxes (same frame as the targets), the label of their ground truth, and their IoU with it;
        ``M_i = G_i * min(num_per_gt, max(1, max_per_image // G_i))``.
    """
    boxes, labels, ious = [], [], []
    for target in targets:
        gt, gt_labels = target["boxes"], target["labels"]
        num = min(config.num_per_gt, max(1, config.max_per_image // max(len(gt), 1)))
        b, iou, index = jitter_boxes(
            gt, num, config.min_iou, config.num_bins, generator=generator, max_sigma=config.max_sigma
        )
        boxes.append(b)
        labels.append(gt_labels[index])
        ious.append(iou)
    return boxes, labels, ious
