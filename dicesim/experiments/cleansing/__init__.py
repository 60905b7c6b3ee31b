"""`make cleansing`: find mislabelled training samples by their full-horizon influence on
the network's final probe loss, and remove them.

`cleansing.noisy_nodes` nodes (seeded) have a fraction `cleansing.flip` of their labels
flipped (`data.label_noise`). One noisy run carries the reverse pass (every sample's
first-order influence on F = Σ_k q_k L'_k(θ_k^T), summed over its occurrences; positive =
the sample raised the loss) and, for the r-hop DICE baseline, `cleansing.baseline_events`
single-sample DICE-E events followed `cleansing.hops` hops.

- Detection: ROC-AUC of each score for the flipped samples: full-horizon influence,
  per-sample training loss and gradient norm at the node's final model, r-hop DICE-E per
  sample (only the samples the sampled events cover; full-horizon is scored on that same
  subset beside it).
- Removal: for each k in `cleansing.remove`, the top k of the samples by full-horizon
  influence (most harmful first) are removed at every occurrence (`counterfactual.remove`,
  same batch schedule) and the run retrained; against k random samples and no removal.
  Honest test accuracy (clean test labels); the accuracy the noise cost is clean − noisy,
  and the share a removal recovers is (removed − noisy) / (clean − noisy).
- Diagnostics (why the ranking is what it is; not part of the targets): the AUC of the
  influence summed over the occurrences in each quarter of the run only, with that
  quarter's share of Σ|influence|; the flipped samples whose influence is negative (their
  removal would raise the probe loss); the make-up of the top-|flipped| samples.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from dicesim.common.errors import ConfigError
from dicesim.config import MAX_HOPS, Config, bounded, default_list, register_block, show
from dicesim.experiments import runner, variant
from dicesim.experiments.cleansing.report import closing_lines, plots, report_md
from dicesim.experiments.runner import Case, Table, Task
from dicesim.model.data import batch_ids
from dicesim.report.stats import average_ranks
from dicesim.run.engine import Simulation
from dicesim.run.session import Session


@dataclass
class Cleansing:
    """The `cleansing:` block of configs/experiment/cleansing.yaml."""

    noisy_nodes: int = bounded(4, 1)  # nodes whose labels are partly flipped
    flip: float = bounded(0.3, 0, 1, open_lo=True)  # fraction of a noisy node's labels flipped
    remove: list[float] = default_list(0.01, 0.02, 0.05, 0.10)  # fractions k of samples removed
    hops: int = bounded(2, 0, MAX_HOPS)  # r of the r-hop DICE-E baseline per sample
    baseline_events: int = bounded(2000, 0)  # single-sample DICE-E events of the baseline
    min_auc: float = bounded(0.95, 0, 1)


def check_cleansing(c: Config) -> None:
    s = c.cleansing
    if not s.remove or any(not 0 < k < 1 for k in s.remove):
        raise ConfigError(f"cleansing.remove={show(s.remove)}: fractions in (0, 1) of "
                          "the training samples, e.g. cleansing.remove=[0.01,0.05]")


register_block("cleansing", Cleansing, check_cleansing)


SCORE_COLUMNS = ("sample", "node", "flipped", "full_horizon", "train_loss", "grad_norm",
                 "dice_r_hop")
REMOVAL_COLUMNS = ("k", "method", "removed", "flipped_removed", "test_acc", "recovered")


def roc_auc(score: np.ndarray, positive: np.ndarray) -> float | None:
    """P(score of a positive > score of a negative), ties half (Mann-Whitney U)."""
    pos, neg = int(positive.sum()), int((~positive).sum())
    if pos == 0 or neg == 0:
        return None
    ranks = average_ranks(score)
    return float((ranks[positive].sum() - pos * (pos + 1) / 2) / (pos * neg))


def noise_vector(cfg: Config) -> tuple[list[float], list[int]]:
    c = cfg.cleansing
    n = int(cfg.nodes)
    rng = np.random.default_rng([int(cfg.seed), 4242])
    noisy = sorted(int(k) for k in rng.choice(n, size=min(int(c.noisy_nodes), n),
                                               replace=False))
    p = [float(c.flip) if k in noisy else 0.0 for k in range(n)]
    return p, noisy


def occurrences(sim: Simulation) -> dict[int, list[tuple[int, int]]]:
    """Every training sample id → its (node, step) occurrences in the run."""
    s = sim.run
    out: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for t in range(s.steps):
        for k in range(s.nodes):
            for i in batch_ids(sim.parts[k], s.batch_size, t, s.seed, k):
                out[int(i)].append((k, t))
    return out


def removal_config(base: Config, chosen: np.ndarray, occ: dict) -> Config:
    per: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i in chosen:
        for k, t in occ.get(int(i), []):
            per[(k, t)].append(int(i))
    remove = [{"node": k, "step": t, "samples": ids} for (k, t), ids in sorted(per.items())]
    return variant(base, counterfactual__remove=remove)


def quarter_totals(a, parts: int = 4) -> list[tuple[int, int, np.ndarray]]:
    """(lo, hi, value per id) of the influence summed over the occurrences at steps
    [lo, hi) only, for `parts` consecutive windows of the run; they add up to the total."""
    T = a.samples.shape[0]
    cuts = [round(i * T / parts) for i in range(parts + 1)]
    return [(lo, hi, a.sample_totals((lo, hi))[3])
            for lo, hi in zip(cuts[:-1], cuts[1:], strict=True)]


def diagnostics(quarters: list[tuple[int, int, np.ndarray]], value: np.ndarray,
                flipped: np.ndarray, owner: np.ndarray, noisy_nodes: list[int]) -> dict:
    total = float(np.abs(value).sum()) or 1.0
    on_noisy = np.isin(owner, noisy_nodes)
    top = np.argsort(-value)[:int(flipped.sum())]
    return {
        "quarters": [{"steps": [lo, hi], "auc": roc_auc(v, flipped),
                      "share_abs": float(np.abs(v).sum() / total)}
                     for lo, hi, v in quarters],
        "flipped_helpful": int((flipped & (value < 0)).sum()),
        "top_flipped_count": {"flipped": int(flipped[top].sum()),
                              "clean_on_noisy_nodes": int((~flipped[top] & on_noisy[top]).sum()),
                              "clean_on_clean_nodes": int((~flipped[top] & ~on_noisy[top]).sum())},
    }


def baselines(sim: Simulation, theta: torch.Tensor, ids: np.ndarray, owner: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample training loss and gradient norm at the final model of the sample's node."""
    from torch.func import grad, vmap

    model, s = sim.model, sim.run
    x = sim.data.x_train[torch.as_tensor(ids)].to(s.dtype)
    y = sim.data.y_train[torch.as_tensor(ids)]
    th = theta[torch.as_tensor(owner)].to(s.dtype)
    losses = vmap(lambda p, xx, yy: model.sample_losses(p, xx[None], yy[None])[0])(th, x, y)
    grads = vmap(grad(lambda p, xx, yy: model.sample_losses(p, xx[None], yy[None])[0]))(th, x, y)
    return losses.detach().numpy(), grads.norm(dim=1).detach().numpy()


