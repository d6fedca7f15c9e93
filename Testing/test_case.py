import numpy as np
import pytest

from doseai import GeometryMismatchError, ImageGeometry, InvalidDoseError, MissingStructureError, PlanningCase
from doseai.errors import DoseAIError
from doseai.sample import make_sample_case
from doseai.structures import canonical_name, match_structures, prescription_from_name


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("PTV70", "PTV_70"), ("PTV_7000", "PTV_70"), ("ptv 59.4Gy", "PTV_59.4"), ("PTV_56", "PTV_56"),
        ("Parotid L", "Parotid_L"), ("LeftParotid", "Parotid_L"), ("parotid_rt", "Parotid_R"),
        ("RightParotid", "Parotid_R"), ("L_Parotid", "Parotid_L"), ("Spinal Cord", "SpinalCord"),
        ("Brain Stem", "Brainstem"), ("BODY", "External"), ("esophagus", "Esophagus"), ("Cochlea_R", "Cochlea_R"),
        ("Lung_L", None), ("Parotid", None),
    ],
)
def test_canonical_names(raw, expected):
    assert canonical_name(raw) == expected


def test_prescription_units():
    assert prescription_from_name("PTV_7000") == 70.0
    assert prescription_from_name("PTV 6000cGy") == 60.0
    assert prescription_from_name("PTV54Gy") == 54.0
    assert prescription_from_name("PTV") is None


def test_overrides_and_conflicts():
    assert match_structures(["Parotid L", "Tumour"], {"Tumour": "PTV_66"}) == {"Parotid L": "Parotid_L", "Tumour": "PTV_66"}
    assert match_structures(["Couch", "Brainstem"], {"Couch": None}) == {"Brainstem": "Brainstem"}
    assert match_structures(["mystery"]) == {"mystery": "mystery"}  # kept under its own name, not dropped
    with pytest.raises(DoseAIError, match="both map to 'Parotid_L'"):
        match_structures(["Parotid L", "LeftParotid"])


def test_case_from_named_masks_reads_prescriptions():
    geometry = ImageGeometry(shape=(4, 5, 6), spacing=(1, 1, 2))
    target = np.zeros(geometry.shape, bool)
    target[1:3, 1:3, 1:3] = True
    case = PlanningCase.from_named_masks(geometry, {"PTV_7000": target, "Parotid L": ~target})
    assert case.prescriptions == {"PTV_70": 70.0}
    assert case.targets == ["PTV_70"] and case.oars == ["Parotid_L"]
    assert case.missing(["Brainstem", "PTV_70"]) == ["Brainstem"]
    assert not case.mask("Brainstem").any()


def test_case_rejects_bad_input():
    geometry = ImageGeometry(shape=(4, 5, 6), spacing=(1, 1, 1))
    with pytest.raises(GeometryMismatchError, match="shape"):
        PlanningCase(geometry=geometry, ct=np.zeros((4, 5, 5)))
    bad = np.zeros(geometry.shape, np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(InvalidDoseError, match="NaN"):
        PlanningCase(geometry=geometry, dose=bad)
    with pytest.raises(InvalidDoseError, match="negative"):
        PlanningCase(geometry=geometry, dose=-np.ones(geometry.shape))
    with pytest.raises(MissingStructureError, match="no target"):
        PlanningCase(geometry=geometry).require_target()
    with pytest.raises(GeometryMismatchError):
        ImageGeometry(shape=(4, 5, 6), spacing=(1, 0, 1))


def test_geometry_index_physical_roundtrip():
    direction = (0, 1, 0, -1, 0, 0, 0, 0, 1)  # rotated in-plane
    geometry = ImageGeometry(shape=(3, 4, 5), spacing=(0.5, 2.0, 3.0), origin=(10, -20, 5), direction=direction)
    index = np.array([[0, 0, 0], [2, 3, 4], [1, 2, 3]], float)
    points = geometry.index_to_physical(index)
    np.testing.assert_allclose(geometry.physical_to_index(points), index, atol=1e-9)
    # agrees with SimpleITK's own transform
    image = geometry.to_sitk(np.zeros(geometry.shape, np.float32))
    np.testing.assert_allclose(points[1], image.TransformContinuousIndexToPhysicalPoint((4.0, 3.0, 2.0)))


def test_sample_is_deterministic_and_complete():
    a, b = make_sample_case(seed=3), make_sample_case(seed=3)
    c = make_sample_case(seed=4)
    assert np.array_equal(a.ct, b.ct) and np.array_equal(a.dose, b.dose)
    assert not np.array_equal(a.structures["PTV_70"], c.structures["PTV_70"])
    expected = {"External", "Brainstem", "SpinalCord", "Parotid_L", "Parotid_R", "Larynx", "Esophagus", "Mandible",
                "PTV_70", "PTV_63", "PTV_56"}
    assert set(a.structures) == expected
    assert all(a.structures[n].any() for n in expected)
    a.require_target()
    # PTVs do not overlap, as in OpenKBP; the dose reaches the prescription inside the top target
    assert not (a.structures["PTV_70"] & a.structures["PTV_63"]).any()
    assert np.median(a.dose[a.structures["PTV_70"]]) > 0.95 * 70
    # anatomy in LPS: left parotid at larger x than right, brainstem above the cord
    x_left = np.argwhere(a.structures["Parotid_L"])[:, 2].mean()
    x_right = np.argwhere(a.structures["Parotid_R"])[:, 2].mean()
    assert x_left > x_right
    assert np.argwhere(a.structures["Brainstem"])[:, 0].mean() > np.argwhere(a.structures["SpinalCord"])[:, 0].mean()
