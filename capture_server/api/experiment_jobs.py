"""Experiment jobs: an intervention experiment (`capture_server.experiments`) run as a
score job.

When the job is made, its experiment is expanded into one scored prompt per (condition,
text) and per (condition, item option), each carrying its condition's intervention and
labels naming it. The score-job machinery then runs them in shared batches, resumes
them after a restart, and keeps in the job's store the routing that ran under each
condition together with each text's per-token NLL. When the job ends, its table is
computed from the store's index (`result_table`) and kept beside the jobs database.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from capture_server.api.schemas import JobCreate, PromptItem
from capture_server.capture.intervention import InterventionError, check_for_engine
from capture_server.experiments.masking import (
    ChoiceItem,
    Condition,
    choice_correct,
    committee_conditions,
    pruning_conditions,
    selection_counts,
    tabulate,
)


def expand(
    job: JobCreate, prompts: list[PromptItem], routing: dict[str, Any], usage: np.ndarray
) -> JobCreate:
    """The job with its experiment's conditions and one prompt per scored text.

    Raises `InterventionError` (naming the ``experiment`` field) when a condition cannot
    run on the engine whose routing facts are `routing`.
    """
    spec = job.experiment
    assert spec is not None
    shape = (routing["num_layers"], routing["num_experts"])
    if usage.shape != shape:
        raise InterventionError(
            f"experiment.usage: expected {shape} (MoE layers, experts), got {usage.shape}"
        )
    if spec.name == "committee_masking":
        committee = {int(layer): members for layer, members in (spec.committee or {}).items()}
        conditions = committee_conditions(committee, usage, kind=spec.kind, seeds=spec.seeds)
    else:
        assert spec.keep is not None
        conditions = pruning_conditions(usage, keep=spec.keep, depths=spec.depths, seeds=spec.seeds)
    for condition in {c.intervention.key(): c for c in conditions}.values():
        try:
            check_for_engine(condition.intervention, routing)
        except InterventionError as exc:
            raise InterventionError(f"experiment ({condition.condition}): {exc}") from None
    expanded = []
    for c, condition in enumerate(conditions):
        change = condition.intervention.to_dict() or None
        for t, item in enumerate(prompts):
            labels = {"condition": c, "text": t}
            expanded.append(
                PromptItem(
                    prompt=item.prompt,
                    completion=item.completion,
                    intervention=change,
                    labels=labels,
                )
            )
        for m, choice in enumerate(spec.items):
            for j, option in enumerate(choice.options):
                labels = {"condition": c, "item": m, "option": j}
                expanded.append(
                    PromptItem(
                        prompt=choice.prompt, completion=option, intervention=change, labels=labels
                    )
                )
    filled = spec.model_copy(
        update={"conditions": [c.to_dict() for c in conditions], "texts": len(prompts)}
    )
    return job.model_copy(update={"prompts": expanded, "prompts_file": None, "experiment": filled})


def usage_of_store(url: str, block: int = 1 << 16) -> np.ndarray:
    """(MoE layers, experts) selection counts over every row of a store, read in blocks
    of top-k ids."""
    from capture_server.errors import StoreError
    from capture_server.store import open_store

    try:
        store = open_store(url)
    except StoreError as exc:
        raise InterventionError(f"experiment.usage_job: no readable store ({exc})") from None
    layers, experts = len(store.model.moe_layers), store.model.num_experts
    counts = np.zeros((layers, experts), dtype=np.float64)
    for start in range(0, store.num_tokens, block):
        ids = store.read_rows(start, min(start + block, store.num_tokens), ("topk_ids",))
        counts += selection_counts(ids["topk_ids"], experts)
    for start, rows in store.shared_prefixes():  # stored once, counted per sample
        ids = store.read_rows(start, start + rows, ("topk_ids",))
        counts += selection_counts(ids["topk_ids"], experts)
    if not counts.any():
        raise InterventionError("experiment.usage_job: its store has no rows")
    return counts


def result_table(job: JobCreate, index: pl.DataFrame) -> pl.DataFrame:
    """The experiment's table (`experiments.masking.tabulate`) from the index of its
    store: each scored text's NLL, found by its labels."""
    spec = job.experiment
    assert spec is not None and spec.conditions is not None
    conditions = [Condition.from_dict(d) for d in spec.conditions]
    items = [ChoiceItem(i.prompt, tuple(i.options), i.answer) for i in spec.items]
    offsets = np.cumsum([0] + [len(i.options) for i in items])
    sums = np.full((len(conditions), spec.texts, 2), np.nan)
    tokens = np.zeros((spec.texts, 2), dtype=np.int64)
    loglik = np.full((len(conditions), int(offsets[-1])), np.nan)
    for row in index.iter_rows(named=True):
        prompt_nll, completion_nll = row.get("prompt_nll"), row.get("completion_nll")
        if prompt_nll is None or completion_nll is None:
            continue
        c = int(row["label_condition"])
        if row.get("label_text") is not None:
            t = int(row["label_text"])
            sums[c, t] = (sum(x for x in prompt_nll[1:] if x is not None), sum(completion_nll))
            tokens[t] = (len(prompt_nll) - 1, len(completion_nll))
        else:
            loglik[c, offsets[int(row["label_item"])] + int(row["label_option"])] = -sum(
                completion_nll
            )
    missing = int(np.isnan(sums[..., 0]).sum() + np.isnan(loglik).sum())
    if missing:
        raise ValueError(f"experiment: {missing} scored texts are missing from the job's store")
    choices = choice_correct(loglik, items) if items else None
    return tabulate(spec.name, conditions, sums, tokens, choices)


def result_path(data_dir: Path, job_id: str) -> Path:
    """Where an experiment job's table is kept."""
    return data_dir / "results" / f"{job_id}.parquet"
