"""The text and markdown forms of `tools/aot.py`'s reports (dicts: mode, topology, mesh,
per-device bytes, FLOPs, fit against the HBM), and the report of a step the TPU compiler
rejected as too big.
"""
from __future__ import annotations

def _oom_report(header: dict, hbm_gib: float, msg: str, secs: float) -> dict:
    """The report of a step the TPU compiler rejected as too big for the HBM."""
    import re

    m = re.search(r"temporaries \(([0-9.]+)([KMGT])\)", msg)
    scale = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
    temp = int(float(m.group(1)) * scale[m.group(2)]) if m else None
    first = msg.strip().splitlines()[-1][:300]
    return dict(
        header,
        bytes=dict(argument=None, output=None, temp=temp, alias=None, generated_code=None,
                   total=temp), hbm_bytes=int(hbm_gib * 2 ** 30),
        hbm_fraction=None if temp is None else temp / (hbm_gib * 2 ** 30), fits=False,
        compile_s=secs, compiler_error=first)


def _human(x: float) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{int(x)} B"


def format_report(r: dict) -> str:
    gib = lambda x: "?" if x is None else _human(x)  # noqa: E731
    b = r["bytes"]
    mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
    stage = "" if r["stage"] is None else f" (stage {r['stage']})"
    lines = [f"note: {r['batch_note']}"] if r.get("batch_note") else []
    lines += [
        f"{r['mode']}{stage} on {r['topology']} ({r['devices']} x TPU {r['chip']}, {gib(r['hbm_bytes'])} HBM each)"
        f", mesh {mesh}, batch {r['batch']}, text {r['text_len']}, vision tokens "
        f"{r['k']}/{r['num_vision_tokens']} ({r['method']}), {r['decoder_layers']} decoder "
        f"layers, params {r['param_dtype']}",
        f"  per device: arguments {gib(b['argument'])}, outputs {gib(b['output'])}, "
        f"temporaries {gib(b['temp'])}, aliased {gib(b['alias'])}, code {gib(b['generated_code'])}",
        f"  total {gib(b['total'])} of {gib(r['hbm_bytes'])}"
        + ("" if r["hbm_fraction"] is None else f" ({r['hbm_fraction']:.0%})")
        + f": {'FITS' if r['fits'] else 'DOES NOT FIT'}",
    ]
    att = r.get("attention")
    if att:
        d, v = att["decoder_prefill"], att["vision_tower"]
        lines.append(
            f"  input {r.get('visual', 'image')}; attention {att['config']}: decoder prefill "
            f"{d['impl']} ({d['why']}; {d['queries']} queries x {d['keys']} keys), vision "
            f"tower {v['impl']} ({v['why']})"
            + (f", PPM {p['impl']} ({p['queries']} queries x {p['keys']} keys)"
               if (p := att.get("ppm")) else "")
            + f"; Pallas tpu_custom_calls in the program: {att.get('tpu_custom_calls', '?')}")
    if r.get("compiler_error"):
        lines.append(f"  compiler: {r['compiler_error']}")
    if "flops_global" in r:
        lines.append(
            f"  FLOPs: {r['flops_global']:.3e} global, {r['flops_per_device']:.3e} per device; "
            f"estimated step >= {r['est_step_s'] * 1e3:.1f} ms (compute "
            f"{r['est_compute_s'] * 1e3:.1f} ms, argument reads {r['est_memory_s'] * 1e3:.1f} ms)")
    xo = r.get("xla_optimal_seconds")
    if xo is not None and "compile_s" in r:
        lines.append(f"  XLA optimal_seconds: {xo:.4g}{' (not usable)' if xo < 0 else ''}; "
                     f"compile {r['compile_s']:.0f} s")
    return "\n".join(lines)


def table(reports: list[dict]) -> str:
    """A markdown table of several reports (e.g. the JSON files of a sweep)."""
    def gib(x):
        return "?" if x is None else f"{x / 2 ** 30:.2f}"

    lines = ["| run | slice | mesh | step | batch | vision tokens | args GiB | temp GiB "
             "| out GiB | total GiB / HBM | fits | TFLOP / device | est. step ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        b = r["bytes"]
        mesh = "x".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1"
        if r["mode"] == "train_ppm":
            step = f"train PPM stage {r.get('stage') or 1}"
            if r.get("remat_policy", "none") != "none":
                step += f" (remat {r['remat_policy']})"
        elif r["mode"] == "prefill":
            step = "prefill " + ("unpruned" if r["k"] == r["num_vision_tokens"] else "pruned")
        else:
            step = r["mode"]
        fl = (f"{r['flops_per_device'] / 1e12:.2f} | {r['est_step_s'] * 1e3:.0f}"
              if "flops_per_device" in r else "– | –")
        att = r.get("attention")
        if att:
            step += f", {r.get('visual', 'image')}, attention {att['decoder_prefill']['impl']}"
        lines.append(
            f"| {r.get('name', '')} | {r['chip']} x{r['devices']} | {mesh} | {step} "
            f"| {r['batch']} | {r['k']}/{r['num_vision_tokens']} | {gib(b['argument'])} "
            f"| {gib(b['temp'])} | {gib(b['output'])} | {gib(b['total'])} / "
            f"{gib(r['hbm_bytes'])} | {'yes' if r['fits'] else 'NO'} | {fl} |")
    return "\n".join(lines)


def long_table(reports: list[dict]) -> str:
    """docs/aot_long.md's table: one row per prefill report (packed input, attention path)."""
    def gib(x):
        return "?" if x is None else f"{x / 2 ** 30:.2f}"

    lines = ["| config | input | vision tokens (kept / packed) | prefill tokens | batch | keep "
             "| attention (decoder / tower / PPM; kernels) | args / temps / outputs GiB per chip "
             "| total GiB | fits v5e 16 GiB? | est. ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        b, att = r["bytes"], r.get("attention") or {}
        dec = att.get("decoder_prefill", {}).get("impl", "?")
        tower = att.get("vision_tower", {}).get("impl", "?")
        ppm = (att.get("ppm") or {}).get("impl", "–")     # no PPM in the step (or an old report)
        calls = att.get("tpu_custom_calls", "?")
        est = f"{r['est_step_s'] * 1e3:.0f}" if "est_step_s" in r else "–"
        fits = "yes" if r["fits"] else ("NO (compiler: RESOURCE_EXHAUSTED)"
                                        if r.get("compiler_error") else "NO")
        lines.append(
            f"| {r.get('name', '')} | {r.get('visual', 'image')} | {r['k']} / "
            f"{r['num_vision_tokens']} | {r['text_len'] + r['k']} | {r['batch']} | {r['keep']} "
            f"| {dec} / {tower} / {ppm}; {calls} | {gib(b['argument'])} / {gib(b['temp'])} / "
            f"{gib(b['output'])} | {gib(b['total'])} | {fits} | {est} |")
    return "\n".join(lines)
