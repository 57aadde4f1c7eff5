"""IoU-Net Workbench: a runnable, teachable implementation of IoU-Net (Jiang et al., ECCV 2018)."""

__version__ = "0.1.0"
