"""RCMed engine: text-prompted medical image segmentation (arXiv 2505.03380).

The engine never imports Slicer, Qt or the training package.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
