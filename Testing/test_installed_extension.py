"""The extension as Slicer installs it: built and installed with Slicer's own CMake macros
(``shared/tools/slicer-extension-check``), then used from the installed ``qt-scripted-modules`` folder alone.

Slicer puts that folder on ``sys.path`` and nothing else of ours: the modules, the ``doseai`` core and the
shipped models must all be found there, never in the repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO.parent / "shared" / "tools" / "slicer-extension-check" / "check.sh"
MODELS = sorted(p.name for p in (REPO / "Resources" / "Models").iterdir() if p.suffix in (".pt", ".json"))

pytestmark = [
    pytest.mark.skipif(not CHECK.is_file(), reason=f"{CHECK} is absent (it ships with ../shared)"),
    pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed (pip install cmake)"),
]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, list[str]]:
    """``(installed qt-scripted-modules folder, the files it holds)``."""
    work = tmp_path_factory.mktemp("extension")
    result = subprocess.run(["bash", str(CHECK), str(REPO), str(work)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"check.sh failed:\n{result.stderr}"
    folder = work / "install" / "lib" / "Slicer-5.12" / "qt-scripted-modules"
    return folder, result.stdout.split()


def test_every_runtime_file_is_installed_where_the_code_looks(installed):
    _, files = installed
    core = sorted(str(p.relative_to(REPO)) for p in (REPO / "doseai").rglob("*.py") if "__pycache__" not in p.parts)
    expected = core + [f"Resources/Models/{name}" for name in MODELS] + [
        f"{module}.py" for module in ("DosePreference", "DoseOptimizer")] + [
        f"Resources/UI/{module}.ui" for module in ("DosePreference", "DoseOptimizer")] + [
        f"Resources/Icons/{module}.png" for module in ("DosePreference", "DoseOptimizer")]
    missing = sorted(set(expected) - set(files))
    assert not missing, f"not installed: {missing}"
    assert not [f for f in files if f.startswith(("tmp/", "work/", "root/", "home/"))], "a file under an absolute path"


def _isolated_python(folder: Path, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter whose ``sys.path`` is the installed folder, the standard library and
    site-packages: ``-S`` skips site's ``.pth`` files, so an editable install of the checkout is not seen."""
    paths = sysconfig.get_paths()
    search = [str(folder), *[p for p in sys.path if p.startswith(sys.base_prefix) or "lib-dynload" in p],
              paths["purelib"], paths["platlib"]]
    search = [p for p in dict.fromkeys(search) if p and Path(p).exists() and not Path(p).resolve() == REPO]
    prelude = f"import sys; sys.path[:] = {search!r}\n"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run([sys.executable, "-S", "-c", prelude + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=600, env=env, cwd=folder)


def test_the_installed_tree_alone_predicts_and_edits_the_sample_case(installed):
    pytest.importorskip("torch")
    pytest.importorskip("monai")
    folder, _ = installed
    result = _isolated_python(folder, f"""
        import numpy as np
        from pathlib import Path
        import doseai
        assert Path(doseai.__file__).resolve().is_relative_to(Path({str(folder)!r}).resolve()), doseai.__file__
        from doseai.predict import DEFAULT_DVH_MODEL, DEFAULT_MODEL, DosePredictor, DVHDosePredictor
        from doseai.sample import make_sample_case
        assert DEFAULT_MODEL.is_file() and DEFAULT_DVH_MODEL.is_file(), (DEFAULT_MODEL, DEFAULT_DVH_MODEL)
        case = make_sample_case(with_dose=False)
        predictor = DosePredictor(threads=2)
        predictor.set_case(case)
        dose = predictor.predict(0.0, 0.0)
        rx = case.max_prescription
        assert dose.shape == case.ct.shape and np.isfinite(dose).all(), dose.shape
        assert 0.9 * rx < dose.max() < 1.3 * rx, (dose.max(), rx)
        dvh_model = DVHDosePredictor(threads=2)
        dvh_model.set_case(case)
        edited = dvh_model.predict(dvh_model.dvh_vector(dose))
        assert edited.shape == dose.shape and np.isfinite(edited).all()
        print("OK", Path(doseai.__file__).parent, round(float(dose.max()), 2), round(float(edited.max()), 2))
        """)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("OK " + str(folder / "doseai")), result.stdout


def test_the_module_files_import_doseai_from_beside_them(installed):
    """The modules' own fallback (a checkout puts the repository root on sys.path) must not be what finds
    doseai in an installed extension: the package sits beside the module files."""
    folder, _ = installed
    result = _isolated_python(folder, """
        import importlib.util
        spec = importlib.util.find_spec("doseai")
        import DosePreferenceLib, DoseOptimizerLib
        print(spec.origin)
        """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(folder / "doseai" / "__init__.py")


def test_the_declared_minimum_slicer_version_is_the_oldest_tested_and_said_everywhere():
    import re

    cmake = (REPO / "CMakeLists.txt").read_text()
    minimum = re.search(r'set\(SlicerDoseAI_MINIMUM_SLICER_VERSION "([\d.]+)"\)', cmake).group(1)
    pins = REPO / "Testing" / "slicer_versions" / "pins.txt"
    tested = [line.split()[0] for line in pins.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert min(tested, key=lambda v: tuple(map(int, v.split(".")))) == minimum, (tested, minimum)
    said = f"Slicer {minimum} or newer"
    for text in ("README.md", "DosePreference/DosePreferenceLib/help.py", "DoseOptimizer/DoseOptimizer.py"):  # the module help texts
        assert said in " ".join((REPO / text).read_text().split()), f"{text} does not say '{said}'"
