"""The per-task fold: what a map task keeps of its block's profiles, merged by the driver.

Memory does not grow with the store's tokens: usage sums take every sequence, the
committee audit one row per prompt, each sequence leaves its rows of the `sequences`
table, and whole profiles are kept only for a bounded set of sequences.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from analyzer import parts
from analyzer.metrics import usage as um
from analyzer.params import Params
from analyzer.profiles import BlockProfiles, SequenceProfile, profile_block
from analyzer.tables.committee import CommitteeRows
from analyzer.tables.common import frequencies


def sequence_stats(
    block: BlockProfiles, params: Params, compiled: bool = False
) -> dict[str, np.ndarray]:
    """Per sequence and layer of a block, (sequences, layers) each: load entropy, router
    confidence (NaN without logits), prompt-vs-rollout usage cosine and top-p Jaccard.

    `compiled`: the same statistics in one compiled pass (`kernels.usage_stats`), for
    processes that have loaded the compiled loops anyway (map tasks)."""
    if compiled:
        from analyzer.kernels import usage_stats

        usage = usage_stats(block.cumulative, block.prompt, params.top_p)
        return {"entropy": usage.pop("entropy"), "confidence": block.confidence, **usage}
    f_all = frequencies(block.cumulative)
    f_prompt = frequencies(block.prompt)
    f_gen = frequencies(block.cumulative - block.prompt)
    return {
        "entropy": um.load_entropy(f_all),
        "confidence": block.confidence,
        "prompt_vs_rollout_cosine": um.cosine(f_prompt, f_gen),
        "prompt_vs_rollout_jaccard": um.top_p_jaccard(f_prompt, f_gen, params.top_p),
    }


def _detach(p: SequenceProfile) -> SequenceProfile:
    """A copy owning its arrays: arrays that arrive from Ray are views of the whole task
    result, and keeping a view would keep all of it alive."""
    p.scope_counts = {k: v.copy() for k, v in p.scope_counts.items()}
    if p.checkpoints is not None:
        p.checkpoints = p.checkpoints.copy()
    for name in ("last_ids", "last_weights", "confidence"):
        if getattr(p, name) is not None:
            setattr(p, name, getattr(p, name).copy())
    if p.last_probs is not None:
        p.last_probs = p.last_probs.astype(np.float32)
    if p.pooled_hidden:
        p.pooled_hidden = {k: v.copy() for k, v in p.pooled_hidden.items()}
    return p


FOLD_PARTS = frozenset({"stats", "committee", "whole"})


class StoreFold:
    """One store's profiles folded into what the tables need, so that memory does not
    grow with the store's tokens: usage sums take every sequence, the committee audit
    one row per prompt (its last token), each sequence leaves its rows of the
    `sequences` table, and whole profiles are kept only for the `keep` set (pair
    statistics, rollout curves).

    Map tasks fold their block's profiles (`add`); the driver takes each task's table
    rows out (`pop_sequence_table`, written to disk as they come) and merges the rest
    (`merge`), so it never handles token rows, table rows or whole profiles it drops.

    `parts` (of `FOLD_PARTS`) says what is folded besides usage sums: ``stats`` (the
    `sequences` table), ``committee`` (each prompt's last-token routing) and ``whole``
    (whole profiles).
    """

    def __init__(
        self,
        store: str,
        params: Params,
        keep: set[int] | None = None,
        parts: frozenset[str] = FOLD_PARTS,
    ) -> None:
        unknown = set(parts) - FOLD_PARTS
        if unknown:
            raise ValueError(f"parts: unknown {sorted(unknown)}; expected some of {FOLD_PARTS}")
        self.store, self.params, self.keep, self.parts = store, params, keep, parts
        self.compiled = False  # per-sequence statistics by the compiled loop (map tasks)
        self.usage: np.ndarray | None = None
        self.ids: list[np.ndarray] = []  # (sequences, 4): sequence, prompt, sample, rows
        self.stats: list[dict[str, np.ndarray]] = []  # name -> (sequences, layers)
        self.profiles: list[SequenceProfile] = []
        self.committee = CommitteeRows()
        self.num_sequences = 0

    def add(self, block: BlockProfiles) -> None:
        """Fold one block's profiles."""
        if not len(block):
            return
        rows = block.sequences
        self.num_sequences += len(rows)
        self._add_usage(block.cumulative.sum(0, dtype=np.int64))
        if "stats" in self.parts:
            self._add_stats(block)
        if "whole" in self.parts:
            self.profiles.extend(
                block.profile(i)
                for i, r in enumerate(rows)
                if self.keep is None or r["sequence_id"] in self.keep
            )
        if "committee" in self.parts:
            self._add_committee(block)

    def _add_stats(self, block: BlockProfiles) -> None:
        rows = block.sequences
        self.ids.append(
            np.array(
                [
                    (r["sequence_id"], r["prompt_index"], r["sample_index"], r["num_rows"])
                    for r in rows
                ],
                dtype=np.int64,
            )
        )
        self.stats.append(sequence_stats(block, self.params, self.compiled))

    def _add_committee(self, block: BlockProfiles) -> None:
        rows = block.sequences
        domains = np.array([str(r["labels"].get("domain", "")) for r in rows])
        # one last prompt token per prompt, not per sample: the audit counts prompts
        labelled = np.array(
            ["domain" in r["labels"] and r.get("prompt_first", True) for r in rows], dtype=bool
        )
        labelled &= block.has_last
        for domain in np.unique(domains[labelled]):
            members = labelled & (domains == domain)
            probs = None if block.last_probs is None else block.last_probs[members]
            weights = None if block.last_weights is None else block.last_weights[members]
            self.committee.add(
                str(domain),
                block.last_ids[members],
                weights,
                None if probs is None or np.isnan(probs).any() else probs,
            )

    def merge(self, other: StoreFold) -> None:
        """Fold in another fold of the same store (a map task's result)."""
        if other.usage is not None:
            self._add_usage(other.usage)
        self.num_sequences += other.num_sequences
        self.ids.extend(ids.copy() for ids in other.ids)
        self.stats.extend({k: v.copy() for k, v in s.items()} for s in other.stats)
        self.profiles.extend(_detach(p) for p in other.profiles)
        self.committee.merge(other.committee)

    def _add_usage(self, counts_: np.ndarray) -> None:
        self.usage = counts_.copy() if self.usage is None else self.usage + counts_

    def whole(self) -> list[SequenceProfile]:
        """The profiles kept whole, by sequence id."""
        return sorted(self.profiles, key=lambda p: p.sequence_id)

    def pop_sequence_table(self) -> pl.DataFrame:
        """The `sequences` table rows folded so far (one per sequence and layer, by
        sequence), which the fold then forgets."""
        if not self.ids:
            return pl.DataFrame()
        ids = np.concatenate(self.ids)
        layers = self.stats[0]["entropy"].shape[1]
        table = pl.DataFrame(
            {
                "store": self.store,
                "sequence_id": np.repeat(ids[:, 0], layers),
                "prompt_index": np.repeat(ids[:, 1], layers),
                "sample_index": np.repeat(ids[:, 2], layers),
                "layer": np.tile(np.arange(layers), len(ids)),
                "rows": np.repeat(ids[:, 3], layers),
                **{
                    name: np.concatenate([s[name] for s in self.stats]).ravel().astype(np.float64)
                    for name in self.stats[0]
                },
            }
        )
        self.ids, self.stats = [], []
        return table.with_columns(pl.col("confidence").fill_nan(None)).sort("sequence_id", "layer")


def fold_block(
    url: str,
    start: int,
    stop: int,
    sequences: list[dict],
    arrays: tuple[str, ...],
    fold: StoreFold,
    created_at: float | None = None,
) -> tuple[StoreFold, bytes]:
    """Map task: profile one block and fold its profiles into the empty `fold`, keeping
    whole only the sequences marked ``keep``, so that a task returns a few KB per
    sequence whatever the block's size. Returns the fold and the block's rows of the
    `sequences` table as parquet (encoded here, in parallel, rather than by the driver)."""
    fold.keep = {row["sequence_id"] for row in sequences if row["keep"]}
    fold.compiled = True  # profiling loads the compiled loops: statistics use them too
    fold.add(profile_block(url, start, stop, sequences, arrays, created_at))
    return fold, parts.encode(fold.pop_sequence_table())
