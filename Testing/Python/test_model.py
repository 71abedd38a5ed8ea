"""The RCMed model on the tiny preset: the cached split equals the full pass, batching, prompts, checkpoints.

Everything here runs on the random ``tiny`` preset in a few seconds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rcmed_engine.engine import Engine
from rcmed_engine.model.checkpoint import (ADDED_TOKENS_KEY, CONFIG_NAME, WEIGHTS_NAME, CheckpointError,
                                           file_sha256, load_checkpoint, read_config, save_checkpoint,
                                           trained_state_dict)
from rcmed_engine.model.config import RCMedConfig
from rcmed_engine.model.presets import build_model, load_preset, tiny_config
from rcmed_engine.model.rcmed import PrefixState, added_token_rows
from rcmed_engine.model.tokenizer import IMAGE_TOKEN_INDEX
from rcmed_engine.prompts import P_END, P_START, SEG_TOKEN, parse_targets
from rcmed_training.step import encode_sample

MODALITY = "computed tomography"
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for the module


@pytest.fixture(scope="module")
def model():
    m = load_preset("tiny").model.eval()
    # Random LoRA B is zero at init; give every weight some value so that no path is silently inert.
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in m.named_parameters():
            if ".lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m


@pytest.fixture
def released_form(model):
    """The released prompt form: one answer with one [SEG] per target (PromptConfig.per_target_rows False)."""
    model.config.prompt.per_target_rows = False
    yield model
    model.config.prompt.per_target_rows = True


def _pixels(b: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((b, 3, 64, 64), generator=g)


def _full_ids(model, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole conversation of each row, as plan_prompt splits it: prefix ids, image, suffix row."""
    pre_a, pre_b = model._prefix_ids
    seqs = [pre_a + [IMAGE_TOKEN_INDEX] + pre_b + row for row in rows]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), model.tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


# ------------------------------------------------------------------------------------------- cached split

@pytest.mark.parametrize("per_target", [True, False])
@pytest.mark.parametrize("targets", [["liver"], ["liver", "spleen", "left kidney"]])
def test_prefix_suffix_equals_full_uncached_pass(model, targets, per_target):
    model.config.prompt.per_target_rows = per_target
    try:
        plan = model.plan_prompt(targets, MODALITY)
    finally:
        model.config.prompt.per_target_rows = True
    pixels = _pixels(2)
    with torch.no_grad():
        state = model.prefix(model.encode_image(pixels))
        cached = model.suffix(state, plan)

        ids, mask = _full_ids(model, plan.rows)
        r = len(plan.rows)
        full_logits, hidden, image_embedding = model.forward_train(
            pixels.repeat_interleave(r, 0), ids.repeat(2, 1), mask.repeat(2, 1))
    n_img = model.config.num_image_tokens
    pre_a, pre_b = model._prefix_ids
    assert state.length == len(pre_a) + n_img + len(pre_b)

    for b in range(2):
        row0 = b * r  # slice-major: row 0 of slice b
        torch.testing.assert_close(state.image_embedding[b], image_embedding[row0], atol=TOL, rtol=0)
        seg_states = hidden[[row0 + q for q in plan.seg_rows], [state.length + p for p in plan.seg_positions]]
        low = model.decode_masks(image_embedding[row0:row0 + 1], model.text_hidden_fcs(seg_states)[None])[0]
        torch.testing.assert_close(cached.low_res_logits[b], low, atol=TOL, rtol=0)
        for t in range(len(targets)):
            row = b * r + plan.presence_rows[t]
            lg = full_logits[row, state.length + plan.presence_positions[t]]
            p = torch.stack([lg[plan.positive_id], lg[plan.negative_id]]).softmax(0)[0]
            assert abs(float(cached.presence[b, t]) - float(p)) < TOL
    assert cached.low_res_logits.shape == (2, len(targets), 4 * 8, 4 * 8)
    # The comparison is meaningful: the two slices (and the targets) give different masks.
    assert (cached.low_res_logits[0] - cached.low_res_logits[1]).abs().max() > 1e-3


def test_training_step_reads_the_same_seg_state_as_inference(released_form):
    model = released_form
    """forward_losses takes hidden[seg - 1 + n_img - 1]; inference takes prefix length + seg_positions."""
    targets = ["liver", "spleen"]
    plan = model.plan_prompt(targets, MODALITY)
    sample = encode_sample(model, targets, MODALITY, True)
    ids, _ = _full_ids(model, plan.rows[:1])
    assert sample.ids == ids[0].tolist(), "training and inference tokenise the conversation differently"
    n_img = model.config.num_image_tokens
    seg = [i for i, t in enumerate(sample.ids) if t == model.seg_token_id]
    prefix_len = len(model._prefix_ids[0]) + n_img + len(model._prefix_ids[1])
    assert [s - 1 + n_img - 1 for s in seg] == [prefix_len + p for p in plan.seg_positions]


