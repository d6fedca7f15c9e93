"""Bad and unusual input through the CLI (issue 26's table): each is refused with one line and exit code 2 before
any computation, or handled with a warning that says what was done; nothing is written when input is refused."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from doseai.case import PlanningCase
from doseai.cli import main
from doseai.geometry import ImageGeometry
from doseai.io import images, save_case
from doseai.predict import DEFAULT_DVH_MODEL, DEFAULT_MODEL
from doseai.resample import resample_to
from doseai.sample import make_sample_case


@pytest.fixture(scope="module")
def sample():
    """The sample phantom at OpenKBP's voxel size but fewer slices (a prediction takes ~2 s)."""
    return make_sample_case(seed=2, shape=(48, 96, 96))


def _save(case: PlanningCase, folder, ct=None):
    if ct is not None:
        case = PlanningCase(case.geometry, ct=None, structures=case.structures, prescriptions=case.prescriptions,
                            patient_id=case.patient_id)
    path = save_case(case, folder, "nrrd")
    if ct is not None:  # write the CT as given: PlanningCase itself would refuse it
        images.write_image(ct.astype(np.float32), case.geometry, path / "ct.nrrd", force=True)
    return path


def _one_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line]
    assert len(err) == 1, err
    return err[0]


@pytest.fixture()
def no_prediction(monkeypatch):
    """Fail the test if a network is even loaded: refusals must come before any computation."""
    import doseai.predict

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(doseai.predict._ModelPredictor, "__init__", refuse)


@pytest.mark.parametrize("bad", ["400 nan", "all nan", "inf"])
def test_ct_with_nan_or_inf_is_refused_at_load(bad, sample, tmp_path, capsys, no_prediction):
    ct = sample.ct.copy()
    if bad == "400 nan":
        ct.ravel()[np.random.default_rng(0).choice(ct.size, 400, replace=False)] = np.nan
    elif bad == "all nan":
        ct[:] = np.nan
    else:
        ct[10, 40, 40] = np.inf
    case = _save(sample, tmp_path / "case", ct=ct)
    out = tmp_path / "dose.nrrd"
    assert main(["predict", "--case", str(case), "--out", str(out)]) == 2
    line = _one_line(capsys)
    count = {"400 nan": 400, "all nan": ct.size, "inf": 1}[bad]
    assert f"{count} NaN or infinite voxel" in line and "index z, y, x" in line
    assert not out.exists()


