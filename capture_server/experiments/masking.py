"""Committee masking (CommitteeAudit, Table 6/13) and usage pruning ("Myth", Fig. 8), each
against the unchanged model and matched random controls, in one engine call.

Every condition (baseline, treatment, each control seed) scores the same texts; all of
them go to the engine together, one request per (condition, text), so continuous
batching runs the conditions side by side. The NLL change of a condition is the
paper's NLL_condition / NLL_baseline − 1, with NLL the mean over a part's tokens of all
texts; its 95% interval comes from a bootstrap over texts (`REPLICATES`). Random
controls pool their seeds per text before the ratio.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from capture_server.capture.intervention import Intervention, InterventionError

REPLICATES = 1000
"""Bootstrap resamples of the texts (or items) behind each interval."""

NEAREST = 2
"""A control expert is drawn among this many unused non-members nearest in usage to the
member it stands for."""


@dataclass(frozen=True, slots=True)
class ChoiceItem:
    """A multiple-choice item: the option with the highest log-likelihood is the answer."""

    prompt: str
    options: tuple[str, ...]
    answer: int


@dataclass(frozen=True, slots=True)
class Condition:
    """One arm of an experiment: every text is scored under its intervention."""

    condition: str  # baseline, committee, random, most_used
    intervention: Intervention
    layer: int = -1  # the masked MoE layer (committee masking)
    depth: int = 0  # last-k layers pruned (pruning)
    seed: int = -1  # control seed

    def to_dict(self) -> dict[str, Any]:
        return {
            "condition": self.condition,
            "intervention": self.intervention.to_dict(),
            "layer": self.layer,
            "depth": self.depth,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Condition:
        return cls(**{**d, "intervention": Intervention.from_dict(d["intervention"])})


def matched_controls(
    members: Sequence[int], usage: np.ndarray, seeds: int, *, first_seed: int = 0
) -> list[tuple[int, ...]]:
    """For each seed, as many non-member experts as `members`, each drawn among the
    `NEAREST` unused non-members whose usage is closest to its member's.

    `usage` is one layer's per-expert usage (counts or shares). Members are matched in
    order of decreasing usage, so the most used get the closest stand-ins.
    """
    members = list(members)
    others = [e for e in range(len(usage)) if e not in members]
    if len(others) < len(members):
        raise InterventionError(
            f"controls: {len(members)} members leave only {len(others)} other experts"
        )
    draws = []
    for seed in range(first_seed, first_seed + seeds):
        rng = np.random.default_rng(seed)
        free, chosen = list(others), []
        for m in sorted(members, key=lambda e: -usage[e]):
            near = sorted(free, key=lambda e: (abs(usage[e] - usage[m]), e))[:NEAREST]
            pick = int(near[rng.integers(len(near))])
            free.remove(pick)
            chosen.append(pick)
        draws.append(tuple(sorted(chosen)))
    return draws


def committee_masking(
    engine: Any,
    texts: Sequence[tuple[str, str]],
    committee: dict[int, Sequence[int]],
    usage: np.ndarray,
    *,
    kind: str = "zero",
    seeds: int = 3,
    items: Sequence[ChoiceItem] = (),
) -> pl.DataFrame:
    """Remove the committee at one MoE layer at a time, against matched random controls.

    Args:
        engine: a `CaptureEngine` started with interventions.
        texts: (prompt, completion) pairs scored under every condition.
        committee: MoE layer -> committee members (`committee_from_analysis`).
        usage: (layers, experts) usage, to match the controls (`usage_from_analysis`).
        kind: ``zero`` (CommitteeAudit: zero their weights, renormalise the rest) or
            ``mask`` (they cannot be selected; top-k re-runs over the rest).
        seeds: random control draws per layer.
        items: multiple-choice items; adds option log-likelihood accuracy.

    Returns:
        One row per (layer, condition, part) with the mean NLL (or accuracy), its change
        against the baseline and the change's 95% interval (`_table`).
    """
    conditions = committee_conditions(committee, usage, kind=kind, seeds=seeds)
    return _table("committee_masking", engine, texts, conditions, items)


def committee_conditions(
    committee: dict[int, Sequence[int]], usage: np.ndarray, *, kind: str, seeds: int
) -> list[Condition]:
    """Baseline, then per layer the committee and its matched controls (`committee_masking`)."""
    if kind not in ("zero", "mask"):
        raise InterventionError(f"kind: expected 'zero' or 'mask', got {kind!r}")
    conditions = [Condition("baseline", Intervention())]
    for layer, members in sorted(committee.items()):
        if not 0 <= layer < len(usage):
            raise InterventionError(f"committee: MoE layer {layer} is not in the usage")
        conditions.append(
            Condition("committee", Intervention.from_dict({kind: {layer: members}}), layer)
        )
        for seed, draw in enumerate(matched_controls(members, usage[layer], seeds)):
            change = Intervention.from_dict({kind: {layer: draw}})
            conditions.append(Condition("random", change, layer, seed=seed))
    return conditions


def pruning_sweep(
    engine: Any,
    texts: Sequence[tuple[str, str]],
    usage: np.ndarray,
    *,
    keep: int,
    depths: Sequence[int],
    seeds: int = 3,
    items: Sequence[ChoiceItem] = (),
) -> pl.DataFrame:
    """Keep only the `keep` most-used experts in the last k MoE layers, for k in
    `depths` ("Myth" Fig. 8: 12 of 32 in gpt-oss-20b), against keeping `keep` experts
    drawn uniformly at random in the same layers (one draw per seed and layer).

    `usage` is (layers, experts), for example `usage_of_text` of one paragraph as in
    the paper. Rows as `committee_masking`, with ``depth`` set instead of ``layer``.
    """
    conditions = pruning_conditions(usage, keep=keep, depths=depths, seeds=seeds)
    return _table("pruning", engine, texts, conditions, items)


def pruning_conditions(
    usage: np.ndarray, *, keep: int, depths: Sequence[int], seeds: int
) -> list[Condition]:
    """Baseline, then per depth the most-used kept sets and random ones (`pruning_sweep`)."""
    num_layers, num_experts = usage.shape
    if not 0 < keep <= num_experts:
        raise InterventionError(f"keep: expected 1..{num_experts} experts, got {keep}")
    conditions = [Condition("baseline", Intervention())]
    for depth in depths:
        if not 0 < depth <= num_layers:
            raise InterventionError(f"depths: {depth} is not in 1..{num_layers}")
        layers = range(num_layers - depth, num_layers)
        top = {
            layer: sorted(np.argsort(-usage[layer], kind="stable")[:keep].tolist())
            for layer in layers
        }
        conditions.append(
            Condition("most_used", Intervention.from_dict({"keep": top}), depth=depth)
        )
        for seed in range(seeds):
            rng = np.random.default_rng([seed, depth])
            drawn = {
                layer: sorted(rng.choice(num_experts, keep, replace=False).tolist())
                for layer in layers
            }
            change = Intervention.from_dict({"keep": drawn})
            conditions.append(Condition("random", change, depth=depth, seed=seed))
    return conditions


def _table(
    experiment: str,
    engine: Any,
    texts: Sequence[tuple[str, str]],
    conditions: list[Condition],
    items: Sequence[ChoiceItem],
) -> pl.DataFrame:
    """Score every condition in one engine call and compare each with the baseline."""
    if not texts:
        raise InterventionError("texts: at least one (prompt, completion) pair is needed")
    sums, tokens = _nll_sums(engine, texts, conditions)  # (conditions, texts, part)
    choices = _choices(engine, items, conditions) if items else None  # (conditions, items)
    return tabulate(experiment, conditions, sums, tokens, choices)


def tabulate(
    experiment: str,
    conditions: list[Condition],
    sums: np.ndarray,
    tokens: np.ndarray,
    choices: np.ndarray | None,
) -> pl.DataFrame:
    """The experiment's table from its scores: `sums` (conditions, texts, 2) summed NLL
    of prompt and completion tokens, `tokens` (texts, 2) how many tokens each sum is
    over, `choices` (conditions, items) 1 where the choice was right (or None)."""
    texts = sums.shape[1]
    rows = []
    for group in _groups(conditions):
        first = conditions[group[0]]
        common = {
            "experiment": experiment,
            "layer": first.layer,
            "depth": first.depth,
            "condition": first.condition,
            "seeds": len(group) if first.seed >= 0 else 0,
        }
        for p, part in enumerate(("prompt", "completion")):
            count = max(int(tokens[:, p].sum()), 1)
            # seeds pooled per text; the part's NLL is its token mean over all texts
            compared = _compare(
                sums[group, :, p].mean(axis=0),
                sums[0, :, p],
                lambda x, c=count: x.sum(axis=-1) / c,
                relative=True,
            )
            rows.append({**common, "part": part, **compared, "units": texts})
        if choices is not None:
            compared = _compare(
                choices[group].mean(axis=0),
                choices[0],
                lambda x: x.mean(axis=-1),
                relative=False,
            )
            units = choices.shape[1]
            rows.append({**common, "part": "choice_accuracy", **compared, "units": units})
    return pl.DataFrame(rows)


def _groups(conditions: list[Condition]) -> list[list[int]]:
    """Condition indices reported together: control seeds of one layer or depth pool."""
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(conditions):
        groups.setdefault((c.condition, c.layer, c.depth), []).append(i)
    return list(groups.values())


def _nll_sums(
    engine: Any, texts: Sequence[tuple[str, str]], conditions: list[Condition]
) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL of each text's prompt and completion tokens, (conditions, texts, 2),
    and how many tokens each sum is over, (texts, 2) (a prompt's first token has none)."""
    prompts = [p for _ in conditions for p, _ in texts]
    completions = [c for _ in conditions for _, c in texts]
    per_request = [c.intervention for c in conditions for _ in texts]
    result = engine.score(prompts, completions, intervention=per_request)
    sums = np.zeros((len(conditions), len(texts), 2))
    tokens = np.zeros((len(texts), 2), dtype=np.int64)
    for i, seq in enumerate(result.sequences):
        plen = len(seq.prompt_token_ids)
        assert seq.nll is not None
        sums[i // len(texts), i % len(texts)] = (np.sum(seq.nll[1:plen]), np.sum(seq.nll[plen:]))
        tokens[i % len(texts)] = (max(plen - 1, 0), len(seq.nll) - plen)
    return sums, tokens


def _choices(engine: Any, items: Sequence[ChoiceItem], conditions: list[Condition]) -> np.ndarray:
    """(conditions, items): 1 where the option of highest log-likelihood is the answer."""
    pairs = [(item.prompt, option) for item in items for option in item.options]
    per_request = [c.intervention for c in conditions for _ in pairs]
    result = engine.score(
        [p for _ in conditions for p, _ in pairs],
        [o for _ in conditions for _, o in pairs],
        intervention=per_request,
    )
    loglik = np.array(
        [-np.sum(s.nll[len(s.prompt_token_ids) :]) for s in result.sequences]  # type: ignore[index]
    ).reshape(len(conditions), len(pairs))
    return choice_correct(loglik, items)


def choice_correct(loglik: np.ndarray, items: Sequence[ChoiceItem]) -> np.ndarray:
    """(conditions, items): 1 where the option of highest log-likelihood is the answer;
    `loglik` is (conditions, options of all items in order)."""
    correct = np.zeros((len(loglik), len(items)))
    start = 0
    for j, item in enumerate(items):
        chosen = loglik[:, start : start + len(item.options)].argmax(axis=1)
        correct[:, j] = chosen == item.answer
        start += len(item.options)
    return correct


def _compare(
    treated: np.ndarray, base: np.ndarray, stat: Callable[[np.ndarray], Any], *, relative: bool
) -> dict[str, float]:
    """`stat` of the per-unit values (texts or items) under the condition and the
    baseline, and the change: stat / baseline stat − 1 (NLL) or the difference
    (accuracy), with a 95% interval from `REPLICATES` resamples of the units."""

    def change(t: Any, b: Any) -> Any:
        return t / np.maximum(b, 1e-12) - 1 if relative else t - b

    picks = np.random.default_rng(0).integers(0, len(base), size=(REPLICATES, len(base)))
    lo, hi = np.percentile(change(stat(treated[picks]), stat(base[picks])), [2.5, 97.5])
    value, baseline = float(stat(treated)), float(stat(base))
    return {
        "value": value,
        "baseline": baseline,
        "change": float(change(value, baseline)),
        "change_lo": float(lo),
        "change_hi": float(hi),
    }


def usage_of_text(engine: Any, text: str) -> np.ndarray:
    """(layers, experts) top-k selections while reading `text` ("Myth": usage from one
    hand-written paragraph)."""
    seq = engine.score([text], [""]).sequences[0]
    return selection_counts(seq.rows.topk_ids, engine.routing["num_experts"])


def selection_counts(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """(layers, experts) how often each expert was selected in top-k ids (tokens,
    layers, k)."""
    return np.stack(
        [np.bincount(ids[:, layer].ravel(), minlength=num_experts) for layer in range(ids.shape[1])]
    )


def _analysis_table(out_dir: str | Path, table: str, store: str | None) -> pl.DataFrame:
    path = Path(out_dir) / f"{table}.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no {table} table; run the analyzer first")
    frame = pl.read_parquet(path)
    stores = frame["store"].unique().to_list()
    if store is None and len(stores) == 1:
        store = stores[0]
    if store not in stores:
        raise InterventionError(f"store: expected one of {sorted(stores)}, got {store!r}")
    return frame.filter(pl.col("store") == store)


def committee_from_analysis(out_dir: str | Path, store: str | None = None) -> dict[int, list[int]]:
    """MoE layer -> standing committee, from the analyzer's ``committee`` table (its
    per-layer rows; the row of means over layers has no members)."""
    frame = _analysis_table(out_dir, "committee", store).filter(pl.col("layer") >= 0)
    return {int(r["layer"]): list(r["members"]) for r in frame.iter_rows(named=True)}


def usage_from_analysis(out_dir: str | Path, store: str | None = None) -> np.ndarray:
    """(layers, experts) usage shares, from the analyzer's ``usage`` table."""
    frame = _analysis_table(out_dir, "usage", store).sort("layer", "expert")
    layers = int(frame["layer"].max()) + 1
    return frame["share"].to_numpy().reshape(layers, -1)
