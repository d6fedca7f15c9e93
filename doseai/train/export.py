"""Ship a trained preference model: fp16 weights + a model card (JSON) in Resources/Models."""

from __future__ import annotations

import datetime
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

from doseai.errors import DoseAIError, UnreadableInputError, refuse_overwrite
from doseai.models.dose_prior import DEFAULT_PRIOR_CONFIG
from doseai.models.features import OPENKBP_GANTRY_DEG
from doseai.paths import REPO_ROOT
from doseai.safe_load import load_checkpoint, load_state_dict_file, plain
from doseai.train.preference_loss import PREFERENCE_CONDITIONS

SLIDER_TEXT = (
    "oar_sparing = w in [-1, 1] asks every OAR's mean dose to change by {oar:+.0%} x w relative to the typical "
    "(neutral) plan, with the highest-dose PTV's D95 and mean held; homogeneity = h in [-1, 1] asks that PTV's "
    "homogeneity index (D2 - D98)/D50 to change by {hi:+.0%} x h, with its mean and D95 held. 0 = the typical plan "
    "of the training data. These are the training targets; what the model achieves is measured by "
    "Testing/benchmarks/bench_preference.py and recorded under validation."
)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _write_half_weights(checkpoint: Path, out: Path, force: bool) -> tuple[dict, Path]:
    """The checkpoint's state, and its model weights written to ``out`` in fp16 (half the file size);
    never overwrites without ``force``."""
    out = Path(out)
    refuse_overwrite(out, force)
    state = load_checkpoint(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state["model"].items()}, out)
    return state, out


def _card_header(out: Path, task: str) -> dict:
    return {"name": out.stem, "created": datetime.date.today().isoformat(), "commit": _commit(), "task": task}


def _placement(grid: dict) -> str:
    text = "centred in-plane on the body bounding box and along z on the targets' bounding box"
    if grid.get("snap_to_case_lattice"):
        text += "; then the origin moves onto the nearest case voxel centre (in training and in prediction)"
    return text


def _turn_augmentation_record(augmentation: dict | None) -> dict:
    """The card's account of the turn and zoom augmentation (nothing when the run had none, as up to v2.5)."""
    if not augmentation or not (augmentation["rotate_deg"] or augmentation["scale"]):
        return {}
    from doseai.train.train_preference import MAX_SHIFT_VOXELS

    return {"augmentation": f"left-right mirror, shifts of up to {MAX_SHIFT_VOXELS} voxels; in half the steps a turn "
                            f"about z of up to {augmentation['rotate_deg']:g} deg and a zoom of up to "
                            f"{augmentation['scale']:.0%}"}


def _batch_record(batch: dict | None) -> dict:
    """The card's account of a run's effective batch (nothing for one patient per step, as before)."""
    if not batch:
        return {}
    return {"batch": f"{batch['patients_per_step']} patients per optimizer step ({batch['processes']} processes x "
                     f"{batch['accumulate']} accumulated), the mean of their gradients; peak learning rate "
                     f"{batch['learning_rate']:g} (learning-rate scaling: {batch['lr_scaling']})"}