def test_batch_of_three_equals_one_at_a_time(model):
    plan = model.plan_prompt(["liver", "spleen"], MODALITY)
    pixels = _pixels(3, seed=5)
    with torch.no_grad():
        batch = model.suffix(model.prefix(model.encode_image(pixels)), plan)
        singles = [model.suffix(model.prefix(model.encode_image(pixels[i:i + 1])), plan) for i in range(3)]
        # The engine's cache path: states computed alone, then stacked.
        states = [model.prefix(model.encode_image(pixels[i:i + 1])) for i in range(3)]
        stacked = model.suffix(PrefixState.stack(states), plan)
    for i, one in enumerate(singles):
        torch.testing.assert_close(batch.low_res_logits[i], one.low_res_logits[0], atol=TOL, rtol=0)
        torch.testing.assert_close(batch.presence[i], one.presence[0], atol=TOL, rtol=0)
        torch.testing.assert_close(stacked.low_res_logits[i], one.low_res_logits[0], atol=TOL, rtol=0)
    assert (batch.low_res_logits[0] - batch.low_res_logits[2]).abs().max() > 1e-3


def test_engine_batch_size_does_not_change_results():
    vol = np.random.default_rng(3).normal(100, 30, (5, 24, 20)).astype(np.float32)
    vol[:, 6:14, 5:12] += 150
    loaded = load_preset("tiny")
    e1 = Engine(loaded, device="cpu", batch_size=1)
    r1 = e1.segment(vol, "disc", modality="MR")
    e3 = Engine(load_preset("tiny"), device="cpu", batch_size=3)
    r3 = e3.segment(vol, "disc", modality="MR")
    np.testing.assert_allclose(r1.presence, r3.presence, atol=TOL, rtol=0)
    np.testing.assert_array_equal(r1.labels, r3.labels)


# ------------------------------------------------------------------------------------------- prompts

def test_multi_target_prompt_has_one_seg_per_target_in_order(released_form):
    model = released_form
    targets = parse_targets("segment the liver, spleen and left kidney")
    assert targets == ["liver", "spleen", "left kidney"]
    plan = model.plan_prompt(targets, MODALITY)
    tok = model.tokenizer
    row0 = plan.rows[0]
    seg_id, p_end, p_start = tok.token_id(SEG_TOKEN), tok.token_id(P_END), tok.token_id(P_START)
    seg_at = [i for i, t in enumerate(row0) if t == seg_id]
    assert len(seg_at) == len(targets)
    # seg_positions are the tokens that predict each [SEG] (SYRE_SPEC §3.6), in order.
    assert plan.seg_positions == [i - 1 for i in seg_at]
    assert plan.seg_positions == sorted(plan.seg_positions)
    names = []
    for i in seg_at:
        before = [t for t in row0[:i] if tok.decode([t]).strip()]  # skip whitespace-only tokens
        assert before[-1] == p_end, "the text before each [SEG] must end with </p>"
        start = max(j for j in range(i) if row0[j] == p_start)
        names.append(tok.decode(row0[start + 1:i]).replace(P_END, "").strip())
    assert names == targets
    # One presence row per target, each naming only that target, with "contains" right after the position.
    assert plan.presence_rows == [1, 2, 3]
    assert len(plan.rows) == 4 and plan.lengths == [len(r) for r in plan.rows]
    for t, (row, pos) in enumerate(zip(plan.presence_rows, plan.presence_positions)):
        ids = plan.rows[row]
        assert ids[pos + 1] == plan.positive_id
        assert ids.count(seg_id) == 1
        assert targets[t] in tok.decode(ids)
        others = [o for o in targets if o != targets[t]]
        assert not any(f"{P_START} {o} {P_END}" in tok.decode(ids) for o in others)
    assert plan.positive_id != plan.negative_id
    assert plan.answer == ("This is a <p> computed tomography </p> image. The image contains <p> liver </p> [SEG], "
                           "<p> spleen </p> [SEG] and <p> left kidney </p> [SEG].")


def test_presence_of_each_target_equals_asking_for_it_alone(model):
    """A multi-target prompt scores target t on a row that asks for t alone: the same number as a
    one-target prompt (this catches a presence position taken from another target's row)."""
    targets = ["liver", "spleen", "left kidney"]
    with torch.no_grad():
        state = model.prefix(model.encode_image(_pixels(2, seed=9)))
        many = model.suffix(state, model.plan_prompt(targets, MODALITY)).presence
        alone = [model.suffix(state, model.plan_prompt([t], MODALITY)).presence[:, 0] for t in targets]
    torch.testing.assert_close(many, torch.stack(alone, 1), atol=TOL, rtol=0)
    assert len({round(float(v), 6) for v in many[0]}) == 3  # the targets really are scored apart