def dice_per_sample(sim: Simulation, rows) -> dict[int, float]:
    """r-hop DICE-E (Σ_{s≤r} Σ_k E) of every single-sample event, summed per sample id."""
    per_event: dict[int, float] = defaultdict(float)
    for r in rows:
        per_event[r.event] += r.dice_e
    s = sim.run
    out: dict[int, float] = defaultdict(float)
    for e in sim.events:
        ids = batch_ids(sim.parts[e.source], s.batch_size, e.step, s.seed, e.source)
        for pos in e.positions:
            out[int(ids[pos])] += per_event.get(e.index, 0.0)
    return out


class CleansingTask(Task):
    """Cases: the tracked noisy run, the clean run, then per k the top-k and random-k
    removals (chosen on rank 0 from the tracked run's attribution, shared with every rank)."""

    name = "cleansing"

    def cases(self, session: Session) -> list[Case]:
        cfg = session.cfg
        c = cfg.cleansing
        noise, self.noisy_nodes = noise_vector(cfg)
        hops = int(c.hops)
        self.plain = variant(cfg, attribution__enabled=False, influence__events=0,
                             eval_every=cfg.steps, data__label_noise=noise)
        tracked = variant(self.plain, attribution__enabled=True,
                          influence__events=int(c.baseline_events), influence__removal="single",
                          influence__hops=hops, influence__ground_truth=False,
                          influence__estimators=["dice_e"],
                          influence__step_range=[0, int(cfg.steps) - hops])
        clean = variant(self.plain, data__label_noise=None)
        removals = [Case(f"{method}_{float(k):g}", f"{method} {float(k):.0%} removed",
                         (method, float(k))) for k in c.remove for method in ("top", "random")]
        self.tracked_sim = session.build(tracked)
        self.occurrences: dict | None = None  # sample id → its (node, step) occurrences
        return [Case("tracked", "noisy run with the reverse pass", self.tracked_sim),
                Case("clean", "clean run", session.build(clean)), *removals]

    def announce(self, session: Session, cases: list[Case]) -> str:
        c = session.cfg.cleansing
        return (f"cleansing: {len(self.noisy_nodes)} noisy nodes {self.noisy_nodes} with "
                f"{c.flip:.0%} flipped labels; one tracked run, a clean run, "
                f"{2 * len(c.remove)} removals")

    def run_case(self, session: Session, case: Case, done: dict) -> dict | None:
        if case.key == "tracked":
            return self.tracked(session, case.spec)
        if case.key == "clean":
            res = session.simulate(case.spec)
            return {"test_acc": float(np.mean(res.test_acc))} if session.rank == 0 else None
        chosen = session.share(done["tracked"]["chosen"][case.key] if session.rank == 0
                               else None)
        if self.occurrences is None:
            self.occurrences = occurrences(self.tracked_sim)
        r_sim = session.build(removal_config(self.plain, chosen, self.occurrences))
        res = session.simulate(r_sim)
        if session.rank != 0:
            return None
        return {"method": case.spec[0], "k": case.spec[1], "chosen": chosen,
                "test_acc": float(np.mean(res.test_acc)) if res.test_acc else None}

    def tracked(self, session: Session, sim: Simulation) -> dict | None:
        """The noisy run with the reverse pass: every sample's score, and the samples each
        removal case takes out (seeded)."""
        cfg = session.cfg
        result = session.simulate(sim)
        if session.rank != 0:
            return None
        a = result.attribution
        ids, owner, _, value = a.sample_totals()
        order = np.argsort(-value)  # most harmful (largest positive influence) first
        rng = np.random.default_rng([int(cfg.seed), 777])
        chosen = {}
        for k in cfg.cleansing.remove:
            m = max(1, int(round(float(k) * len(ids))))
            chosen[f"top_{float(k):g}"] = ids[order[:m]]
            chosen[f"random_{float(k):g}"] = rng.choice(ids, size=m, replace=False)
        loss, gnorm = baselines(sim, result.final_params, ids, owner)
        return {"ids": ids, "owner": owner, "value": value, "loss": loss, "gnorm": gnorm,
                "dice": dict(dice_per_sample(sim, result.influence)),
                "quarters": quarter_totals(a), "test_acc": float(np.mean(result.test_acc)),
                "attribution_wall_s": a.wall_s, "train_wall_s": result.wall_s,
                "chosen": chosen}

    def summarize(self, cfg: Config, cases: list[Case], results: dict, wall_s: float) -> dict:
        sims = {c.key: c.spec for c in cases[:2]}
        t = results["tracked"]
        flipped = (sims["tracked"].data.y_train != sims["clean"].data.y_train).numpy()[t["ids"]]
        self.scores = (t, flipped)
        return summary_of(cfg, self.noisy_nodes, t, flipped, results)

    def tables(self, summary: dict, results: dict) -> list[Table]:
        t, flipped = self.scores
        dice = t["dice"]
        return [Table("scores.csv", SCORE_COLUMNS, [
                    (int(i), int(o), bool(f), float(v), float(lo), float(g), dice.get(int(i), ""))
                    for i, o, f, v, lo, g in zip(t["ids"], t["owner"], flipped, t["value"],
                                                 t["loss"], t["gnorm"], strict=True)]),
                Table("removal.csv", REMOVAL_COLUMNS,
                      [tuple(r.values()) for r in summary["removal"]])]

    def figures(self, out, cfg: Config, summary: dict, results: dict) -> list[str]:
        t, flipped = self.scores
        rows = [tuple(r.values()) for r in summary["removal"]]
        return plots(out, t["value"], t["loss"], t["gnorm"], flipped, rows,
                     summary["test_acc"]["clean"])

    def report(self, cfg: Config, summary: dict, pictures: list[str]) -> str:
        return report_md(summary, pictures)

    def closing(self, summary: dict, out) -> list[str]:
        return closing_lines(summary)