def export_model(checkpoint: Path, prior_checkpoint: Path | None, out: Path, force: bool = False) -> Path:
    """``prior_checkpoint`` (Stage I) only documents the prior in the card; None for the ablation without it."""
    from doseai.train.train_preference import loss_text as preference_loss_text

    state, out = _write_half_weights(checkpoint, out, force)
    prior_state = load_checkpoint(prior_checkpoint, ("model", "config"), "Stage I prior checkpoint") \
        if prior_checkpoint else None
    semantics = state["semantics"]
    card = {
        **_card_header(out, "head-and-neck IMRT dose prediction steerable by preference sliders (OAR sparing, "
                            "PTV homogeneity)"),
        "inputs": {
            "channels": state["channels"],
            "ct": "HU clipped to [-1000, 1500] / 1000 (a water-equivalent body is used when the case has no CT)",
            "target_dose": "prescription of the covering target / the highest prescription of the case",
            "oars": "occupancy (0..1) of each OpenKBP OAR; a missing OAR is an empty channel",
            "body": "possible-dose mask (OpenKBP) or External",
            "beam_plate": f"fraction of {len(OPENKBP_GANTRY_DEG)} coplanar beams (gantry {list(OPENKBP_GANTRY_DEG)} deg) "
                          "whose target projection (+5 mm) covers the voxel",
        },
        "grid": {**state["grid"], "direction": "identity (LPS)", "placement": _placement(state["grid"])},
        "normalization": {"dose": "network dose x highest prescription of the case = Gy",
                          "training_norm_gy": state["norm_gy"]},
        "preference": {"sliders": PREFERENCE_CONDITIONS.names, "range": [-1.0, 1.0],
                       "conditions": PREFERENCE_CONDITIONS.to_card(), "semantics": semantics,
                       "text": SLIDER_TEXT.format(oar=semantics["oar_mean_change_at_plus1"],
                                                  hi=semantics["hi_change_at_plus1"])},
        "dose_prior": {"kind": "MONAI VQVAE", "config": state["prior_config"] or DEFAULT_PRIOR_CONFIG,
                       "frozen": state["freeze_prior"], "pretrained": prior_state is not None,
                       # a prior extracted from shipped weights carries no training record
                       **({"epochs": prior_state["epoch"] + 1,
                           "validation_reconstruction_mae_gy": prior_state.get("val_mae_gy"),
                           "training_doses": prior_state.get("training_doses") or len(prior_state["train_ids"])}
                          if prior_state and "epoch" in prior_state
                          else {})},
        "network": {"kind": "PreferenceDoseNet (doseai/models/preference.py)", "config": state["config"],
                    "epochs": state["epoch"] + 1},
        "training": {"data": "OpenKBP train split (pt_1-200); Stage I: every training dose, Stage II: training "
                             + ("patients with a dose, those without a CT as a water-equivalent body"
                                if state.get("with_ct_less") else "patients with CT and dose")
                             + "; validation never used for training",
                     "stage_ii_patients": len(state["train_ids"]),
                     "loss": preference_loss_text(state.get("loss")),
                     **_turn_augmentation_record(state.get("augmentation")), **_batch_record(state.get("batch"))},
        "validation": {},
    }
    out.with_suffix(".json").write_text(json.dumps(card, indent=2))
    return out


def average_weights(weights: list[Path], out: Path, force: bool = False) -> Path:
    """Uniform average of shipped weights of one network ("model soup", Wortsman et al. 2022): runs fine-tuned
    from the same weights with different seeds average into one network that generalizes at least as well as
    each, at the cost of none. The card is the first input's, with its calibration and validation dropped
    (they belong to other weights: run calibrate-preference and the benchmark on the result)."""
    if len(weights) < 2:
        raise DoseAIError("averaging needs at least two weight files")
    out = Path(out)
    refuse_overwrite(out, force)
    states = [load_state_dict_file(path) for path in weights]
    for path, state in zip(weights[1:], states[1:]):
        if state.keys() != states[0].keys() or any(state[k].shape != states[0][k].shape for k in state):
            raise UnreadableInputError(f"{path} is not the same network as {weights[0]}: cannot average them")
    averaged = {key: (sum(state[key].double() for state in states) / len(states)).to(value.dtype)
                if value.is_floating_point() else value for key, value in states[0].items()}
    card = json.loads(Path(weights[0]).with_suffix(".json").read_text())
    card.update(_card_header(out, card["task"]))
    card.pop("calibration", None)
    card["validation"] = {}
    card["network"]["averaged_from"] = [Path(path).name for path in weights]
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(averaged, out)
    out.with_suffix(".json").write_text(json.dumps(card, indent=2))
    return out


def prior_from_weights(weights: Path, out: Path, force: bool = False) -> Path:
    """The frozen Stage I prior inside shipped preference weights, written as a Stage I checkpoint (config,
    weights and the training record its card gives), so that ``doseai train preference --prior`` can go on
    from shipped weights without the original Stage I run."""
    out = Path(out)
    refuse_overwrite(out, force)
    card = json.loads(Path(weights).with_suffix(".json").read_text())["dose_prior"]
    state = load_state_dict_file(weights)
    prior = {key[len("prior."):]: value.float() for key, value in state.items() if key.startswith("prior.")}
    if not prior:
        raise UnreadableInputError(f"{weights}: no dose prior in these weights")
    record = ({"epoch": card["epochs"] - 1, "val_mae_gy": card.get("validation_reconstruction_mae_gy"),
               "training_doses": card.get("training_doses")} if "epochs" in card else {})
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(plain({"config": card["config"], "model": prior, **record}), out)
    return out


