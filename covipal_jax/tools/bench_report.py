"""The benchmark's report (`bench.py`): derived ratios (speed-ups, FLOP bound, PPM share), the
four targets, and the outputs `bench.json`, `bench.md` (tables) and `bench.png` (chart)."""
from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from covipal_jax.models.config import LlavaConfig

if TYPE_CHECKING:
    from covipal_jax.tools.bench_run import Options


# ----------------------------------------------------------------------------- derived


def label(keep, k: int, n_v: int) -> str:
    """A keep setting's row label: "unpruned", the ratio ("0.25") or the count ("64 tok")."""
    return "unpruned" if k == n_v else (f"{keep:g}" if isinstance(keep, float) else f"{k} tok")


def _derive(suite: dict, cfg: LlavaConfig, o: Options, full_depth: int | None = None) -> dict:
    """Speed-ups, FLOP ratios, achieved fractions, PPM shares (relative to the unpruned row);
    full_depth: the decoder depth the PPM share is extrapolated to (default o.full_depth)."""
    full_depth = o.full_depth if full_depth is None else full_depth
    suite.setdefault("full_depth", full_depth)
    rows = suite["settings"]
    base = next((r for r in rows if r["k"] == suite["n_v"]), None)
    layers = cfg.text.num_layers
    for r in rows:
        d: dict[str, Any] = {}
        fl = r.get("flops")
        for part in ("e2e", "llm"):
            if base is None:
                break
            tb, tr = base["ours"].get(f"{part}_s"), r["ours"].get(f"{part}_s")
            if part == "llm" and r["k"] < suite["n_v"]:
                tr = tr + r["ours"]["ppm_s"]  # the pruned LLM path includes scoring
            if tb is None or tr is None:
                continue
            d[f"speedup_{part}"] = tb / tr
            if fl and base.get("flops"):
                fb, fr = base["flops"].get(part), fl.get(part)
                if part == "llm" and fr is not None:
                    fr = fr + fl["ppm"]
                if fb and fr:
                    d[f"flop_ratio_{part}"] = fb / fr
                    d[f"bound_fraction_{part}"] = d[f"speedup_{part}"] / d[f"flop_ratio_{part}"]
        if fl:
            e2e_f = fl.get("e2e")
            e2e_t = r["ours"].get("e2e_s")
            if e2e_f and e2e_t:
                d["gflops_e2e"] = e2e_f / e2e_t / 1e9
            d["gflops_llm"] = fl["llm"] / r["ours"]["llm_s"] / 1e9
            if fl.get("vision") and r["ours"].get("vision_s") and suite["vision_source"] == \
                    "measured":
                d["gflops_vision"] = fl["vision"] / r["ours"]["vision_s"] / 1e9
            if fl["ppm"] and e2e_f:
                d["ppm_share"] = fl["ppm"] / e2e_f
                full = (fl.get("vision") or 0.0) + fl["ppm"] + fl["llm"] * full_depth / layers
                d["ppm_share_full_depth"] = fl["ppm"] / full
        if "peer" in r:
            for part in ("e2e", "llm", "vision"):
                a, b = r["ours"].get(f"{part}_s"), r["peer"].get(f"{part}_s")
                if a and b:
                    d[f"peer_over_ours_{part}"] = b / a
        r["derived"] = d
    return suite


def targets(result: dict) -> dict:
    """The four performance targets, each with its worst case and a pass flag."""
    out = {}
    fr, vs, share = [], [], []
    for s in result["suites"]:
        for r in s["settings"]:
            d = r["derived"]
            tag = f"{s['name']} B={s['batch']} {r['label']}"
            if r["k"] < s["n_v"] and "bound_fraction_e2e" in d:
                fr.append((d["bound_fraction_e2e"], tag))
            if "peer_over_ours_e2e" in d:
                vs.append((d["peer_over_ours_e2e"], tag))
            elif "peer_over_ours_llm" in d:
                vs.append((d["peer_over_ours_llm"], tag + " (LLM)"))
            if "ppm_share" in d:
                share.append((d["ppm_share"], tag))
    if fr:
        w = min(fr)
        out["pruned_speedup_vs_flop_bound"] = dict(goal=">= 0.95", worst=w[0], where=w[1],
                                                   passed=w[0] >= 0.95)
    if vs:
        w = min(vs)
        out["prefill_vs_pytorch"] = dict(goal="peer/ours >= 1", worst=w[0], where=w[1],
                                         passed=w[0] >= 1.0)
    dec = [(r["ours_over_peer"], f"B={r['batch']} {r['label']}") for r in result["decode"]
           if r["batch"] >= 8 and "ours_over_peer" in r]
    if dec:
        w = min(dec)
        out["decode_b8_vs_generate"] = dict(goal="ours/peer >= 2", worst=w[0], where=w[1],
                                            passed=w[0] >= 2.0)
    if share:
        w = max(share)
        out["ppm_share_of_pruned_prefill"] = dict(goal="< 0.03", worst=w[0], where=w[1],
                                                  passed=w[0] < 0.03)
    return out


