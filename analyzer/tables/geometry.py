"""Router-input geometry against routing (paper (a) A8-A11), for layers whose hidden
states were captured. Pure: the pipeline reads the sample rows (`sample_rows`)."""

from __future__ import annotations

import numpy as np
import polars as pl

from analyzer.metrics import bootstrap as bs
from analyzer.metrics import geometry as gm
from analyzer.metrics import usage as um
from analyzer.params import Params
from analyzer.profiles import SequenceProfile
from analyzer.tables.common import frequencies, sample_pairs
from capture_server import protocol
from capture_server.capture.records import ModelSummary


def geometry_tables(
    sample: dict[str, np.ndarray],
    router_weights: np.ndarray,
    store: str,
    profiles: list[SequenceProfile],
    params: Params,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Paper (a) A8-A11 per MoE layer with captured router inputs: (summary, triangle).

    `sample` holds the store's first rows (`reads.geometry_sample`): ``topk_ids``,
    ``token_ids``, ``router_logits`` when stored, and the ``hidden_states_<layer>``
    arrays; `router_weights` is (layers, experts, hidden). A8 compares pooled router
    inputs of sequence pairs with their usage similarity (the correlation across
    pairs, with a 95% interval from resampling prompts); A9-A11 use the sample rows.
    The triangle table holds sampled (hidden distance, logit distance) pairs.
    """
    hidden = hidden_arrays(sample)
    if not hidden:
        return pl.DataFrame(), pl.DataFrame()
    weights, n = router_weights, len(sample[protocol.TOPK_IDS])
    same_token = gm.same_token_overlap(sample[protocol.TOKEN_IDS], sample[protocol.TOPK_IDS])
    rng = np.random.default_rng(params.seed)
    pairs = sample_pairs(len(profiles), min(params.max_pairs, 2000), rng)
    out, triangle_rows = [], []
    for layer, name in hidden:
        h = sample[name].astype(np.float64)
        if protocol.ROUTER_LOGITS in sample:
            z = sample[protocol.ROUTER_LOGITS][:, layer].astype(np.float64)
        else:  # the router is linear: its logits follow from its input and weights
            z = h @ weights[layer].T.astype(np.float64)
        lip = gm.lipschitz_ratio(h[:256], z[:256], weights[layer])
        energy = gm.shared_direction(h, weights[layer])
        dh, dz = gm.triangle(h[:256], z[:256])
        slope = float((dz / np.maximum(dh, 1e-12)).max()) if len(dh) else 0.0
        keep = rng.choice(len(dh), min(len(dh), 3000), replace=False)
        triangle_rows.append(
            pl.DataFrame(
                {
                    "store": store,
                    "layer": layer,
                    "hidden_distance": dh[keep],
                    "logit_distance": dz[keep],
                }
            )
        )
        pooled, usage_cos, units = [], [], []
        mean = np.mean([p.pooled_hidden[layer] for p in profiles if p.pooled_hidden], axis=0)
        for i, j in pairs:
            a, b = profiles[i], profiles[j]
            if a.pooled_hidden and b.pooled_hidden:
                ha = a.pooled_hidden[layer][None]
                hb = b.pooled_hidden[layer][None]
                pooled.append(gm.pooled_similarity(ha, hb, mean))
                fa = frequencies(a.scope_counts[params.scope][layer].astype(np.float64))
                fb = frequencies(b.scope_counts[params.scope][layer].astype(np.float64))
                usage_cos.append(float(um.cosine(fa, fb)))
                units.append((a.prompt_index, b.prompt_index))
        corr, lo, hi = _correlation(np.ravel(pooled), np.array(usage_cos), units, rng)
        out.append(
            {
                "store": store,
                "layer": layer,
                "tokens": n,
                "lipschitz_empirical": lip["empirical"],
                "router_operator_norm": lip["operator_norm"],
                "lipschitz_fraction": lip["fraction"],
                "triangle_max_slope": slope,
                "hidden_energy_v1": energy["hidden_energy"],
                "router_energy_v1": energy["router_energy"],
                "retained_logit_energy": energy["retained_logit_energy"],
                "same_token_overlap": float(same_token[layer]),
                "pooled_vs_usage_corr": corr,
                "pooled_vs_usage_corr_lo": lo,
                "pooled_vs_usage_corr_hi": hi,
                "pairs": len(pooled),
            }
        )
    return pl.DataFrame(out), pl.concat(triangle_rows)


def _correlation(
    x: np.ndarray, y: np.ndarray, units: list[tuple[int, int]], rng: np.random.Generator
) -> tuple[float, float, float]:
    """Correlation across pairs and its 95% interval, resampling the prompts the pairs'
    sequences came from; NaN with fewer than three pairs."""
    if len(x) < 3:
        return float("nan"), float("nan"), float("nan")
    index = {p: n for n, p in enumerate(dict.fromkeys(p for pair in units for p in pair))}
    ua, ub = (np.array([index[pair[side]] for pair in units]) for side in (0, 1))
    drawn = bs.unit_multiplicities(len(index), bs.REPLICATES, rng)
    lo, hi = bs.interval(bs.weighted_correlations(x, y, bs.pair_weights(drawn, ua, ub)))
    return float(np.corrcoef(x, y)[0, 1]), float(lo), float(hi)


def direction_ablation_table(
    sample: dict[str, np.ndarray],
    router: dict[str, np.ndarray],
    model: ModelSummary,
    store: str,
    params: Params,
) -> pl.DataFrame:
    """Paper (a) E-a3 per MoE layer with captured router inputs: one row per number of
    top singular directions removed (`Params.ablation_directions`).

    `router` is the store's `router_weights()`. ``captured_agreement`` is the share of
    sample tokens whose captured expert set the offline re-routing of the unchanged
    inputs reproduces: below 1 where stored inputs were rounded (float16) or the model
    routes in a way `reroute` does not model (group-limited selection).
    """
    rows = []
    for layer, name in hidden_arrays(sample):
        h = sample[name].astype(np.float64)
        w = router["router_weights"][layer].astype(np.float64)
        bias, correction = (
            router[key][layer] if key in router else None
            for key in ("router_bias", "correction_bias")
        )
        usable = tuple(k for k in params.ablation_directions if k <= min(h.shape))
        for row in gm.direction_ablation(
            h,
            w,
            model.top_k,
            usable,
            model.scoring_func,
            bias,
            correction,
            top_p=params.top_p,
            captured=sample[protocol.TOPK_IDS][:, layer].astype(np.int64),
        ):
            rows.append({"store": store, "layer": layer, "tokens": len(h), **row})
    return pl.DataFrame(rows)


def hidden_arrays(sample: dict[str, np.ndarray]) -> list[tuple[int, str]]:
    """(MoE layer, array name) of the captured router inputs in `sample`, by layer."""
    layers = ((protocol.hidden_layer_of(name), name) for name in sample)
    return sorted((layer, name) for layer, name in layers if layer is not None)