def summary_of(cfg: Config, noisy_nodes: list[int], t: dict, flipped: np.ndarray,
               results: dict) -> dict:
    c = cfg.cleansing
    ids, value, dice = t["ids"], t["value"], t["dice"]
    has_dice = np.array([int(i) in dice for i in ids])
    dice_score = np.array([dice.get(int(i), np.nan) for i in ids])
    auc = {"full_horizon": roc_auc(value, flipped), "train_loss": roc_auc(t["loss"], flipped),
           "grad_norm": roc_auc(t["gnorm"], flipped)}
    subset = {"n": int(has_dice.sum()), "flipped": int(flipped[has_dice].sum()),
              "dice_r_hop": roc_auc(dice_score[has_dice], flipped[has_dice]),
              "full_horizon": roc_auc(value[has_dice], flipped[has_dice])}
    noisy_acc, clean_acc = t["test_acc"], results["clean"]["test_acc"]
    cost = clean_acc - noisy_acc
    flipped_set = set(ids[flipped].tolist())
    removal_rows = [(0.0, "none", 0, 0, noisy_acc, 0.0)]
    for key, r in results.items():
        if key in ("tracked", "clean"):
            continue
        rec = (r["test_acc"] - noisy_acc) / cost if cost > 0 else None
        removal_rows.append((r["k"], r["method"], len(r["chosen"]),
                             sum(int(i) in flipped_set for i in r["chosen"]), r["test_acc"], rec))
    top5 = next((r for r in removal_rows if r[1] == "top" and abs(r[0] - 0.05) < 1e-9), None)
    rnd5 = next((r for r in removal_rows if r[1] == "random" and abs(r[0] - 0.05) < 1e-9), None)
    baseline_aucs = [v for key, v in auc.items() if key != "full_horizon" and v is not None]
    targets = {
        f"auc_ge_{c.min_auc}": bool(auc["full_horizon"] >= float(c.min_auc)),
        "auc_above_every_baseline": bool(all(auc["full_horizon"] > v for v in baseline_aucs)
                                         and (subset["dice_r_hop"] is None
                                              or subset["full_horizon"] > subset["dice_r_hop"])),
    }
    if top5 is not None and rnd5 is not None and top5[5] is not None:
        targets["top_5pct_recovers_half"] = bool(top5[5] >= 0.5)
        targets["random_5pct_does_not"] = bool(rnd5[5] < 0.5)
    return {
        "nodes": int(cfg.nodes), "steps": int(cfg.steps), "noisy_nodes": noisy_nodes,
        "flip": float(c.flip), "samples": int(len(ids)), "flipped": int(flipped.sum()),
        "auc": auc, "dice_subset": subset, "hops": int(c.hops),
        "diagnostics": diagnostics(t["quarters"], value, flipped, t["owner"], noisy_nodes),
        "test_acc": {"clean": clean_acc, "noisy": noisy_acc, "noise_cost": cost},
        "removal": [dict(zip(REMOVAL_COLUMNS, r, strict=True)) for r in removal_rows],
        "attribution_wall_s": t["attribution_wall_s"], "train_wall_s": t["train_wall_s"],
        "targets": targets,
    }


def run(session: Session) -> dict | None:
    return runner.run(session, CleansingTask())