def test_ct_far_outside_hu_warns_and_is_clipped(sample, tmp_path, capsys):
    ct = sample.ct.copy()
    ct[20, 40:44, 40:44] = 1e30
    case = _save(sample, tmp_path / "case", ct=ct)
    out = tmp_path / "dose.nrrd"
    assert main(["predict", "--case", str(case), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "16 voxel(s) outside -3100 to 31000 HU" in err and "clipped to [-1000, 1500]" in err
    dose, _ = images.read_image(out)
    assert np.isfinite(dose).all() and 40 < dose.max() < 90


def _rotated_about_z(case: PlanningCase, degrees: float) -> PlanningCase:
    """``case`` resampled onto a grid turned by ``degrees`` about the z axis through its centre."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    direction = (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)
    g = case.geometry
    centre = g.index_to_physical(np.array([[(n - 1) / 2 for n in g.shape]]))[0]
    half = np.array([(n - 1) / 2 * sp for n, sp in zip(g.shape[::-1], g.spacing)])
    origin = centre - np.array(direction).reshape(3, 3) @ half
    grid = ImageGeometry(g.shape, g.spacing, tuple(origin), direction)
    return PlanningCase(
        grid, ct=resample_to(case.ct, g, grid, default_value=-1000.0),
        structures={n: resample_to(m.astype(np.float32), g, grid) > 0.5 for n, m in case.structures.items()},
        prescriptions=case.prescriptions, patient_id=case.patient_id)


def test_oblique_ct_is_resampled_for_the_model_and_back(sample, tmp_path, capsys):
    """A CT turned 20 deg about z: the note says what is done, and the dose is the axis-aligned case's dose
    turned with it (the model grid is axis-aligned in both; only interpolation differs)."""
    oblique = _rotated_about_z(sample, 20.0)
    straight_out, oblique_out = tmp_path / "straight.nrrd", tmp_path / "oblique.nrrd"
    assert main(["predict", "--case", str(_save(sample, tmp_path / "s")), "--out", str(straight_out)]) == 0
    capsys.readouterr()
    assert main(["predict", "--case", str(_save(oblique, tmp_path / "o")), "--out", str(oblique_out)]) == 0
    assert "oblique (20.0 deg from the patient axes)" in capsys.readouterr().err
    straight, straight_geometry = images.read_image(straight_out)
    turned, turned_geometry = images.read_image(oblique_out)
    assert turned_geometry.direction == pytest.approx(oblique.geometry.direction)
    back = resample_to(turned, turned_geometry, straight_geometry)
    body = resample_to(oblique.structures["External"].astype(np.float32), oblique.geometry, straight_geometry) > 0.99
    body &= sample.structures["External"]
    ptv = sample.structures["PTV_70"] & body
    assert np.abs(back - straight)[body].mean() < 1.5  # Gy; the dose falls 70 -> 0 over ~15 voxels
    assert abs(back[ptv].mean() - straight[ptv].mean()) < 1.5


class _Payload:
    """A pickle that writes a file when unpickled: what a malicious checkpoint does."""

    marker = None

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def _evil(path, marker):
    _Payload.marker = marker
    torch.save({"model": _Payload(), "config": {}}, path)  # as torch.save writes any object
    return path


@pytest.mark.parametrize("command", ["export", "export-prior", "export-dvh", "average", "resume"])
def test_no_user_file_is_ever_unpickled(command, tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    evil = _evil(tmp_path / "evil.pt", marker)
    if command == "resume":
        from doseai.errors import UnreadableInputError
        from doseai.train.loop import Checkpointer

        run = tmp_path / "run"
        run.mkdir()
        _evil(run / "last.pt", marker)
        with pytest.raises(UnreadableInputError, match="unpickling them could run code"):
            Checkpointer(run).load()
    else:
        argv = {"export": ["train", "export", "--checkpoint", str(evil), "--out", str(tmp_path / "m.pt")],
                "export-prior": ["train", "export", "--checkpoint", str(evil), "--prior", str(evil),
                                 "--out", str(tmp_path / "m.pt")],
                "export-dvh": ["train", "export-dvh", "--checkpoint", str(evil), "--out", str(tmp_path / "m.pt")],
                "average": ["train", "average", "--weights", str(evil), str(evil), "--out", str(tmp_path / "m.pt")],
                }[command]
        assert main(argv) == 2
        line = _one_line(capsys)
        assert "evil.pt" in line and "unpickling them could run code" in line
    assert not marker.exists()


@pytest.mark.parametrize("bad", ["truncated", "random bytes", "wrong keys", "the DVH model's file", "no card"])
def test_bad_weights_are_refused_in_one_line(bad, sample, tmp_path, capsys):
    case = _save(sample, tmp_path / "case")
    weights = tmp_path / "w.pt"
    card = DEFAULT_MODEL.with_suffix(".json").read_text()
    if bad == "truncated":
        weights.write_bytes(DEFAULT_MODEL.read_bytes()[:100_000])
    elif bad == "random bytes":
        weights.write_bytes(np.random.default_rng(0).bytes(5000))
    elif bad == "wrong keys":
        torch.save({"encoder.weight": torch.zeros(3)}, weights)
    elif bad == "the DVH model's file":
        weights.write_bytes(DEFAULT_DVH_MODEL.read_bytes())
    else:
        weights.write_bytes(DEFAULT_MODEL.read_bytes())
    if bad != "no card":
        weights.with_suffix(".json").write_text(card)
    out = tmp_path / "dose.nrrd"
    assert main(["predict", "--case", str(case), "--out", str(out), "--weights", str(weights)]) == 2
    line = _one_line(capsys)
    expected = {"truncated": "not a model weights file", "random bytes": "not a model weights file",
                "wrong keys": "do not fit the network", "the DVH model's file": "do not fit the network",
                "no card": "model card missing"}[bad]
    assert expected in line and weights.stem in line
    assert not out.exists()


def test_predict_help_says_the_card_sits_beside_the_weights(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the model card (the same name with .json) must sit beside them" in text


def _desired_csv(path, dose, volume):
    rows = ["dose_gy,Parotid_L_volume_pct"] + [f"{d},{v}" for d, v in zip(dose, volume)]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("problem", ["/proc out", "bad extension", "out is a folder", "unwritable report",
                                     "report is a file", "desired dvh missing", "desired dvh not csv",
                                     "desired dvh rises", "desired dvh negative dose", "desired dvh 1e6 Gy"])
def test_paths_and_desired_dvh_are_checked_before_any_computation(problem, sample, tmp_path, capsys, no_prediction):
    case = _save(sample, tmp_path / "case")
    out, extra = tmp_path / "dose.nrrd", []
    expected = ""
    if problem == "/proc out":
        out, expected = "/proc/x.nrrd", "cannot write into /proc"
    elif problem == "bad extension":
        out, expected = tmp_path / "dose.txt", "the extension must be one of"
    elif problem == "out is a folder":
        out, expected = tmp_path / "folder.nrrd", "is a folder"
        out.mkdir()
    elif problem == "unwritable report":
        extra, expected = ["--report", "/proc/report"], "cannot write into /proc/report"
    elif problem == "report is a file":
        (tmp_path / "r").write_text("x")
        extra, expected = ["--report", str(tmp_path / "r")], "is a file, not a folder"
    elif problem == "desired dvh missing":
        extra, expected = ["--desired-dvh", str(tmp_path / "none.csv")], "none.csv"
    elif problem == "desired dvh not csv":
        (tmp_path / "d.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
        extra, expected = ["--desired-dvh", str(tmp_path / "d.csv")], "d.csv"
    else:
        dose, volume = {"desired dvh rises": ([0, 10, 20, 30], [100, 50, 80, 0]),
                        "desired dvh negative dose": ([-5, 10, 20, 30], [100, 80, 40, 0]),
                        "desired dvh 1e6 Gy": ([0, 10, 20, 1e6], [100, 80, 40, 0])}[problem]
        extra = ["--desired-dvh", str(_desired_csv(tmp_path / "d.csv", dose, volume))]
        expected = {"desired dvh rises": "never rises with dose", "desired dvh negative dose": "within 0-200 Gy",
                    "desired dvh 1e6 Gy": "within 0-200 Gy"}[problem]
    assert main(["predict", "--case", str(case), "--out", str(out), *extra]) == 2
    line = _one_line(capsys)
    assert expected in line, line
    assert "Traceback" not in line and not (tmp_path / "dose.nrrd").exists()


def test_no_target_lists_unknown_names_and_how_to_map_them(sample, tmp_path, capsys):
    structures = dict(sample.structures)
    structures["High risk volume"] = structures.pop("PTV_70")
    structures.pop("PTV_56", None)
    structures.pop("PTV_63", None)
    case = save_case(PlanningCase(sample.geometry, ct=sample.ct, structures=structures), tmp_path / "case", "nrrd")
    out = tmp_path / "dose.nrrd"
    assert main(["predict", "--case", str(case), "--out", str(out)]) == 2
    line = _one_line(capsys)
    assert "Names not recognised: High risk volume" in line and "--map 'High risk volume=PTV_70'" in line
    # the option the message names exists and works
    assert main(["predict", "--case", str(case), "--out", str(out), "--map", "High risk volume=PTV_70"]) == 0
    assert out.exists()


def test_a_target_without_a_dose_is_given_one_with_prescription(sample, tmp_path, capsys, no_prediction):
    structures = {("PTV" if name == "PTV_70" else name): mask for name, mask in sample.structures.items()
                  if name not in ("PTV_56", "PTV_63")}
    case = save_case(PlanningCase(sample.geometry, ct=sample.ct, structures=structures), tmp_path / "case", "nrrd")
    assert main(["predict", "--case", str(case), "--out", str(tmp_path / "d.nrrd")]) == 2
    assert "--prescription PTV=70" in _one_line(capsys)
    from doseai.cli import _load_case, build_parser

    args = build_parser().parse_args(["predict", "--case", str(case), "--out", "d.nrrd", "--prescription", "PTV=70"])
    assert _load_case(args).prescriptions == {"PTV": 70.0}
    with pytest.raises(SystemExit):
        main(["predict", "--case", str(case), "--out", "x.nrrd", "--prescription", "PTV=-3"])


def test_no_rtstruct_gives_a_clean_one_line_warning(sample, tmp_path, capsys):
    from doseai.io.dicom import write_ct_series

    write_ct_series(sample.ct, sample.geometry, tmp_path / "dicom")
    assert main(["convert", "--case", str(tmp_path / "dicom"), "--to", "nrrd", "--out", str(tmp_path / "n")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"doseai convert: warning: no RTSTRUCT in {tmp_path / 'dicom'}; the case has no structures"]


def test_version_and_device_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("doseai ")
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--case", "x", "--out", "y.nrrd", "--device", "gpu"])
    assert exit_info.value.code == 2 and "not one of auto, cpu, cuda, cuda:N" in capsys.readouterr().err


def test_running_out_of_memory_is_one_line_not_a_damaged_file(sample, tmp_path, capsys, monkeypatch):
    import doseai.io

    def too_big(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(doseai.io, "load_image_case", too_big)
    assert main(["predict", "--case", str(_save(sample, tmp_path / "case")), "--out", str(tmp_path / "d.nrrd")]) == 2
    line = _one_line(capsys)
    assert "out of memory" in line and "damaged" not in line
