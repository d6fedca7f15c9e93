"""Fuzzing the readers: mutated DICOM folders and image case folders made from a small sample case with a fixed
seed (truncated files, deleted tags, missing, shuffled or repeated slices, wrong data types, absurd sizes in a
header, garbage bytes). Each must end in the project's own one-line error (DoseAIError) or a correct load, never a
traceback or a hang; and the CLI writes nothing when it refuses one."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from doseai.errors import DoseAIError
from doseai.io import load_case, save_case
from doseai.sample import make_sample_case

SEED = 26
N_DICOM = 130
N_IMAGE = 110
SECONDS_PER_CASE = 5.0  # a hang guard: a small case loads in ~0.05-0.2 s

# tags whose loss or corruption a reader must survive (by keyword, CT slices unless RTSTRUCT is named)
CT_TAGS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns", "PixelData",
           "RescaleSlope", "RescaleIntercept", "SOPClassUID", "Modality", "SeriesInstanceUID", "FrameOfReferenceUID",
           "BitsAllocated", "PixelRepresentation", "SliceThickness", "SOPInstanceUID", "StudyInstanceUID")
RS_TAGS = ("ROIContourSequence", "StructureSetROISequence", "ReferencedFrameOfReferenceSequence",
           "RTROIObservationsSequence", "FrameOfReferenceUID", "SOPClassUID")
GARBAGE_VALUES = {"PixelSpacing": ["abc", "0"], "ImageOrientationPatient": ["0", "0", "0", "0", "0", "0"],
                  "Rows": 65535, "Columns": 1, "BitsAllocated": 8, "RescaleSlope": "nan",
                  "ImagePositionPatient": ["1e308", "nan", "0"], "SliceThickness": "-3"}


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    case = make_sample_case(seed=4, shape=(10, 24, 24), spacing_xyz=(6.0, 6.0, 5.0))
    root = tmp_path_factory.mktemp("fuzz")
    return case, save_case(case, root / "dicom", "dicom"), save_case(case, root / "nrrd", "nrrd"), \
        save_case(case, root / "mha", "mha")


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _truncate(path: Path, rng) -> str:
    data = path.read_bytes()
    cut = int(rng.integers(0, len(data)))
    path.write_bytes(data[:cut])
    return f"truncated {path.name} at {cut} of {len(data)} bytes"


def _garble(path: Path, rng) -> str:
    data = bytearray(path.read_bytes())
    start = int(rng.integers(0, len(data)))
    length = int(rng.integers(1, 200))
    data[start:start + length] = rng.bytes(min(length, len(data) - start))
    path.write_bytes(bytes(data))
    return f"garbled {length} bytes of {path.name} at {start}"


def _mutate_dicom(folder: Path, rng) -> str:
    slices = sorted((folder / "CT").glob("*.dcm"))
    rs = folder / "RS.dcm"
    kind = rng.choice(["truncate", "garble", "delete tag", "garbage value", "delete slice", "shuffle", "repeat slice",
                       "delete rtstruct tag", "empty file", "non-dicom file", "pixel dtype"])
    target = slices[int(rng.integers(len(slices)))]
    if kind == "truncate":
        return _truncate(rng.choice([*slices, rs, folder / "RD.dcm"]), rng)
    if kind == "garble":
        return _garble(rng.choice([*slices, rs]), rng)
    if kind in ("delete tag", "delete rtstruct tag"):
        path, tags = (target, CT_TAGS) if kind == "delete tag" else (rs, RS_TAGS)
        ds = pydicom.dcmread(path, force=True)
        tag = str(rng.choice(tags))
        if tag in ds:
            delattr(ds, tag)
        ds.save_as(path)
        return f"deleted {tag} from {path.name}"
    if kind == "garbage value":
        ds = pydicom.dcmread(target, force=True)
        tag = str(rng.choice(list(GARBAGE_VALUES)))
        value = GARBAGE_VALUES[tag]
        raw = value if isinstance(value, int) else "\\".join([value] if isinstance(value, str) else value)
        if isinstance(raw, int):
            setattr(ds, tag, raw)
        else:  # the bytes as a damaged file holds them: a raw element is written unvalidated
            element = pydicom.tag.Tag(pydicom.datadict.tag_for_keyword(tag))
            value = raw.encode() + b" " * (len(raw) % 2)
            vr = pydicom.datadict.dictionary_VR(element)
            ds._dict[element] = pydicom.dataelem.RawDataElement(element, vr, len(value), value, 0, False, True)
        ds.save_as(target)
        return f"set {tag} of {target.name} to {GARBAGE_VALUES[tag]}"
    if kind == "delete slice":
        target.unlink()
        return f"deleted {target.name}"
    if kind == "shuffle":
        names = [p.name for p in slices]
        order = rng.permutation(len(slices))
        temporary = [p.rename(p.with_suffix(".tmp")) for p in slices]
        for source, index in zip(temporary, order):
            source.rename(source.parent / names[index])
        return "shuffled the slice file names"
    if kind == "repeat slice":
        shutil.copy(target, target.with_name("copy_" + target.name))
        return f"copied {target.name}"
    if kind == "empty file":
        target.write_bytes(b"")
        return f"emptied {target.name}"
    if kind == "non-dicom file":
        (folder / "CT" / "notes.dcm").write_text("not DICOM at all")
        return "added a text file named .dcm"
    ds = pydicom.dcmread(target, force=True)  # pixel dtype: 16-bit data declared as another layout
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    ds.save_as(target)
    return f"declared 32-bit pixels in {target.name}"


def _mutate_image_folder(folder: Path, rng) -> str:
    images = [p for p in _files(folder) if p.suffix in (".nrrd", ".mha")]
    kind = rng.choice(["truncate", "garble", "header size", "header type", "header spacing", "header direction",
                       "delete structures", "corrupt case.json", "nan ct", "delete ct"])
    target = images[int(rng.integers(len(images)))]
    if kind == "truncate":
        return _truncate(target, rng)
    if kind == "garble":
        return _garble(target, rng)
    if kind.startswith("header"):
        data = target.read_bytes()
        split = data.find(b"\n\n") if target.suffix == ".nrrd" else data.find(b"ElementDataFile")
        if split < 0:
            return _garble(target, rng)
        header, body = data[:split].decode("latin-1"), data[split:]
        field = {"nrrd": {"header size": ("sizes:", "sizes: 100000 100000 100000"),
                          "header type": ("type:", "type: double"),
                          "header spacing": ("space directions:", "space directions: (0,0,0) (0,0,0) (0,0,0)"),
                          "header direction": ("space directions:", "space directions: (1,1,0) (1,1,0) (0,0,1)")},
                 "mha": {"header size": ("DimSize", "DimSize = 100000 100000 100000"),
                         "header type": ("ElementType", "ElementType = MET_DOUBLE"),
                         "header spacing": ("ElementSpacing", "ElementSpacing = 0 -1 0"),
                         "header direction": ("TransformMatrix", "TransformMatrix = 1 1 0 1 1 0 0 0 1")},
                 }[target.suffix[1:]][kind]
        lines = [field[1] if line.startswith(field[0]) else line for line in header.split("\n")]
        target.write_bytes("\n".join(lines).encode("latin-1") + body)
        return f"{kind} of {target.name}: {field[1]}"
    if kind == "delete structures":
        for path in folder.glob("structures*"):
            path.unlink()
        return "deleted the structures"
    if kind == "corrupt case.json":
        (folder / "case.json").write_text(rng.choice(['{"prescriptions": {"PTV_70": "x"}}', "{not json",
                                                      '{"prescriptions": {"PTV_70": -70}}', "[]"]))
        return "corrupted case.json"
    ct_path = next(folder.glob("ct.*"))
    if kind == "delete ct":
        ct_path.unlink()
        return "deleted the CT"
    from doseai.io import images

    ct, geometry = images.read_image(ct_path)
    ct[tuple(rng.integers(0, n) for n in ct.shape)] = np.nan
    images.write_image(ct, geometry, ct_path, force=True)
    return "a NaN voxel in the CT"


def _check_load(path: Path, description: str, reference) -> str:
    """'refused' or 'loaded'; fails the test on any other exception, a hang, or a wrong load."""
    start = time.perf_counter()
    try:
        case = load_case(path)
    except DoseAIError as error:
        assert "\n" not in str(error).strip(), (description, str(error))
        outcome = "refused"
    except Exception as error:  # noqa: BLE001 - the point: anything else is a bug
        pytest.fail(f"{description}: {type(error).__name__}: {error}")
    else:
        outcome = "loaded"
        assert case.ct is not None and np.isfinite(case.ct).all(), description
        if case.geometry.shape == reference.geometry.shape and "shuffled" in description:
            assert np.allclose(case.ct, reference.ct, atol=0.5), description  # a reordering changes nothing
    assert time.perf_counter() - start < SECONDS_PER_CASE, f"{description}: took too long"
    return outcome


def test_fuzzed_dicom_folders_load_or_are_refused(originals, tmp_path):
    reference, dicom_folder, _, _ = originals
    rng = np.random.default_rng(SEED)
    outcomes = []
    for n in range(N_DICOM):
        folder = tmp_path / f"d{n}"
        shutil.copytree(dicom_folder, folder)
        descriptions = [_mutate_dicom(folder, rng) for _ in range(int(rng.integers(1, 3)))]
        outcomes.append(_check_load(folder, f"DICOM #{n}: {'; '.join(descriptions)}", reference))
        shutil.rmtree(folder)
    # the mutations are not all harmless, nor all fatal: both outcomes occur
    assert outcomes.count("refused") > 20 and outcomes.count("loaded") > 10, outcomes


def test_fuzzed_image_folders_load_or_are_refused(originals, tmp_path):
    reference, _, nrrd_folder, mha_folder = originals
    rng = np.random.default_rng(SEED + 1)
    outcomes = []
    for n in range(N_IMAGE):
        folder = tmp_path / f"i{n}"
        shutil.copytree(nrrd_folder if n % 2 else mha_folder, folder)
        description = _mutate_image_folder(folder, rng)
        outcomes.append(_check_load(folder, f"image folder #{n} ({folder.name}): {description}", reference))
        shutil.rmtree(folder)
    assert outcomes.count("refused") > 30, outcomes


def test_the_cli_writes_nothing_when_it_refuses_a_fuzzed_case(originals, tmp_path, capsys):
    from doseai.cli import main

    _, dicom_folder, _, _ = originals
    rng = np.random.default_rng(SEED + 2)
    refused = 0
    for n in range(12):
        folder = tmp_path / f"c{n}"
        shutil.copytree(dicom_folder, folder)
        _truncate(sorted((folder / "CT").glob("*.dcm"))[n % 3], rng)
        out = tmp_path / f"out{n}"
        code = main(["convert", "--case", str(folder), "--to", "nrrd", "--out", str(out)])
        if code == 2:
            refused += 1
            assert not out.exists(), f"#{n}: refused, yet {out} was written"
            assert "Traceback" not in capsys.readouterr().err
    assert refused > 0
