"""The demo's outputs: results.json / results_detail.json, the markdown table, the plot."""
from __future__ import annotations

import json
import os

from covipal_jax.demo.common import DETAIL, PLOT, RESULTS, _baseline, _highlight, _plain

DISPLAY = {"pdrop_star": "pdrop*"}   # row keys shown under another name (finetune_stage.STAR)


def label(method: str) -> str:
    """The table / plot name of a row's method key."""
    return DISPLAY.get(method, method)


def write_results(workdir: str, sweep_out: dict, timings: dict, extra: dict) -> dict:
    rows = sweep_out["rows"]
    base = next(r for r in rows if r["method"] == _baseline())
    methods: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["method"] != _baseline():
            methods.setdefault(r["method"], {})[_rkey(r["ratio"])] = r["accuracy"]
    results = {"unpruned": base["accuracy"], "methods": methods}
    with open(os.path.join(workdir, RESULTS), "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    detail = dict(sweep_out, timings=timings, **extra)
    with open(os.path.join(workdir, DETAIL), "w") as f:
        json.dump(_plain(detail), f, indent=1)
    table = format_table(rows)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(table + "\n")
    plot(rows, os.path.join(workdir, PLOT), chance=extra.get("chance"))
    return results


def _rkey(ratio: float) -> str:
    return repr(float(ratio))


def format_table(rows: list[dict]) -> str:
    base = next(r for r in rows if r["method"] == _baseline())
    acc0, t0 = base["accuracy"], base["seconds"]
    lines = ["| method | keep | vision tokens | LLM budget | accuracy | vs unpruned "
             "| queried kept | prefill time vs unpruned |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = "unpruned" if r["method"] == _baseline() else label(r["method"])
        rel = r["accuracy"] / acc0 if acc0 else float("nan")
        budget = r.get("llm_budget", r["k"] / base["k"])
        lines.append(f"| {name} | {r['ratio']:g} | {r['k']} | {budget:.2f} | "
                     f"{r['accuracy']:.4f} | "
                     f"{100 * rel:.1f}% | {100 * r['queried_kept']:.1f}% | "
                     f"{r['seconds'] / t0:.2f} |")
    lines += ["", "LLM budget: the share of (vision token, decoder layer) pairs the LLM computes "
              "(`llm_budget`); in-LLM methods (fastv, dart, pdrop, sparsevlm) run the layers "
              "before their (first) stage on every vision token. pdrop*: the LLaVA fine-tuned "
              "with PyramidDrop active (PDrop*), evaluated with pdrop."]
    ratios = sorted({r["ratio"] for r in rows if r["method"] != _baseline()}, reverse=True)
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != _baseline()))
    acc = {(r["method"], r["ratio"]): r["accuracy"] for r in rows}
    lines += ["", "| accuracy | " + " | ".join(f"r={x:g}" for x in ratios) + " |",
              "|---|" + "---|" * len(ratios)]
    for m in methods:
        lines.append(f"| {label(m)} | " + " | ".join(f"{acc[(m, x)]:.3f}" for x in ratios)
                     + " |")
    lines.append(f"| (unpruned) | {acc0:.3f} |" + " |" * (len(ratios) - 1))
    return "\n".join(lines)


def plot(rows: list[dict], path: str, chance: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in rows if r["method"] == _baseline())
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.4), dpi=110, sharey=True)
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != _baseline()))
    ratios = sorted({r["ratio"] for r in rows if r["method"] != _baseline()})
    n_v = base["k"]
    for ax, key, xlabel in (
            (axes[0], "ratio", "keep ratio r (vision tokens kept / n_v)"),
            (axes[1], "llm_budget", "LLM budget (share of vision token x decoder layer pairs)")):
        for m in methods:
            pts = sorted((r.get(key, r["k"] / n_v), r["accuracy"]) for r in rows
                         if r["method"] == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    linewidth=2.4 if m == _highlight() else 1.4, label=label(m),
                    zorder=3 if m == _highlight() else 2)
        ax.axhline(base["accuracy"], color="black", linestyle="--", linewidth=1,
                   label="unpruned")
        if chance is not None:
            ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ratios)
        ax.set_xticklabels([f"{x:g}" for x in ratios])
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy")
    axes[0].set_title("accuracy vs keep ratio", fontsize=10)
    axes[1].set_title("accuracy vs LLM compute on vision tokens\n(in-LLM methods run the "
                      "first K layers on all tokens)", fontsize=9)
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
