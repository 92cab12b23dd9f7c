"""Plots in the spirit of the papers' figures, and a self-contained HTML report (images
inlined, so the one file opens offline; the parquet tables it links sit beside it)."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_usage_heatmaps(usage: pl.DataFrame, out: Path) -> list[Path]:
    paths = []
    for store in usage["store"].unique().sort().to_list():
        u = usage.filter(pl.col("store") == store)
        layers, experts = u["layer"].max() + 1, u["expert"].max() + 1
        grid = np.zeros((layers, experts))
        grid[u["layer"].to_numpy(), u["expert"].to_numpy()] = u["share"].to_numpy()
        fig, ax = plt.subplots(figsize=(max(4, experts * 0.25), max(2.5, layers * 0.3)))
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set(xlabel="expert", ylabel="MoE layer", title=f"{store}: share of top-k slots")
        ax.set_yticks(range(layers))
        ax.xaxis.get_major_locator().set_params(integer=True)
        fig.colorbar(im, ax=ax)
        paths.append(_save(fig, out / f"usage_{store}.png"))
    return paths


def plot_rollout_curves(curve: pl.DataFrame, out: Path) -> list[Path]:
    paths = []
    for store in curve["store"].unique().sort().to_list():
        c = curve.filter((pl.col("store") == store) & (pl.col("scope") == "cumulative"))
        layers = sorted(c["layer"].unique().to_list())
        fig, axes = plt.subplots(
            1, len(layers), figsize=(3.2 * len(layers), 3), sharey=True, squeeze=False
        )
        for ax, layer in zip(axes[0], layers, strict=True):
            for relation in sorted(c["relation"].unique().to_list()):
                s = c.filter((pl.col("layer") == layer) & (pl.col("relation") == relation))
                s = s.sort("rollout_tokens")
                line = ax.plot(s["rollout_tokens"], s["cosine"], marker="o", label=relation)
                if "cosine_lo" in s.columns:  # 95% interval, resampling prompts
                    band = (s["cosine_lo"], s["cosine_hi"])
                    ax.fill_between(
                        s["rollout_tokens"], *band, color=line[0].get_color(), alpha=0.15
                    )
            ax.axvline(0, color="gray", linestyle="--", label="prompt boundary")
            ax.set_xscale("symlog", linthresh=4)
            ax.set(title=f"layer {layer}", xlabel="rollout tokens", xlim=(0, None))
        axes[0][0].set_ylabel("usage cosine (prompt + rollout)")
        axes[0][-1].legend(fontsize=7)
        paths.append(_save(fig, out / f"rollout_{store}.png"))
    return paths


def plot_conditions(cond: pl.DataFrame, out: Path) -> list[Path]:
    paths = []
    for store in cond["store"].unique().sort().to_list():
        c = cond.filter((pl.col("store") == store) & (pl.col("layer") >= 0))
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for (baseline, condition), s in c.group_by(["baseline", "condition"], maintain_order=True):
            s = s.sort("layer")
            style = "-" if baseline == "observed" else ":"
            line = ax.plot(
                s["layer"], s["jaccard"], style, marker="o", label=f"{condition} ({baseline})"
            )
            if "jaccard_lo" in s.columns:  # 95% interval, resampling questions
                band = (s["jaccard_lo"], s["jaccard_hi"])
                ax.fill_between(s["layer"], *band, color=line[0].get_color(), alpha=0.15)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set(
            xlabel="MoE layer",
            ylabel="top-p Jaccard (P=0.8)",
            title=f"{store}: expert overlap by condition",
        )
        ax.legend(fontsize=6)
        paths.append(_save(fig, out / f"conditions_{store}.png"))
    return paths


def plot_committee(com: pl.DataFrame, out: Path) -> list[Path]:
    """Coverage per layer with its 95% interval and random-routing level; the influence
    density ratio on the right axis."""
    paths = []
    for store in com["store"].unique().sort().to_list():
        c = com.filter((pl.col("store") == store) & (pl.col("layer") >= 0)).sort("layer")
        fig, ax = plt.subplots(figsize=(6, 3))
        layers, coverage = c["layer"].to_numpy(), c["coverage"].to_numpy()
        err = None
        if "coverage_lo" in c.columns:
            err = [coverage - c["coverage_lo"].to_numpy(), c["coverage_hi"].to_numpy() - coverage]
        ax.bar(layers, coverage, yerr=err, capsize=3, color="tab:blue", label="coverage")
        if "coverage_random_routing" in c.columns:
            ax.plot(
                layers,
                c["coverage_random_routing"],
                "k_",
                markersize=14,
                label="coverage, random routing",
            )
        ax.set(xlabel="MoE layer", ylabel="committee coverage", ylim=(0, 1))
        ax.set_xticks(layers)
        ax2 = ax.twinx()
        ax2.plot(layers, c["ratio"], color="tab:red", marker="o", label="ratio")
        ax2.set_ylabel("influence density ratio (x)")
        ax.set_title(f"{store}: standing committee (95% intervals, resampling prompts)")
        ax.legend(fontsize=7, loc="upper left")
        paths.append(_save(fig, out / f"committee_{store}.png"))
    return paths


def plot_triangle(tri: pl.DataFrame, out: Path) -> list[Path]:
    paths = []
    for store in tri["store"].unique().sort().to_list():
        t = tri.filter(pl.col("store") == store)
        layers = sorted(t["layer"].unique().to_list())
        fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3), squeeze=False)
        for ax, layer in zip(axes[0], layers, strict=True):
            s = t.filter(pl.col("layer") == layer)
            ax.scatter(s["hidden_distance"], s["logit_distance"], s=3, alpha=0.4)
            ax.set(title=f"MoE layer {layer}", xlabel="hidden RMS distance")
        axes[0][0].set_ylabel("router-logit RMS distance")
        paths.append(_save(fig, out / f"triangle_{store}.png"))
    return paths


def plot_direction_ablation(frame: pl.DataFrame, out: Path) -> list[Path]:
    """E-a3: how much routing changes as top singular directions of its input go."""
    paths = []
    for store in frame["store"].unique().sort().to_list():
        s = frame.filter(pl.col("store") == store)
        fig, axes = plt.subplots(1, 2, figsize=(8, 3))
        for layer in sorted(s["layer"].unique().to_list()):
            c = s.filter(pl.col("layer") == layer).sort("directions")
            axes[0].plot(c["directions"], c["token_overlap"], marker="o", label=f"layer {layer}")
            axes[1].plot(c["directions"], c["usage_cosine"], marker="o", label=f"layer {layer}")
        axes[0].set(xlabel="top singular directions removed", ylabel="top-k overlap per token")
        axes[1].set(xlabel="top singular directions removed", ylabel="usage cosine")
        axes[1].legend(fontsize=7)
        fig.suptitle(f"{store}: direction ablation")
        paths.append(_save(fig, out / f"direction_ablation_{store}.png"))
    return paths


def _img(path: Path) -> str:
    """An image inlined as a data URI, so that the report is one file that opens offline."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}">'