def _versions() -> dict:
    import flax
    out = dict(python=sys.version.split()[0], jax=jax.__version__, flax=flax.__version__,
               numpy=np.__version__)
    try:
        import torch
        import transformers
        out.update(torch=torch.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    return out


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


# ----------------------------------------------------------------------------- reports


def _f(x, fmt="{:.3f}", none="–"):
    return none if x is None else fmt.format(x)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table (header, separator, one line per row) followed by a blank line."""
    line = lambda cells: "| " + " | ".join(cells) + " |"  # noqa: E731
    return [line(header), line(["---"] * len(header))] + [line(r) for r in rows] + [""]


def _model_line(c: dict, what: str) -> str:
    t, v = c["text"], c["vision"]
    return (f"{what}: vision {v['kind']} {v['image_size']}px, decoder {t['kind']} "
            f"D={t['hidden_size']} F={t['intermediate_size']} heads={t['num_heads']} "
            f"layers={t['num_layers']} (reduced depth) vocab={t['vocab_size']}, dtype {c['dtype']}.")


def _suite_title(s: dict) -> str:
    title = f"## Prefill `{s['name']}`, batch {s['batch']}, n_v = {s['n_v']}"
    if "crops" in s:
        views = "views" if s["name"] == "ov" else "crops"
        title += f" ({s['crops']} {views}; vision {s['vision_source']})"
    return title


def _prefill_row(r: dict, peak: float) -> list[str]:
    d, ours, peer = r["derived"], r["ours"], r.get("peer", {})
    vs = d.get("peer_over_ours_e2e", d.get("peer_over_ours_llm"))
    gf = d.get("gflops_e2e", d.get("gflops_llm"))
    return [r["label"], str(r["k"]), str(r["seq_len"]), _f(ours.get("vision_s")),
            _f(ours["ppm_s"]), _f(ours["llm_s"]), _f(ours.get("e2e_s")), _f(peer.get("llm_s")),
            _f(peer.get("e2e_s")), _f(vs, "{:.2f}x"),
            _f(d.get("speedup_e2e", d.get("speedup_llm")), "{:.2f}x"),
            _f(d.get("flop_ratio_e2e", d.get("flop_ratio_llm")), "{:.2f}x"),
            _f(d.get("bound_fraction_e2e", d.get("bound_fraction_llm")), "{:.0%}"),
            f"{_f(gf, '{:.0f}')} ({_f(None if gf is None else gf / peak, '{:.0%}')})",
            _f(d.get("ppm_share"), "{:.2%}"), f"{r['kv_bytes_full_depth'] / 2**20:.0f}"]


def markdown(result: dict) -> str:
    m = result["meta"]
    peak = m["matmul_peak_gflops"]
    llava = [s for s in result["suites"] if s["name"] != "ov"]
    lines = ["# covipal_jax benchmark", ""]
    if llava or result["decode"]:
        n_v = llava[0]["n_v"] if llava else "?"
        lines.append(_model_line(m["config"], f"Model (n_v={n_v})"))
    for s in result["suites"]:
        if s["name"] == "ov":
            lines.append(_model_line(s["model"], "OneVision model (suite `ov`)"))
    lines += [
        f"Text {m['options']['text_len']} tokens, {m['options']['reps']} reps (median) after "
        f"{m['options']['warmup']} warmup.",
        f"Machine: {m['machine']['cpu_count']} CPU cores, load average "
        f"{m['machine']['loadavg_start'][0]:.1f} -> {m['machine']['loadavg_end'][0]:.1f}; "
        f"f32 matmul peak (n={peak['n']}): jax {peak['jax']:.0f} GFLOP/s"
        + (f", torch {peak['torch']:.0f} GFLOP/s" if "torch" in peak else "")
        + f" (end of run: jax {m['matmul_peak_gflops_end']['jax']:.0f}). "
        f"Wall time {m['wall_s']:.0f} s.",
        "",
    ]
    for s in result["suites"]:
        header = ["keep", "k", "L", "vision s", "PPM s", "LLM s", "e2e s", "peer LLM s",
                  "peer e2e s", "peer/ours e2e", "speed-up", "FLOP ratio", "% of bound",
                  "GFLOP/s (% peak)", "PPM share", f"KV MiB ({s.get('full_depth', '?')} L)"]
        lines += [_suite_title(s), ""] + _table(
            header, [_prefill_row(r, peak["jax"]) for r in s["settings"]])
    if result["decode"]:
        lines += ["## Decode (tokens/s over the steps after the prefill)", ""] + _table(
            ["batch", "keep", "L", "new tokens", "ours tok/s", "peer `generate` tok/s",
             "ours/peer", "same tokens"],
            [[str(r["batch"]), r["label"], str(r["seq_len"]), str(r["new_tokens"]),
              f"{r['ours_tok_s']:.1f}", _f(r.get("peer_tok_s"), "{:.1f}"),
              _f(r.get("ours_over_peer"), "{:.2f}x"), _f(r.get("token_agreement"), "{:.0%}")]
             for r in result["decode"]])
    if result["targets"]:
        lines += ["## Targets", ""] + _table(
            ["target", "goal", "worst", "where", "pass"],
            [[name, tg["goal"], f"{tg['worst']:.3f}", tg["where"],
              "yes" if tg["passed"] else "NO"] for name, tg in result["targets"].items()])
    lines += ["Columns: speed-up = unpruned / pruned latency (end to end where measured, else "
              "PPM + LLM); FLOP ratio = XLA-counted FLOPs unpruned / pruned; % of bound = "
              "speed-up / FLOP ratio; peer = transformers LLaVA / LLaVA-OneVision (PyTorch CPU, "
              "sdpa) on the same weights and inputs, given our kept tokens; vision "
              "\"estimated\" = views (crops) x the measured single-view tower; KV MiB "
              "extrapolated to the full decoder depth at this dtype.", ""]
    return "\n".join(lines)


def chart(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = result["suites"]
    n = len(suites) + (1 if result["decode"] else 0)
    fig, axes = plt.subplots(1, max(n, 1), figsize=(5.2 * max(n, 1), 4.2), squeeze=False)
    for ax, s in zip(axes[0], suites):
        rows = s["settings"]
        x = np.arange(len(rows))
        part = "e2e_s" if rows[0]["ours"].get("e2e_s") is not None else "llm_s"
        ours = [r["ours"][part] or 0 for r in rows]
        ax.bar(x - 0.2, ours, 0.4, label="ours (JAX)")
        if all("peer" in r and r["peer"].get(part) for r in rows):
            ax.bar(x + 0.2, [r["peer"][part] for r in rows], 0.4, label="transformers")
        base = rows[0]
        if base["k"] == s["n_v"] and all("flop_ratio_" + part[:-2] in r["derived"] or r is base
                                         for r in rows):
            bound = [base["ours"][part] / r["derived"].get("flop_ratio_" + part[:-2], 1.0)
                     for r in rows]
            ax.plot(x, bound, "k--", marker="o", label="FLOP-ratio bound")
        ax.set_xticks(x, [f"{r['label']}\nk={r['k']}" for r in rows], fontsize=8)
        ax.set_ylabel("seconds")
        ax.set_title(f"{s['name']} prefill ({part[:-2]}), B={s['batch']}, n_v={s['n_v']}",
                     fontsize=9)
        ax.legend(fontsize=8)
    if result["decode"]:
        ax = axes[0][len(suites)]
        rows = result["decode"]
        x = np.arange(len(rows))
        ax.bar(x - 0.2, [r["ours_tok_s"] for r in rows], 0.4, label="ours (while_loop)")
        if all("peer_tok_s" in r for r in rows):
            ax.bar(x + 0.2, [r["peer_tok_s"] for r in rows], 0.4, label="transformers generate")
        ax.set_xticks(x, [f"B={r['batch']}\n{r['label']}" for r in rows], fontsize=8)
        ax.set_ylabel("tokens / s")
        ax.set_title("decode throughput", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out_dir: str) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {n: os.path.join(out_dir, f"bench.{n}") for n in ("json", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump(_jsonable(result), f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(markdown(result))
    chart(result, paths["png"])
    return paths