@pytest.mark.parametrize("per_target", [True, False])
def test_token_immediately_before_seg_is_p_end(model, per_target):
    model.config.prompt.per_target_rows = per_target
    try:
        plan = model.plan_prompt(["liver", "spleen"], MODALITY)
    finally:
        model.config.prompt.per_target_rows = True
    p_end = model.tokenizer.token_id(P_END)
    assert all(plan.rows[r][p] == p_end for r, p in zip(plan.seg_rows, plan.seg_positions))


def test_each_target_of_a_prompt_gets_what_it_gets_alone(model):
    """"A, B and C" gives each target the mask logits and presence of asking for it alone, bit for bit,
    from one shared prefix."""
    targets = ["liver", "spleen", "left kidney"]
    with torch.no_grad():
        state = model.prefix(model.encode_image(_pixels(2, seed=4)))
        many = model.suffix(state, model.plan_prompt(targets, MODALITY))
        alone = [model.suffix(state, model.plan_prompt([t], MODALITY)) for t in targets]
    for t, one in enumerate(alone):
        assert torch.equal(many.low_res_logits[:, t], one.low_res_logits[:, 0])
        assert torch.equal(many.presence[:, t], one.presence[:, 0])
    assert not torch.equal(many.low_res_logits[:, 0], many.low_res_logits[:, 1])


def test_engine_multi_target_labels_equal_separate_prompts():
    vol = np.random.default_rng(8).normal(100, 30, (3, 24, 20)).astype(np.float32)
    engine = Engine(load_preset("tiny"), device="cpu")
    both, a, b = engine.segment_many(vol, ["disc and ring", "disc", "ring"], modality="MR")
    np.testing.assert_array_equal(both.presence, np.concatenate([a.presence, b.presence]))
    only_a, only_b = (both.labels == 1), (both.labels == 2)
    # Where the two masks do not overlap, the label map is each prompt's own mask.
    overlap = (a.labels == 1) & (b.labels == 1)
    np.testing.assert_array_equal(only_a[~overlap], (a.labels == 1)[~overlap])
    np.testing.assert_array_equal(only_b[~overlap], (b.labels == 1)[~overlap])


def test_single_target_uses_row_zero_for_presence(model):
    plan = model.plan_prompt(["liver"], MODALITY)
    assert plan.presence_rows == [0] and len(plan.rows) == 1
    assert plan.rows[0][plan.presence_positions[0] + 1] == plan.positive_id
    pre_a, pre_b = model._prefix_ids
    full = pre_a + [IMAGE_TOKEN_INDEX] + pre_b + plan.rows[0]
    assert full == encode_sample(model, ["liver"], MODALITY, True).ids


# ------------------------------------------------------------------------------------------- determinism

def test_two_tiny_engines_give_bit_identical_labels():
    rng = np.random.default_rng(7)
    vol = rng.normal(50, 10, (3, 30, 26)).astype(np.float32)
    vol[:, 8:20, 6:18] += 100
    results = []
    for _ in range(2):
        engine = Engine.from_preset("tiny", device="cpu")
        results.append(engine.segment(vol, "disc", modality="MR"))
    a, b = results
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.presence, b.presence)  # bit for bit, not approximately
    assert 0 < int((a.labels > 0).sum()) < a.labels.size, "a trivial (all or nothing) mask proves little"


# ------------------------------------------------------------------------------------------- checkpoints