def update_card(weights: Path, change: Callable[[dict], object]) -> None:
    """Rewrite the model card next to ``weights`` after ``change(card)`` (the rest of the card stays)."""
    card_path = Path(weights).with_suffix(".json")
    card = json.loads(card_path.read_text())
    change(card)
    card_path.write_text(json.dumps(card, indent=2))


def record_validation(weights: Path, results: dict) -> None:
    """Put benchmark results into the model card (the card is the single place a user reads them)."""
    update_card(weights, lambda card: card["validation"].update(results))


def export_dvh_model(checkpoint: Path, out: Path, force: bool = False) -> Path:
    """Ship the DVH-conditioned network (``doseai train dvh``): fp16 weights + its model card."""
    from doseai.models.dvh_conditioned import condition_size

    state, out = _write_half_weights(checkpoint, out, force)
    layout = state["layout"]
    card = {
        **_card_header(out, "head-and-neck IMRT dose prediction conditioned on a desired DVH (DVH editing)"),
        "inputs": {"channels": state["channels"],
                   "note": "the same anatomy channels, grid and placement as the preference model it starts from"},
        "grid": {**state["grid"], "direction": "identity (LPS)",
                 "placement": "centred in-plane on the body bounding box and along z on the targets' bounding box"},
        "normalization": {"dose": "network dose x highest prescription of the case = Gy",
                          "training_norm_gy": state["norm_gy"]},
        "dvh": {**layout,
                "text": f"the condition: each structure's cumulative DVH (volume fraction 0..1) at {layout['n_points']} "
                        f"doses evenly spaced from 0 to {layout['max_relative_dose']} x the highest prescription, "
                        "structures in the listed order, flattened; a missing structure is a row of zeros"},
        "dose_prior": {"kind": "MONAI VQVAE", "config": state["prior_config"], "frozen": True,
                       "pretrained": True, "from": state["init_weights"]},
        "network": {"kind": "PreferenceDoseNet with the DVH vector as its FiLM condition "
                            "(doseai/models/dvh_conditioned.py)",
                    "config": {**state["config"], "n_sliders": condition_size(layout)},
                    "init": state["init_weights"], "epochs": state["epoch"] + 1},
        "training": {"data": f"Pareto plans of OpenKBP training patients generated by `doseai train pareto --run "
                             f"{state['pareto_run']}` (doseai/train/pareto.py); validation patients never used",
                     "patients": len(state["train_ids"]),
                     "pairs": "desired DVH near a patient's Pareto front -> " + (
                         "the nearest (l1) mix of two of its Pareto plans (a x plan_i + (1 - a) x plan_j)"
                         if state.get("targets") == "mixes" else "its nearest (l1) Pareto plan")
                         + (f"; for a one-curve edit the edited curve weighs {state['edit_emphasis']:g}x in that "
                            "distance" if "edit_emphasis" in state else "; edit weighting not recorded in the checkpoint")
                         + " (doseai/train/train_dvh.py)",
                     "loss": state.get("loss", "not recorded in the checkpoint: see doseai/train/train_dvh.py "
                                               "at the commit that trained it"),
                     **_batch_record(state.get("batch"))},
        "validation": {},
    }
    sigma = state["config"].get("mean_offset_sigma_zyx")
    if sigma:
        gains = state["model"]["offset.gain"].float().tolist()
        card["network"]["mean_offset"] = {
            "text": "last layer: per structure, gain x (mean dose of the desired curve - predicted mean dose) added "
                    "to the structure's voxels (an OAR's only outside the targets), smoothed by a Gaussian of "
                    f"sigma {sigma} voxels (z, y, x); the gains are learned",
            "gains": {name: round(gain, 4) for name, gain in zip(layout["structures"], gains)}}
    out.with_suffix(".json").write_text(json.dumps(card, indent=2))
    return out


def _spread_calibration(state: dict, residuals: Path) -> dict:
    from doseai.models.diffusion import ResidualDiffusionNet
    from doseai.train.train_diffusion import fit_spread_scale

    net = ResidualDiffusionNet(state["condition_channels"], state["config"])
    net.load_state_dict(state["model"])
    return fit_spread_scale(net, residuals)


