"""What a case's influence rows say: the alignment blocks per view, the float32 ground
truth's precision, the targets and the summary of every case."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping

import numpy as np

from dicesim.config import Config
from dicesim.influence.events import InfluenceRow
from dicesim.report.summary import alignment, alignment_blocks


def ordered(blocks: dict) -> dict:
    """hop_<s> in numeric order (hop_10 after hop_9), between one_hop and all."""
    hops = sorted((k for k in blocks if k.startswith("hop_")), key=lambda k: int(k[4:]))
    return {"one_hop": blocks["one_hop"], **{k: blocks[k] for k in hops}, "all": blocks["all"]}


def ordered_blocks(rows: list[InfluenceRow], estimator: str = "dice_e") -> dict[str, dict]:
    return ordered(alignment_blocks(rows, estimator))


def worst(blocks: Mapping[str, dict], metric: str = "spearman") -> tuple[float, str]:
    """The smallest value of `metric` over the views, and where it occurs."""
    found = [(b[metric], view) for view, b in blocks.items() if b[metric] is not None]
    return min(found) if found else (math.nan, "–")


# ---- precision of float32 ground truth -------------------------------------------------------
def precision_report(rows32: list[tuple], rows64: list[tuple]) -> dict:
    """Entry-by-entry comparison of one case run in float32 and in float64, per hop s:
    gt_noise = Σ|G32 − G64| / Σ|G64| (how far float32 DICE-GT is from float64's),
    e_noise  = Σ|E32 − E64| / Σ|E64|, and the estimator's own error rel_err in both
    dtypes. gt_noise ≪ rel_err means float32 ground truth is precise enough to judge E."""
    key = {(r.event, r.hop, r.node): r for r in rows64}
    by_hop: dict[int, list[tuple]] = defaultdict(list)
    for r in rows32:
        other = key.get((r.event, r.hop, r.node))
        if other is not None:
            by_hop[r.hop].append((r.dice_e, r.dice_gt, other.dice_e, other.dice_gt))
    out = {}
    for hop in sorted(by_hop):
        e32, g32, e64, g64 = np.array(by_hop[hop]).T
        out[f"hop_{hop}"] = {
            "n": len(e32),
            "gt_noise": float(np.abs(g32 - g64).sum() / np.abs(g64).sum()),
            "e_noise": float(np.abs(e32 - e64).sum() / np.abs(e64).sum()),
            "rel_err_float32": alignment(e32, g32)["rel_err"],
            "rel_err_float64": alignment(e64, g64)["rel_err"],
            "sign_agreement_float32": alignment(e32, g32)["sign_agreement"],
            "sign_agreement_float64": alignment(e64, g64)["sign_agreement"],
            "spearman_float32": alignment(e32, g32)["spearman"],
            "spearman_float64": alignment(e64, g64)["spearman"],
            "median_abs_gt": float(np.median(np.abs(g64))),
        }
    return out


# ---- targets ---------------------------------------------------------------------------------
def targets(cases: list[dict], min_spearman: float,
            mid_targets: Iterable[Mapping] = ()) -> dict:
    """Issue 3: every checked case reaches Spearman ≥ min_spearman in every view; the
    no-curvature twins of checked cases are reported beside them (the Hessian's gap)."""
    checked = {}
    for c in cases:
        if c["check"]:
            value, where = worst(c["alignment"])
            checked[c["label"]] = {"min_spearman": value, "at": where,
                                   "pass": bool(value >= min_spearman)}
    gaps = {}
    for c in cases:
        if c["set"] != "core" or c["curvature"]:
            continue
        twin = next((o for o in cases if o["set"] == "core" and o["curvature"]
                     and all(o[k] == c[k] for k in ("topology", "lr", "batch_size", "nodes",
                                                   "removal", "hops"))), None)
        if twin is None:
            continue
        hops = range(1, c["hops"] + 1)
        gaps[c["label"]] = {
            "with_curvature": twin["label"],
            "spearman_by_hop": {"curvature": [twin["alignment"][f"hop_{s}"]["spearman"]
                                              for s in hops],
                                "no_curvature": [c["alignment"][f"hop_{s}"]["spearman"]
                                                 for s in hops]},
            "rel_err_by_hop": {"curvature": [twin["alignment"][f"hop_{s}"]["rel_err"]
                                             for s in hops],
                               "no_curvature": [c["alignment"][f"hop_{s}"]["rel_err"]
                                                for s in hops]},
        }
        last = c["alignment"][f"hop_{c['hops']}"]
        first = c["alignment"]["hop_1"]
        gaps[c["label"]]["falls_off_with_distance"] = bool(
            last["spearman"] < first["spearman"] and last["rel_err"] > first["rel_err"])
    midpoint = midpoint_targets(cases, mid_targets)
    return {"min_spearman": min_spearman, "checked": checked,
            "all_pass": all(v["pass"] for v in checked.values())
            and all(v["pass"] for v in midpoint.values()),
            "curvature_gap": gaps, "midpoint": midpoint}


def midpoint_targets(cases: list[dict], limits: Iterable[Mapping]) -> dict:
    """dice_mid: in the hard cases Spearman ≥ the `min` of the entry of `limits` with the
    largest lr not above the case's, in every view; in the core cases with curvature (the
    defaults; the no-curvature ablation drops the Hessian both rules need) never worse than
    dice_e (Spearman within 1e-6, rel_err no larger) in any view."""
    out = {}
    for c in cases:
        mid, e = c.get("alignment_mid"), c["alignment"]
        if not mid:
            continue
        if c["set"] == "hard":
            fitting = [e for e in limits if float(e["lr"]) <= c["lr"] + 1e-12]
            if not fitting:
                continue
            bar = float(max(fitting, key=lambda e: float(e["lr"]))["min"])
            value, where = worst(mid)
            out[c["label"]] = {"kind": f"Spearman(dice_mid, GT) >= {bar}", "value": value,
                               "at": where, "pass": bool(value >= bar)}
            if c.get("alignment_gauss2"):
                value, where = worst(c["alignment_gauss2"])
                out[c["label"] + " (dice_gauss2)"] = {
                    "kind": f"Spearman(dice_gauss2, GT) >= {bar}", "value": value, "at": where,
                    "pass": bool(value >= bar)}
        elif c["set"] == "core" and c["curvature"]:
            worse = [view for view in e if mid[view]["spearman"] is not None
                     and e[view]["spearman"] is not None
                     and (mid[view]["spearman"] < e[view]["spearman"] - 1e-6
                          or mid[view]["rel_err"] > e[view]["rel_err"])]
            out[c["label"]] = {"kind": "dice_mid never worse than dice_e",
                               "value": len(worse), "at": ", ".join(worse) or "–",
                               "pass": not worse}
    return out


def summarize(cfg: Config, results: list[dict], rows_of: dict[str, list[tuple]]) -> dict:
    main = [c for c in results if c["set"] != "precision"]
    pairs = np.array([(c["second_order_share"][v], c["alignment"][v]["rel_err"])
                      for c in main for v in c["alignment"]
                      if c["second_order_share"].get(v) and c["alignment"][v]["rel_err"]])
    summary = {
        "data": cfg.data.name, "model": f"{cfg.model.name} {list(cfg.model.hidden)} "
        f"{cfg.model.activation}".strip(), "dtype": cfg.dtype,
        "sweep": cfg.alignment.sweep, "cases": main,
        "calibration": {  # ρ against the true rel_err of dice_e, over every case and view
            "n": len(pairs),
            "spearman": alignment(pairs[:, 0], pairs[:, 1])["spearman"] if len(pairs) else None,
            "median_ratio_rel_err_over_rho": float(np.median(pairs[:, 1] / pairs[:, 0]))
            if len(pairs) else None},
        "targets": targets(main, float(cfg.alignment.min_spearman),
                           cfg.alignment.mid_min_spearman),
    }
    prec = [c for c in results if c["set"] == "precision"]
    if len(prec) == 2:
        summary["precision"] = {
            "case": prec[0]["label"].rsplit("/", 1)[0],
            "by_hop": precision_report(rows_of[prec[0]["label"]], rows_of[prec[1]["label"]]),
            "float32": prec[0]["alignment"], "float64": prec[1]["alignment"],
        }
    return summary