def _randomise(m, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _rcmed_state(m) -> dict[str, torch.Tensor]:
    state = {n: t.clone() for n, t in m.state_dict().items() if n in set(m.rcmed_parameter_names())}
    state[ADDED_TOKENS_KEY] = m.language_model.get_input_embeddings().weight[added_token_rows(m)].detach().clone()
    return state


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(11)
    src = build_model(tiny_config())
    _randomise(src, 12)
    folder = save_checkpoint(src, tmp_path_factory.mktemp("ckpt") / "weights")
    return src, folder


def test_checkpoint_round_trip_restores_every_rcmed_part(saved):
    src, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp file left
    torch.manual_seed(99)
    dst = build_model(tiny_config())
    want = _rcmed_state(src)
    before = _rcmed_state(dst)
    assert any(not torch.equal(before[k], want[k]) for k in want), "fresh model already equal: test is void"
    report = load_checkpoint(dst, folder)
    got = _rcmed_state(dst)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert sorted(report.loaded) == sorted(want)
    assert report.sha256 == file_sha256(folder / WEIGHTS_NAME)
    # Only RCMed parts travel: the base image encoder stays as the fresh model built it.
    assert not torch.equal(dst.image_encoder.patch_embed.proj.weight, src.image_encoder.patch_embed.proj.weight)
    assert read_config(folder) == src.config


def test_checkpoint_include_carries_extra_modules(tmp_path):
    torch.manual_seed(3)
    src = build_model(tiny_config())
    _randomise(src, 4)
    save_checkpoint(src, tmp_path, include=("mask_decoder.",))
    torch.manual_seed(5)
    dst = build_model(tiny_config())
    load_checkpoint(dst, tmp_path)
    for (n, a), (_, b) in zip(src.mask_decoder.state_dict().items(), dst.mask_decoder.state_dict().items()):
        assert torch.equal(a, b), n


def _edit_checkpoint(folder, tmp_path, edit) -> object:
    state = load_file(str(folder / WEIGHTS_NAME))
    edit(state)
    out = tmp_path / "edited"
    out.mkdir()
    save_file(state, str(out / WEIGHTS_NAME))
    (out / CONFIG_NAME).write_text((folder / CONFIG_NAME).read_text())
    return out


def _fresh():
    torch.manual_seed(0)
    return build_model(tiny_config())


def test_checkpoint_wrong_shape_is_refused_naming_the_key(saved, tmp_path):
    key = "vl_projection.mlp.0.weight"

    def edit(state):
        state[key] = state[key].reshape(-1, 2).contiguous()

    folder = _edit_checkpoint(saved[1], tmp_path, edit)
    with pytest.raises(CheckpointError, match=r"mismatched.*vl_projection\.mlp\.0\.weight"):
        load_checkpoint(_fresh(), folder)


def test_checkpoint_unexpected_key_is_refused_naming_it(saved, tmp_path):
    folder = _edit_checkpoint(saved[1], tmp_path, lambda s: s.__setitem__("vl_projection.extra.weight",
                                                                           torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected.*vl_projection\.extra\.weight"):
        load_checkpoint(_fresh(), folder)


def test_checkpoint_missing_part_is_refused_naming_it(saved, tmp_path):
    folder = _edit_checkpoint(saved[1], tmp_path, lambda s: s.pop("lv_projection.mlp.2.bias"))
    with pytest.raises(CheckpointError, match=r"missing.*lv_projection\.mlp\.2\.bias"):
        load_checkpoint(_fresh(), folder)


def test_checkpoint_missing_added_token_rows_is_refused(saved, tmp_path):
    folder = _edit_checkpoint(saved[1], tmp_path, lambda s: s.pop(ADDED_TOKENS_KEY))
    with pytest.raises(CheckpointError, match="added_token_embeddings"):
        load_checkpoint(_fresh(), folder)


def test_non_safetensors_file_gives_a_clear_error(saved, tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / CONFIG_NAME).write_text((saved[1] / CONFIG_NAME).read_text())
    (folder / WEIGHTS_NAME).write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(_fresh(), folder)
    # The same through the preset loader the command line uses.
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_preset("tiny", folder)


def test_trained_state_dict_is_exactly_the_rcmed_parts():
    m = _fresh()
    state = trained_state_dict(m)
    assert set(state) == set(m.rcmed_parameter_names()) | {ADDED_TOKENS_KEY}
    assert state[ADDED_TOKENS_KEY].shape[0] == 7  # <im_start> <im_end> <bbox> <point> [SEG] <p> </p>


# ------------------------------------------------------------------------------------------- config

def test_config_json_round_trip(tmp_path):
    cfg = tiny_config()
    cfg.trained = True
    cfg.presence_threshold = 0.25
    path = tmp_path / "config.json"
    cfg.save(path)
    back = RCMedConfig.load(path)
    assert back == cfg
    assert isinstance(back.image_encoder.global_attn_indexes, tuple)
    assert isinstance(back.pixel_mean, tuple) and isinstance(back.language_model.lora_targets, tuple)
    assert json.loads(path.read_text())["image_encoder"]["patch_size"] == 8


@pytest.mark.parametrize("where", ["top", "image_encoder", "language_model", "prompt"])
def test_config_unknown_fields_are_rejected(tmp_path, where):
    data = tiny_config().to_dict()
    (data if where == "top" else data[where])["colour_of_sky"] = "blue"
    with pytest.raises(ValueError, match="colour_of_sky"):
        RCMedConfig.from_dict(data)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="colour_of_sky"):
        read_config(tmp_path)
