"""The preference objective: differentiable plan metrics and the gap to what the sliders ask for.

Slider semantics (stored in the model card, read from there): relative to the reference plan,
``oar_sparing = w`` asks every OAR's mean dose to change by ``w * oar_mean_change_at_plus1``
(e.g. -20 % at +1, +20 % at -1) while the PTV D95 stays; ``homogeneity = h`` asks the highest-dose
PTV's homogeneity index (D2 - D98) / D50 to change by ``h * hi_change_at_plus1`` while its mean stays.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from doseai.conditions import Condition, ConditionSpace

DEFAULT_SEMANTICS = {"oar_mean_change_at_plus1": -0.20, "hi_change_at_plus1": -0.40}
# the conditions this objective defines, in the network's column order; the export writes them into the card,
# from which everything that shows or takes a slider reads them (doseai.conditions)
PREFERENCE_CONDITIONS = ConditionSpace((
    Condition("oar_sparing", "OAR sparing", -1.0, 1.0, abbreviation="OAR"),
    Condition("homogeneity", "PTV homogeneity", -1.0, 1.0, abbreviation="HI"),
))
OAR_SPARING = PREFERENCE_CONDITIONS.index("oar_sparing")
HOMOGENEITY = PREFERENCE_CONDITIONS.index("homogeneity")


@dataclass
class PlanMetrics:
    """The differentiable plan metrics the preference loss compares (see :func:`plan_metrics`)."""

    oar_means: torch.Tensor  # [B, n_oar], NaN where the OAR is absent
    ptv_d95: torch.Tensor  # [B]
    ptv_mean: torch.Tensor  # [B]
    ptv_hi: torch.Tensor  # [B]
    ptv_spread: torch.Tensor  # [B] D2 - D98


def _masked_quantiles(values: torch.Tensor, mask: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    selected = values[mask]
    if selected.numel() == 0:
        return torch.full_like(q, float("nan"))
    return torch.quantile(selected, q)


def plan_metrics(dose: torch.Tensor, oar_masks: torch.Tensor, ptv_masks: torch.Tensor) -> PlanMetrics:
    """dose [B, 1, z, y, x]; oar_masks [B, n_oar, z, y, x] bool; ptv_masks [B, 1, z, y, x] bool (highest PTV)."""
    dose = dose.float()
    counts = oar_masks.sum(dim=(2, 3, 4))
    sums = (dose * oar_masks).sum(dim=(2, 3, 4))
    oar_means = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan")))
    q = torch.tensor([0.02, 0.05, 0.5, 0.98], device=dose.device)
    d95, mean, hi, spread = [], [], [], []
    for b in range(dose.shape[0]):
        d02, d05, d50, d98 = _masked_quantiles(dose[b, 0], ptv_masks[b, 0], q)  # D98 is the 2nd percentile
        d95.append(d05)
        spread.append(d98 - d02)
        hi.append((d98 - d02) / d50.clamp(min=1e-3))
        mean.append(dose[b, 0][ptv_masks[b, 0]].mean())
    return PlanMetrics(oar_means, torch.stack(d95), torch.stack(mean), torch.stack(hi), torch.stack(spread))


def preference_gap(predicted: PlanMetrics, reference: PlanMetrics, sliders: torch.Tensor,
                   semantics: dict = DEFAULT_SEMANTICS) -> torch.Tensor:
    """Mean absolute gap (dose units of the network) between the predicted metrics and the slider targets."""
    oar_weight, hom_weight = sliders[:, OAR_SPARING:OAR_SPARING + 1], sliders[:, HOMOGENEITY]
    oar_target = reference.oar_means * (1 + semantics["oar_mean_change_at_plus1"] * oar_weight)
    present = ~torch.isnan(oar_target)
    oar_gap = torch.where(present, (predicted.oar_means - oar_target).abs(), torch.zeros_like(oar_target))
    oar_gap = oar_gap.sum(dim=1) / present.sum(dim=1).clamp(min=1)
    # HI = spread / D50 with the PTV mean held: asking HI to change by x % asks the spread to change by x %
    # (bounded and in dose units, unlike the ratio, which explodes while D50 is still near 0 early in training)
    spread_target = reference.ptv_spread * (1 + semantics["hi_change_at_plus1"] * hom_weight)
    hi_gap = (predicted.ptv_spread - spread_target).abs()
    d95_gap = (predicted.ptv_d95 - reference.ptv_d95).abs()
    mean_gap = (predicted.ptv_mean - reference.ptv_mean).abs()
    return (oar_gap + hi_gap + d95_gap + mean_gap).mean()


# OpenKBP's DVH score compares, per structure, OAR mean and D_0.1cc and target D99, D95, D1. The tails stand
# in for those quantiles (a tail mean has a gradient on every voxel of the tail, a quantile on one).
LOW_TAIL, HIGH_TAIL, MIN_STRUCTURE_VOXELS = 0.05, 0.01, 10


def _tail_means(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = values.numel()
    low = -(-values).topk(max(2, int(LOW_TAIL * n))).values.mean()
    high = values.topk(max(2, int(HIGH_TAIL * n))).values.mean()
    return low, high


def dvh_metric_loss(prediction: torch.Tensor, reference: torch.Tensor, oar_masks: torch.Tensor,
                    target_levels: torch.Tensor) -> torch.Tensor:
    """Mean over structures of the absolute error in each DVH-score metric's stand-in (batch of one).

    OARs (``oar_masks`` [1, n, z, y, x] bool): mean dose and the hottest 1 %. Targets (``target_levels``
    [1, 1, z, y, x], the prescription channel, one structure per distinct level): the coldest 5 % (D95, D99),
    the hottest 1 % (D1) and the mean."""
    predicted, wanted = prediction[0, 0].float(), reference[0, 0].float()
    terms = []
    for mask in oar_masks[0]:
        if int(mask.sum()) >= MIN_STRUCTURE_VOXELS:
            p, r = predicted[mask], wanted[mask]
            terms.append((p.mean() - r.mean()).abs() + (_tail_means(p)[1] - _tail_means(r)[1]).abs())
    levels = target_levels[0, 0]
    for level in torch.unique(levels[levels > 0]):
        mask = levels == level
        if int(mask.sum()) >= MIN_STRUCTURE_VOXELS:
            p, r = predicted[mask], wanted[mask]
            (p_low, p_high), (r_low, r_high) = _tail_means(p), _tail_means(r)
            terms.append((p_low - r_low).abs() + (p_high - r_high).abs() + (p.mean() - r.mean()).abs())
    return torch.stack(terms).mean() if terms else predicted.sum() * 0.0
