"""The study's statistics: the paired t-test of DSD minus dense over seeds, the Holm and
Benjamini-Hochberg corrections over the study's cells, and the confirmation's verdicts
(design.md, "The study")."""

import math

import numpy as np

ALPHA = 0.05  # family-wise error rate of the verdicts (Holm)


def paired_test(treated, control) -> dict:
    """Paired t-test of treated - control: mean, spread, 95% interval, two-sided p-value.

    When every pair differs by exactly the same amount (common when accuracies move by whole
    test examples), the t statistic is undefined: p_value and outside_noise are then None.
    """
    diffs = np.asarray(treated, dtype=float) - np.asarray(control, dtype=float)
    n = len(diffs)
    if n < 2:
        raise ValueError("a paired test needs at least 2 pairs")
    mean, sd = float(diffs.mean()), float(diffs.std(ddof=1))
    if np.allclose(diffs, diffs[0], rtol=0, atol=1e-12):  # equal up to float rounding
        return {"n": n, "mean_diff": mean, "sd_diff": 0.0, "ci95": None, "p_value": None,
                "outside_noise": None}
    from scipy import stats  # here, not at the top: importing scipy.stats takes seconds

    se = sd / math.sqrt(n)
    p_value = float(2 * stats.t.sf(abs(mean / se), n - 1))
    half_width = float(stats.t.ppf(0.975, n - 1) * se)
    return {"n": n, "mean_diff": mean, "sd_diff": sd,
            "ci95": [mean - half_width, mean + half_width], "p_value": p_value,
            "outside_noise": p_value < 0.05}


def holm(p_values) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input's order."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p, kind="stable")
    m = len(p)
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted.tolist()


def benjamini_hochberg(p_values) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (false discovery rate), in the input's order."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p, kind="stable")
    m = len(p)
    scaled = p[order] * m / np.arange(1, m + 1)
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return adjusted.tolist()


def correct(results: list[dict]) -> None:
    """Holm and BH over the distinct cells, per comparison; a verdict per cell. A cell whose
    differences have no spread (or whose runs diverged) counts as p = 1: never a finding."""
    for name in ("tuned", "same_lr"):
        family = {}
        for result in results:
            compared = result[name]
            p = 1.0 if compared["diverged"] or compared["paired"]["p_value"] is None \
                else compared["paired"]["p_value"]
            family[result["key"]] = p
        keys = list(family)
        adjusted = dict(zip(keys, zip(holm([family[k] for k in keys]),
                                      benjamini_hochberg([family[k] for k in keys]))))
        for result in results:
            compared = result[name]
            compared["p_holm"], compared["p_bh"] = adjusted[result["key"]]
            compared["family_size"] = len(keys)
            compared["verdict"] = _verdict(compared, result["higher_is_better"])


def _verdict(compared: dict, higher_is_better: bool) -> str:
    if compared["diverged"]:
        return "diverged"
    if compared["p_holm"] >= ALPHA:
        return "tie"
    better = compared["paired"]["mean_diff"] > 0 if higher_is_better \
        else compared["paired"]["mean_diff"] < 0
    return "DSD better" if better else "DSD worse"


def correct_confirmation(results: list[dict]) -> None:
    """Holm over the cells trained again on fresh seeds; a cell is confirmed when its fresh
    difference is outside the noise after that correction and points the way the exploratory
    one did. Cells not trained again keep confirmation None."""
    family = {}
    for result in results:
        again = result["confirmation"]
        if again is not None:
            family[result["key"]] = 1.0 if again["diverged"] or \
                again["paired"]["p_value"] is None else again["paired"]["p_value"]
    adjusted = dict(zip(family, holm(list(family.values())))) if family else {}
    for result in results:
        again = result["confirmation"]
        if again is None:
            continue
        again["p_holm"], again["family_size"] = adjusted[result["key"]], len(family)
        again["confirmed"] = not again["diverged"] and again["p_holm"] < ALPHA and (
            again["paired"]["mean_diff"] > 0) == (result["tuned"]["paired"]["mean_diff"] > 0)