def _table_html(frame: pl.DataFrame, rows: int, limit: int = 30) -> str:
    """The first `limit` rows of a table of `rows` rows."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    body = []
    for row in frame.head(limit).iter_rows():
        cells = []
        for v in row:
            text = f"{v:.4g}" if isinstance(v, float) else str(v)
            cells.append(f"<td>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    more = f"<p>{rows - limit} more rows in the parquet file.</p>" if rows > limit else ""
    return f"<table><tr>{head}</tr>{''.join(body)}</table>{more}"


def _findings_section(path: Path | None) -> list[str]:
    """The papers' claims first: measured value, interval, chance, published, verdict."""
    if path is None:
        return []
    frame = pl.read_parquet(path).drop("rule")
    numbers = ["measured", "lo", "hi", "chance", "published"]
    frame = frame.with_columns(pl.col(numbers).cast(pl.Float64).round(3))
    return [
        '<h2 id="findings">Findings</h2>',
        "<p>Each claim of the two papers, in their words, with what these stores measure "
        "(95% intervals from resampling the sampled unit: questions, or prompts). The "
        "verdict rules are in "
        f'<a href="{path.name}">{path.name}</a> (column <code>rule</code>).</p>',
        _table_html(frame, len(frame)),
    ]


def plot_interventions(frame: pl.DataFrame, out: Path) -> list[Path]:
    """NLL change (and choice accuracy change) per layer or depth: the intervention
    against its random controls, with 95% intervals."""
    paths = []
    for experiment in frame["experiment"].unique().sort().to_list():
        e = frame.filter((pl.col("experiment") == experiment) & (pl.col("condition") != "baseline"))
        axis = "layer" if experiment == "committee_masking" else "depth"
        parts = e["part"].unique().sort().to_list()
        fig, axes = plt.subplots(1, len(parts), figsize=(3.6 * len(parts), 3), squeeze=False)
        for ax, part in zip(axes[0], parts, strict=True):
            conditions = e.filter(pl.col("part") == part)["condition"].unique().sort().to_list()
            for offset, condition in enumerate(conditions):
                c = e.filter((pl.col("part") == part) & (pl.col("condition") == condition))
                c = c.sort(axis)
                x = c[axis].to_numpy() + 0.12 * (offset - (len(conditions) - 1) / 2)
                y = c["change"].to_numpy()
                err = [y - c["change_lo"].to_numpy(), c["change_hi"].to_numpy() - y]
                ax.errorbar(x, y, yerr=err, fmt="o", capsize=3, label=condition)
            ax.axhline(0, color="gray", linewidth=0.8)
            ax.set_xticks(sorted(e[axis].unique().to_list()))
            what = "accuracy change" if part == "choice_accuracy" else "relative NLL change"
            ax.set(title=part, xlabel=f"MoE {axis}" if axis == "layer" else "last k layers")
            ax.set_ylabel(what)
        axes[0][-1].legend(fontsize=7)
        paths.append(_save(fig, out / f"interventions_{experiment}.png"))
    return paths