def export_diffusion_model(checkpoint: Path, out: Path, ablation: Path | None = None, force: bool = False) -> Path:
    """Ship the residual dose diffusion model (``doseai train diffusion``): its EMA weights in fp16 + its card.
    ``ablation``: the checkpoint of the run without the clinical-metric term (recorded for the benchmark)."""
    from doseai.models.diffusion import TOKEN_FEATURES

    state, out = _write_half_weights(checkpoint, out, force)
    config = state["config"]
    card = {
        **_card_header(out, "head-and-neck IMRT: several plausible doses around the preference model's, and "
                            "how sure the prediction is (voxel-wise spread)"),
        "base_model": state["base_weights"],
        "inputs": {"note": "the base preference model's anatomy channels and grid (its card), pooled by pool_zyx, "
                           "and its neutral dose (mirror-averaged, as its predictor gives at neutral sliders)",
                   "condition_channels": state["condition_channels"],
                   "tokens": f"11 tokens of {TOKEN_FEATURES} numbers, read by cross-attention: the 7 OpenKBP OARs, up "
                             "to 3 target levels (highest first) and the beams; each: kind (OAR, target, beams), "
                             "present, volume (10 x fraction of the body), prescription level, base dose in it, "
                             "centroid z, y, x (0..1 of the grid)"},
        "grid": state["grid"],
        "sites": {"slots": config["site_slots"], "in_use": state["sites"],
                  "text": "the treatment site is the network's class embedding; only head and neck (slot 0) exists "
                          "in the training data, so the other slots are untrained (a second site's data goes there)"},
        "network": {"kind": "ResidualDiffusionNet: MONAI DiffusionModelUNet (doseai/models/diffusion.py)",
                    "config": config, "epochs": state["epoch"] + 1, "weights": "exponential moving average "
                    f"(decay {state['ema_decay']}) of the trained weights"},
        "sampling": {"sampler": "DDIM, eta 0", "default_steps": 10,
                     "text": "a sample = base network dose + the sampled coarse residual upsampled trilinearly, on "
                             "the model grid; then resampled to the case grid and calibrated as the base model's "
                             "doses are (its card's calibration); at other slider positions the residual drawn for "
                             "the case is added to the base dose at those sliders (trained at neutral only)"},
        "training": {"data": "OpenKBP train split, patients with a dose (those without a CT as a water-equivalent "
                             "body); the residual = clinical dose - the base model's neutral dose; validation never "
                             "used",
                     "patients": len(state["train_ids"]), "batch": state["batch_size"],
                     "learning_rate": state["learning_rate"],
                     "loss": f"MSE on v (v-prediction, {config['train_timesteps']} steps, {config['schedule']} "
                             f"{config['beta_start']}-{config['beta_end']}) + {state['dvh_weight']} x the "
                             "clinical-metric term / residual_scale: the DVH-metric stand-ins (OAR mean and hottest "
                             "1 %, target coldest 5 %, hottest 1 % and mean) of base + the implied clean residual "
                             "against the clinical plan's, on the first patient of a batch below half the noise "
                             "schedule (doseai/train/train_diffusion.py)",
                     "caveat": "the base model was trained on these same patients, so their residuals are smaller "
                               "than on new patients: the samples' spread comes out narrower than the base's real "
                               "error there (validation.calibration measures it)"},
        "validation": {},
    }
    from doseai.train.train_diffusion import fit_fine_scale, fit_metric_scale, residual_set_folder

    residuals = residual_set_folder(Path(state["base_weights"]))
    if residuals.is_dir() and any(residuals.glob("pt_*.npz")):  # fitted on the training patients' residuals
        spacing_zyx = tuple(reversed(state["grid"]["spacing_xyz_mm"]))
        card["fine_scale"] = fit_fine_scale(residuals, spacing_zyx, config["pool_zyx"])
        card["fine_scale"]["metric_rms"] = fit_metric_scale(residuals, spacing_zyx, config["pool_zyx"])
        card["sampling"]["calibration"] = _spread_calibration(state, residuals)
    if ablation is not None:
        ablation_state = load_checkpoint(ablation)
        card["ablation"] = {"without_clinical_metric_term": {
            "checkpoint": Path(ablation).parent.name, "epochs": ablation_state["epoch"] + 1,
            "dvh_weight": ablation_state["dvh_weight"],
            "text": "the same run with dvh_weight 0; Testing/benchmarks/bench_diffusion.py --ablation compares"}}
    out.with_suffix(".json").write_text(json.dumps(card, indent=2))
    return out
