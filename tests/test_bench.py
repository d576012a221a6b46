"""Tests for covipal_jax/tools/bench.py (and bench_peer.py, bench_ov.py): a --quick run end to end
(the `ov` suite on a tiny OneVision included), the derived numbers, the target verdicts, the
suite selector, and the PyTorch peers holding exactly our weights."""
from __future__ import annotations

import json

import numpy as np
import pytest

from covipal_jax.tools import bench

SETTING_KEYS = {"keep", "k", "label", "method", "seq_len", "ours", "peer", "times_s", "kv_bytes",
                "kv_bytes_full_depth", "flops", "derived"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert bench.main(["--quick", "--out", str(out)]) == 0
    with open(out / "bench.json") as f:
        return out, json.load(f)


@pytest.mark.slow
def test_quick_run_writes_every_file(quick_run):
    out, _ = quick_run
    for name in ("bench.json", "bench.md", "bench.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "bench.md").read_text()
    for heading in ("## Prefill `llava15`", "## Prefill `next`", "## Prefill `ov`", "## Decode",
                    "## Targets"):
        assert heading in md


@pytest.mark.slow
def test_quick_run_json_has_every_measurement(quick_run):
    _, r = quick_run
    meta = r["meta"]
    assert meta["matmul_peak_gflops"]["jax"] > 0 and meta["matmul_peak_gflops"]["torch"] > 0
    assert {"jax", "torch", "transformers"} <= set(meta["versions"])
    assert [s["name"] for s in r["suites"]] == ["llava15", "next", "ov"]
    for s in r["suites"]:
        n_v = s["n_v"]
        assert s["settings"][0]["k"] == n_v  # the unpruned baseline comes first
        for row in s["settings"]:
            assert SETTING_KEYS <= set(row), SETTING_KEYS - set(row)
            assert row["seq_len"] == r["meta"]["options"]["text_len"] - 1 + row["k"]
            for side in ("ours", "peer"):
                assert row[side]["llm_s"] > 0
                assert row[side]["vision_s"] > 0
            fl = row["flops"]
            assert fl["llm"] > 0 and fl["vision"] > 0 and fl["e2e"] > fl["llm"]
            if row["k"] < n_v:
                assert row["ours"]["ppm_s"] > 0 and fl["ppm"] > 0
                d = row["derived"]
                for key in ("speedup_e2e", "flop_ratio_e2e", "bound_fraction_e2e",
                            "ppm_share", "ppm_share_full_depth", "peer_over_ours_llm"):
                    assert np.isfinite(d[key]), key
                assert d["flop_ratio_e2e"] > 1
                # XLA's PPM count (block-corrected) against the analytic matmul count.
                # (the analytic count has matmuls only; XLA adds norms, softmax, GELU)
                assert fl["ppm_analytic"] <= fl["ppm"] <= 1.5 * fl["ppm_analytic"]
            else:
                assert fl["ppm"] == 0.0
    assert r["suites"][0]["vision_source"] == "measured"
    assert r["suites"][1]["vision_source"] == "estimated"
    assert r["suites"][2]["vision_source"] == "measured"  # --quick: the real packed path
    assert [row["batch"] for row in r["decode"]] == [2]
    for row in r["decode"]:
        assert row["ours_tok_s"] > 0 and row["peer_tok_s"] > 0
        assert row["steps"] == r["meta"]["options"]["decode_tokens"] - 1
    assert {"pruned_speedup_vs_flop_bound", "prefill_vs_pytorch",
            "ppm_share_of_pruned_prefill"} <= set(r["targets"])
    assert "decode_b8_vs_generate" not in r["targets"]  # quick decodes at batch 2 only


@pytest.mark.slow
def test_peer_computes_our_logits(quick_run):
    """Same weights, same inputs: transformers' prefill logits match ours (unpruned and
    pruned, the peer given our kept tokens), and greedy decoding agrees at batch 1."""
    _, r = quick_run
    for s in r["suites"][:1]:
        for row in s["settings"]:
            assert row["parity_rel"] < 1e-4, row["label"]
    assert all(row["token_agreement"] == 1.0 for row in r["decode"])


@pytest.mark.slow
def test_ov_suite_runs_the_packed_anyres_path(quick_run):
    """tiny_ov, 10 views (base + 3 x 3 crops of 16 tokens): 16 + 12 x 13 = 172 packed tokens;
    ours `prefill` on the AnyResImage matches transformers' OneVision (HF packing + our kept
    slots) unpruned and pruned; every time measured (e2e included), FLOPs per row."""
    _, r = quick_run
    s = r["suites"][2]
    assert (s["name"], s["n_v"], s["crops"], s["full_depth"]) == ("ov", 172, 10, 3)
    assert s["model"]["text"]["kind"] == "qwen2" and s["model"]["vision"]["kind"] == "siglip"
    assert s["model"]["text"]["num_layers"] == 2  # --quick's ov depth (tiny_ov has 3)
    assert [row["k"] for row in s["settings"]] == [172, 43]
    for row in s["settings"]:
        assert row["parity_rel"] < 1e-4, row["label"]
        for side in ("ours", "peer"):
            assert row[side]["e2e_s"] > 0 and row[side]["vision_s"] > 0
            assert set(row["times_s"]) >= {f"{side}_e2e", f"{side}_llm"}
        assert row["flops"]["e2e"] > row["flops"]["llm"] > 0
    assert s["settings"][1]["derived"]["flop_ratio_e2e"] > 1


@pytest.mark.slow
def test_suites_selector_runs_one_suite(tmp_path):
    """`--suites ov` runs the ov suite alone (no LLaVA-1.5 suite, no decode); a feed of
    projected tokens (`--ov_tokens` other than the image's) estimates the tower per view."""
    argv = ["--quick", "--out", str(tmp_path), "--suites", "ov", "--ov_tokens", "64",
            "--ov_keeps", "1.0,16", "--no_flops"]
    assert bench.main(argv) == 0
    r = json.loads((tmp_path / "bench.json").read_text())
    assert [s["name"] for s in r["suites"]] == ["ov"] and r["decode"] == []
    s = r["suites"][0]
    assert (s["n_v"], s["crops"], s["vision_source"]) == (64, 4, "estimated")
    assert [row["k"] for row in s["settings"]] == [64, 16]
    for row in s["settings"]:
        # the estimated tower is 4 x the measured single view, on both sides
        assert row["ours"]["e2e_s"] == pytest.approx(
            row["ours"]["vision_s"] + row["ours"]["ppm_s"] + row["ours"]["llm_s"])
        assert row["peer"]["llm_s"] > 0 and "parity_rel" not in row
    assert "## Prefill `llava15`" not in (tmp_path / "bench.md").read_text()
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--out", str(tmp_path), "--suites", "ov,nope"])


def test_ov_image_geometry():
    """OneVision-7B's 10-view bucket: 729 + 81 x 82 = 7,371 packed tokens, all real."""
    from covipal_jax.tools import bench_ov

    assert bench_ov.crop_layout(10) == (3, 3) and bench_ov.crop_layout(7) == (2, 3)
    with pytest.raises(ValueError, match="views"):
        bench_ov.crop_layout(1)
    cfg, _ = bench.load_config("llava_ov_7b:dtype=float32", layers=2, vocab=32000)
    assert (cfg.text.num_layers, cfg.text.vocab_size) == (2, 32000)
    assert (cfg.image_token_id, cfg.video_token_id) == (31998, 31999)
    visual, pixels, sizes, n = bench_ov.anyres_image(cfg, 1, 10, 0)
    assert n == 7371 and visual.num_slots(cfg) == 7371
    assert pixels.shape == (1, 10, 384, 384, 3) and sizes.tolist() == [[1152, 1152]]
    with pytest.raises(ValueError, match="not a layout"):
        bench_ov.anyres_image(cfg, 1, 50, 0)  # 7 x 7 crops: beyond the 6 x 6 pinpoints


@pytest.mark.slow
def test_flop_counts_scale_with_kept_tokens(quick_run):
    _, r = quick_run
    rows = r["suites"][0]["settings"]
    llm = [row["flops"]["llm"] for row in rows]
    assert llm == sorted(llm, reverse=True) and llm[0] > llm[-1]
    vision = {row["flops"]["vision"] for row in rows}
    assert len(vision) == 1  # the tower does not depend on the keep setting


def _row(k, n_v, e2e_s, e2e_f, ppm_f=0.0, ppm_s=0.0, peer_e2e=None):
    row = dict(k=k, label=str(k), ours=dict(vision_s=1.0, ppm_s=ppm_s, llm_s=e2e_s - 1.0 - ppm_s,
                                            e2e_s=e2e_s),
               flops=dict(e2e=e2e_f, llm=e2e_f - 100.0 - ppm_f, vision=100.0, ppm=ppm_f))
    if peer_e2e is not None:
        row["peer"] = dict(vision_s=1.0, llm_s=peer_e2e - 1.0, e2e_s=peer_e2e)
    return row


def test_derived_numbers_and_targets():
    cfg, _ = bench.load_config(bench.QUICK_CONFIG)
    opts = bench.Options.quick()
    suite = dict(name="llava15", batch=1, n_v=64, vision_source="measured", settings=[
        _row(64, 64, 4.0, 400.0, peer_e2e=5.0),
        _row(16, 64, 2.0, 200.0, ppm_f=4.0, ppm_s=0.1, peer_e2e=1.9)])
    s = bench._derive(suite, cfg, opts)
    d = s["settings"][1]["derived"]
    assert d["speedup_e2e"] == pytest.approx(2.0)
    assert d["flop_ratio_e2e"] == pytest.approx(2.0)
    assert d["bound_fraction_e2e"] == pytest.approx(1.0)
    assert d["ppm_share"] == pytest.approx(0.02)
    assert d["peer_over_ours_e2e"] == pytest.approx(0.95)
    result = dict(suites=[s], decode=[dict(batch=8, label="16", ours_over_peer=1.5)])
    t = bench.targets(result)
    assert t["pruned_speedup_vs_flop_bound"]["passed"]
    assert not t["prefill_vs_pytorch"]["passed"]  # 0.95 < 1 in the pruned row
    assert t["prefill_vs_pytorch"]["where"].endswith("16")
    assert not t["decode_b8_vs_generate"]["passed"]
    assert t["ppm_share_of_pruned_prefill"]["passed"]


def test_interleaved_takes_medians_after_warmup():
    seq = iter([100.0, 3.0, 1.0, 2.0])
    r = bench.interleaved({"a": lambda: next(seq)}, reps=3, warmup=1)
    assert r["a"]["times_s"] == [3.0, 1.0, 2.0]
    assert r["a"]["median_s"] == 2.0


def test_kv_bytes():
    cfg, _ = bench.load_config(bench.QUICK_CONFIG)
    t = cfg.text
    assert bench.kv_bytes(cfg, 2, 10) == 2 * t.num_layers * 2 * 10 * t.num_kv_heads * t.head_dim * 4
    assert bench.kv_bytes(cfg, 1, 10, layers=32, itemsize=2) == 2 * 32 * 10 * t.num_kv_heads \
        * t.head_dim * 2


def test_load_config_layers():
    cfg, ppm = bench.load_config("configs/llava15_7b.py:layers=2,dtype=float32")
    assert cfg.text.num_layers == 2 and cfg.text.hidden_size == 4096
    assert str(cfg.compute_dtype) == "float32" and ppm.width > 0
    cfg3, _ = bench.load_config("configs/llava15_7b.py:layers=2,dtype=float32", layers=3)
    assert cfg3.text.num_layers == 3


def test_cli_requires_out():
    with pytest.raises(SystemExit):
        bench.main([])