def _interventions_section(path: Path | None, out: Path) -> list[str]:
    """Intervention experiments (`capture_server.experiments`), when their table is here."""
    if path is None:
        return []
    frame = pl.read_parquet(path)
    figures = plot_interventions(frame, out)
    return [
        '<h2 id="interventions">Interventions</h2>',
        "<p>Each intervention scored on the same texts as the unchanged model (baseline) "
        "and as matched random controls; change = NLL / baseline NLL &minus; 1 (accuracy: "
        "difference), with 95% intervals from resampling texts.</p>",
        *[f"<figure>{_img(p)}</figure>" for p in figures],
        _table_html(frame.drop("experiment"), len(frame), limit=60),
    ]


def _store_names(tables: dict[str, Path]) -> list[str]:
    """The stores the tables speak of, for a report written without the run's list."""
    names: set[str] = set()
    for path in tables.values():
        if "store" in pl.read_parquet_schema(path):
            names |= set(pl.scan_parquet(path).select("store").unique().collect()["store"])
    return sorted(n for n in names if n)


def write_report(
    out: Path,
    tables: dict[str, Path],
    params: dict,
    stores: list[str],
    plotters: dict[str, Callable[[pl.DataFrame, Path], list[Path]]],
) -> Path:
    """Plots for the tables present (`plotters`: table name -> plot function, from the
    analyses' registry entries) and one HTML page linking everything. Plotted tables are
    bounded in size; the others (per sequence) are only previewed, never loaded."""
    frames = {name: pl.read_parquet(path) for name, path in tables.items() if name in plotters}
    plots: list[Path] = []
    for name, plot in plotters.items():  # in registry order
        if name in frames:
            plots += plot(frames[name], out)
    sections = [
        "<h1>moetrace routing report</h1>",
        f"<p>Stores: {', '.join(html.escape(s) for s in stores or _store_names(tables))}</p>",
        *_findings_section(tables.get("findings")),
        *_interventions_section(tables.get("interventions"), out),
        "<h2>Parameters</h2>",
        f"<pre>{html.escape(json.dumps(params, indent=2, default=str))}</pre>",
        "<h2>Plots</h2>",
        *[f"<figure>{_img(p)}<figcaption>{p.stem}</figcaption></figure>" for p in plots],
        "<h2>Tables</h2>",
    ]
    for name, path in tables.items():
        if name in ("triangle", "findings", "interventions"):  # plotted, or shown first
            continue  # plotted; the pairs themselves are in the parquet file
        scan = pl.scan_parquet(path)
        rows = scan.select(pl.len()).collect().item()
        frame = frames[name] if name in frames else scan.head(30).collect()
        if name == "committee":
            frame = frame.with_columns(pl.col("members").cast(pl.List(pl.String)).list.join(","))
        sections.append(f'<h3>{name} (<a href="{path.name}">{path.name}</a>)</h3>')
        sections.append(_table_html(frame, rows))
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse;font-size:12px;display:block;overflow-x:auto}"
        "td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}"
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>moetrace report</title>"
        f"<style>{style}</style></head><body>{''.join(sections)}</body></html>"
    )
    path = out / "report.html"
    path.write_text(page)
    return path
