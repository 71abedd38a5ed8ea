"""The extension's catalog entry: RCMedSlicer.json (the ExtensionsIndex format) validates against Slicer's
v1.0.2 catalog-entry schema (a copy in Testing/Schemas) and says the same as RCMedSlicer.s4ext and CMakeLists."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "Testing" / "Schemas" / "slicer-extension-catalog-entry-schema-v1.0.2.json"
ENTRY = ROOT / "RCMedSlicer.json"


def s4ext() -> dict[str, str]:
    out = {}
    for line in (ROOT / "RCMedSlicer.s4ext").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out[key] = value.strip()
    return out


def cmake_var(name: str) -> str:
    m = re.search(r'set\(%s (?:"([^"]*)"|(\S+))\)' % name, (ROOT / "CMakeLists.txt").read_text())
    assert m, name
    return m.group(1) if m.group(1) is not None else m.group(2)


def test_entry_validates_against_v102_schema():
    schema = json.loads(SCHEMA.read_text())
    entry = json.loads(ENTRY.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(entry)
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    assert "PyTorch" in entry["build_dependencies"]


@pytest.mark.parametrize("bad", [{"scm_url": None}, {"homepage": "x"}, {"tier": 7}, {"enabled": 1}])
def test_schema_copy_rejects_what_the_index_rejects(bad):
    entry = json.loads(ENTRY.read_text())
    for key, value in bad.items():
        if value is None:
            entry.pop(key)
        else:
            entry[key] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(entry, json.loads(SCHEMA.read_text()))


def test_s4ext_and_cmake_agree_with_entry():
    entry, old = json.loads(ENTRY.read_text()), s4ext()
    assert old["scm"] == entry["scm_type"]
    assert old["scmurl"] == entry["scm_url"]
    assert old["scmrevision"] == entry["scm_revision"]
    assert old["depends"].split() == entry["build_dependencies"] == cmake_var("EXTENSION_DEPENDS").split()
    assert old["build_subdirectory"] == entry["build_subdirectory"] == cmake_var("EXTENSION_BUILD_SUBDIRECTORY")
    assert old["category"] == entry["category"] == cmake_var("EXTENSION_CATEGORY")
    assert int(old["tier"]) == entry["tier"]
    assert bool(int(old["enabled"])) is entry["enabled"] == bool(int(cmake_var("EXTENSION_ENABLED")))
