"""On-disk cache of image-encoder outputs for runs with a frozen encoder.

Each slice's ``encode_image`` output (neck and pre-neck features) is stored in its own safetensors file,
named by the SHA-256 of the encoder input (the padded, normalised pixels) and a tag of the encoder
weights, so a changed preprocessing or encoder never reads stale features.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rcmed_engine.model.rcmed import ImageFeatures, RCMed


def encoder_tag(model: RCMed) -> str:
    """A short fingerprint of the image encoder's weights (all of them, hashed once per run)."""
    h = hashlib.sha256(model.config.preset.encode())
    for name, t in sorted(model.image_encoder.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def pixels_key(pixels: torch.Tensor, tag: str) -> str:
    h = hashlib.sha256(tag.encode())
    h.update(str(tuple(pixels.shape)).encode())
    h.update(pixels.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


class FeatureCache:
    def __init__(self, folder: str | Path, model: RCMed) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.tag = encoder_tag(model)
        self.hits = self.misses = 0

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    @torch.no_grad()
    def features(self, pixels: torch.Tensor) -> ImageFeatures:
        """Features for a batch (B, 3, S, S): cached slices are read, the rest encoded and written."""
        keys = [pixels_key(p, self.tag) for p in pixels]
        necks: list[torch.Tensor | None] = [None] * len(keys)
        pres: list[torch.Tensor | None] = [None] * len(keys)
        todo = []
        for i, k in enumerate(keys):
            p = self._path(k)
            if p.is_file():
                d = load_file(str(p))
                necks[i], pres[i] = d["neck"], d["pre_neck"]
                self.hits += 1
            else:
                todo.append(i)
        if todo:
            self.misses += len(todo)
            out = self.model.encode_image(pixels[todo])
            for j, i in enumerate(todo):
                necks[i], pres[i] = out.neck[j].cpu().contiguous(), out.pre_neck[j].cpu().contiguous()
                path = self._path(keys[i])
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=".feat.", dir=path.parent)
                os.close(fd)
                try:
                    save_file({"neck": necks[i], "pre_neck": pres[i]}, tmp)
                    os.replace(tmp, path)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
        dev, dt = self.model.device, self.model.dtype
        return ImageFeatures(torch.stack(necks).to(dev, dt), torch.stack(pres).to(dev, dt))  # type: ignore[arg-type]
