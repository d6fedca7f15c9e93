"""Dependencies are checked by version, not only by presence (Slicer 5.10 bundles pydicom 2.4.4, an older
torch may sit in a Slicer's Python), and the confirmation names what an install would upgrade."""

from __future__ import annotations

import importlib.metadata
import sys
import types

import numpy as np

from doseai.packages import (
    describe_requirements,
    installed_version,
    missing_packages,
    satisfied,
    stale_modules,
)

NUMPY = importlib.metadata.version("numpy")


def test_a_package_older_than_its_requirement_is_missing():
    assert missing_packages({"numpy": "numpy>=1.0"}) == []
    assert missing_packages({"numpy": "numpy>=999"}) == ["numpy>=999"]
    assert missing_packages({"numpy": f"numpy=={NUMPY}", "doseai_no_such": "no-such-package"}) == ["no-such-package"]


def test_versions_compare_as_versions_not_strings():
    assert satisfied("pydicom>=3.0", "3.0.2") and not satisfied("pydicom>=3.0", "2.4.4")
    assert satisfied("torch>=2.2", "2.13.0+cpu") and not satisfied("torch>=2.2", "2.1.2")
    assert satisfied("numpy>=1.24", "2.0.0rc1")  # a pre-release of a newer version is newer
    assert not satisfied("numpy", None) and satisfied("numpy", "")  # missing / importable of unknown version


def test_installed_version_reads_package_metadata():
    assert installed_version("numpy", "numpy>=1") == NUMPY == np.__version__
    assert installed_version("doseai_no_such", "no-such-package>=1") is None


def test_the_question_names_the_version_an_install_would_upgrade():
    lines = describe_requirements({"numpy": "numpy>=999", "doseai_no_such": "no-such>=1"}, ["numpy>=999", "no-such>=1"])
    assert lines == [f"numpy>=999 (installed: {NUMPY})", "no-such>=1"]


def test_an_upgraded_package_this_process_imported_is_stale(monkeypatch):
    assert stale_modules({"numpy": "numpy"}) == []  # loaded and installed are the same
    monkeypatch.setitem(sys.modules, "doseai_fake_pkg", types.SimpleNamespace(__version__="1.0"))
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.0" if name == "doseai-fake-pkg" else NUMPY)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())
    assert stale_modules({"doseai_fake_pkg": "doseai-fake-pkg>=2"}) == ["doseai_fake_pkg 1.0 -> 2.0"]
