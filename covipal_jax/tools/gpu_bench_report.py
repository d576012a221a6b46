"""Outputs of `covipal_jax.tools.gpu_bench`: JSON, a markdown table, a TTFT chart.

The result dict: `meta` (command, device, versions, options, date), `rows` (one per measured
setting: model, n_v, batch, keep, k, seq_len, attention backend, ttft / torch_ttft
{median_s, times_s}, decode {tok_s, ...}, kv_bytes, compile_and_first_s, logit_rel_diff),
`skipped` (setting + reason) and `wall_s`.
"""
from __future__ import annotations

import json
import os


def _ms(x: dict | None) -> str:
    return "–" if not x or "median_s" not in x else f"{x['median_s'] * 1e3:.1f}"


def markdown(r: dict) -> str:
    m = r["meta"]
    lines = [f"# GPU benchmark ({m['device']['kind']}, {m['date']})", "",
             f"`{m['command']}`", "", "Versions: " + ", ".join(
                 f"{k} {v}" for k, v in m["versions"].items()), "",
             "| model | n_v | B | keep | k | L | attention | TTFT ms | torch TTFT ms | "
             "torch/ours | logit diff | decode tok/s | KV MiB | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        ratio = x.get("ours_over_torch")
        dec = f"{x['decode']['tok_s']:.1f}" if "decode" in x else "–"
        lines.append(
            f"| {x['model']} | {x['n_v']} | {x['batch']} | {x['label']} | {x['k']} | "
            f"{x['seq_len']} | {x['attention']} | {_ms(x.get('ttft'))} | "
            f"{_ms(x.get('torch_ttft'))} | {'–' if ratio is None else f'{ratio:.2f}x'} | "
            f"{x.get('logit_rel_diff', float('nan')):.1e} | {dec} | "
            f"{x['kv_bytes'] / 2 ** 20:.0f} | {x['compile_and_first_s']:.1f} |")
    if r["skipped"]:
        lines += ["", "## Skipped", ""]
        lines += [f"- {json.dumps(s)}" for s in r["skipped"]]
    lines += ["", f"Wall time {r['wall_s']:.0f} s. TTFT: pixels + prompt -> first token "
              "(tower on ceil(n_v / per-crop) crops, PPM, LLM prefill into the cache); torch: "
              "the same prefill through transformers (sdpa) with our kept tokens (no PPM)."]
    return "\n".join(lines) + "\n"


def chart(r: dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    models = sorted({x["model"] for x in r["rows"]})
    batches = sorted({x["batch"] for x in r["rows"]})
    if not models:
        return False
    fig, axes = plt.subplots(len(models), len(batches), squeeze=False,
                             figsize=(4.5 * len(batches), 3.6 * len(models)))
    labels = sorted({x["label"] for x in r["rows"]}, key=lambda s: (s != "unpruned", s))
    color = {lab: f"C{i}" for i, lab in enumerate(labels)}
    for i, name in enumerate(models):
        for j, b in enumerate(batches):
            ax = axes[i][j]
            for lab in labels:
                sel = sorted((x for x in r["rows"] if x["model"] == name and x["batch"] == b
                              and x["label"] == lab), key=lambda x: x["n_v"])
                if not sel:
                    continue
                ax.plot([x["n_v"] for x in sel], [x["ttft"]["median_s"] * 1e3 for x in sel],
                        marker="o", color=color[lab], label=f"ours {lab}")
                tt = [(x["n_v"], x["torch_ttft"]["median_s"] * 1e3) for x in sel
                      if "median_s" in x.get("torch_ttft", {})]
                if tt:
                    ax.plot(*zip(*tt), ls="--", marker="x", color=color[lab],
                            label=f"torch {lab}")
            ax.set(title=f"{name}, B={b}", xlabel="vision tokens", ylabel="TTFT (ms)",
                   yscale="log")
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write(r: dict, out: str) -> dict[str, str]:
    os.makedirs(out, exist_ok=True)
    paths = {"json": os.path.join(out, "gpu_bench.json"), "md": os.path.join(out, "gpu_bench.md")}
    with open(paths["json"], "w") as f:
        json.dump(r, f, indent=1, default=str)
    with open(paths["md"], "w") as f:
        f.write(markdown(r))
    png = os.path.join(out, "gpu_bench.png")
    if chart(r, png):
        paths["png"] = png
    return paths
