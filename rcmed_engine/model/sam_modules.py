"""The one place that imports segment-anything.

segment-anything's package ``__init__`` imports its predictor and mask generator, which import
torchvision for helpers we never use. torchvision cannot live beside this project's pinned torch build.
So when torchvision is absent, ``segment_anything`` is registered as a bare package (same ``__path__``,
``__init__`` not run) and only ``segment_anything.modeling`` is imported under it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def _import_modeling() -> types.ModuleType:
    if "segment_anything.modeling" in sys.modules and "segment_anything" in sys.modules:
        return sys.modules["segment_anything.modeling"]
    if importlib.util.find_spec("torchvision") is not None:
        return importlib.import_module("segment_anything.modeling")
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("segment-anything is not installed: pip install segment-anything==1.0")
    package = types.ModuleType("segment_anything", "segment-anything's modules, without its torchvision-bound top level")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    package.__file__ = spec.origin
    # An earlier failed import can leave submodules behind without their parent: attach them.
    for name, module in list(sys.modules.items()):
        if name.startswith("segment_anything.") and name.count(".") == 1:
            setattr(package, name.split(".", 1)[1], module)
    sys.modules["segment_anything"] = package
    try:
        return importlib.import_module("segment_anything.modeling")
    except BaseException:
        del sys.modules["segment_anything"]
        raise


modeling = _import_modeling()
ImageEncoderViT = modeling.ImageEncoderViT
MaskDecoder = modeling.MaskDecoder
PromptEncoder = modeling.PromptEncoder
TwoWayTransformer = modeling.TwoWayTransformer
LayerNorm2d = modeling.common.LayerNorm2d
PositionEmbeddingRandom = modeling.prompt_encoder.PositionEmbeddingRandom

__all__ = ["ImageEncoderViT", "LayerNorm2d", "MaskDecoder", "PositionEmbeddingRandom", "PromptEncoder",
           "TwoWayTransformer"]
