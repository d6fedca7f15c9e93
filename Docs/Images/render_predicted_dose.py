"""Renders Docs/Images/predicted_dose.png (the README's picture and the extension's screenshot): the embedded
sample case, its dose predicted by the shipped model at neutral sliders, over an axial CT slice with isodose
lines, beside its DVH.   python Docs/Images/render_predicted_dose.py"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from doseai.dvh import compute_dvhs  # noqa: E402
from doseai.predict import DosePredictor  # noqa: E402
from doseai.sample import make_sample_case  # noqa: E402

OUT = Path(__file__).with_name("predicted_dose.png")


def main() -> None:
    case = make_sample_case(with_dose=False)
    predictor = DosePredictor(threads=2)
    predictor.set_case(case)
    dose = predictor.predict(0.0, 0.0)
    rx = case.max_prescription
    target = case.structures["PTV_70"] if "PTV_70" in case.structures else next(iter(case.structures.values()))
    k = int(np.argmax(target.sum(axis=(1, 2))))  # the axial slice with the most target
    sx, sy, _ = case.geometry.spacing
    extent = (0, case.ct.shape[2] * sx, case.ct.shape[1] * sy, 0)

    fig, (ax_img, ax_dvh) = plt.subplots(1, 2, figsize=(11, 4.8), gridspec_kw={"width_ratios": [1, 1.15]})
    ax_img.imshow(case.ct[k], cmap="gray", vmin=-200, vmax=300, extent=extent)
    wash = np.ma.masked_less(dose[k], 0.3 * rx)
    image = ax_img.imshow(wash, cmap="jet", vmin=0, vmax=1.1 * rx, alpha=0.45, extent=extent)
    levels = [0.5 * rx, 0.95 * rx]
    ax_img.contour(np.linspace(0, extent[1], dose.shape[2]), np.linspace(0, extent[2], dose.shape[1]), dose[k],
                   levels=levels, colors=["yellow", "white"], linewidths=1)
    body = np.argwhere(case.ct[k] > -500)  # crop to the body, with a margin
    (y0, x0), (y1, x1) = body.min(axis=0) - 5, body.max(axis=0) + 5
    ax_img.set(xlim=(x0 * sx, x1 * sx), ylim=(y1 * sy, y0 * sy))
    ax_img.set_title(f"Predicted dose, isodose {levels[0]:.0f} and {levels[1]:.1f} Gy", fontsize=10)
    ax_img.set_xlabel("mm")
    fig.colorbar(image, ax=ax_img, label="Gy", fraction=0.046)

    ax_dvh.set_prop_cycle(color=plt.cm.tab20(np.linspace(0, 1, 20)))
    for name, curve in compute_dvhs(dose, case.structures, case.geometry.voxel_volume_mm3 / 1000.0).items():
        ax_dvh.plot(curve.dose_gy, curve.volume_pct, label=name)
    ax_dvh.set(xlabel="Dose [Gy]", ylabel="Volume [%]", title="DVH (shipped model, neutral sliders)",
               xlim=(0, 1.15 * rx), ylim=(0, 101))
    ax_dvh.grid(alpha=0.3)
    ax_dvh.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(OUT, dpi=90)
    print(OUT)


if __name__ == "__main__":
    main()
