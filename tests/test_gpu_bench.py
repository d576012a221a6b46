"""Tests for covipal_jax/tools/gpu_bench.py: a --quick run on CPU (tiny LLaVA-1.5 and tiny
OneVision, multi-crop vision tokens, PPM pruning, decode, the transformers peer on our weights),
its outputs, and the memory-based skip."""
from __future__ import annotations

import json

import pytest

from covipal_jax.tools import gpu_bench


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_bench")
    argv = ["--quick", "--out", str(out), "--vision_tokens", "96", "--reps", "1"]
    assert gpu_bench.main(argv) == 0
    with open(out / "gpu_bench.json") as f:
        return out, json.load(f)


@pytest.mark.slow
def test_quick_run_writes_every_file(quick_run):
    out, r = quick_run
    for name in ("gpu_bench.json", "gpu_bench.md", "gpu_bench.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "gpu_bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "gpu_bench.md").read_text()
    assert "| tiny_llama | 96 | 2 | unpruned |" in md and "| tiny_ov | 96 | 2 | 16 tok |" in md
    assert r["meta"]["command"].startswith("python -m covipal_jax.tools.gpu_bench --quick")
    assert {"jax", "torch", "transformers"} <= set(r["meta"]["versions"])


@pytest.mark.slow
def test_quick_run_measures_every_setting(quick_run):
    _, r = quick_run
    assert not r["skipped"]
    rows = {(x["model"], x["label"]): x for x in r["rows"]}
    assert set(rows) == {(m, lab) for m in ("tiny_llama", "tiny_ov")
                         for lab in ("unpruned", "16 tok")}
    for (model, lab), x in rows.items():
        cfg, _ = gpu_bench.load_config("tiny" if model == "tiny_llama" else "tiny_ov")
        t = cfg.text
        # 96 tokens from two 64-token CLIP crops / six 16-token SigLIP crops
        assert x["crops"] == (2 if model == "tiny_llama" else 6)
        assert x["k"] == (96 if lab == "unpruned" else 16)
        assert x["seq_len"] == 12 - 1 + x["k"]
        assert x["ttft"]["median_s"] > 0 and x["torch_ttft"]["median_s"] > 0
        assert x["decode"]["tok_s"] > 0 and x["decode"]["steps"] == 3
        # kv = 2 x layers x B(2) x L x kv_heads x head_dim x 4 bytes (f32)
        assert x["kv_bytes"] == 2 * t.num_layers * 2 * x["seq_len"] * t.num_kv_heads * \
            t.head_dim * 4
        # The transformers model holds exactly our weights: same next-token logits (f32).
        assert x["logit_rel_diff"] < 1e-4, (model, lab, x["logit_rel_diff"])
        assert x["attention"] == "xla"


def test_settings_that_cannot_fit_are_skipped(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_bench, "device_memory", lambda: 1)  # a 1-byte device
    argv = ["--quick", "--out", str(tmp_path), "--models", "tiny_llama", "--vision_tokens",
            "64", "--no_torch"]
    assert gpu_bench.main(argv) == 0
    r = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert not r["rows"] and len(r["skipped"]) == 2
    assert all(s["reason"].startswith("estimated") for s in r["skipped"])
    assert "## Skipped" in (tmp_path / "gpu_bench.md").read_text()


def test_estimate_and_bad_arguments():
    cfg, _ = gpu_bench.load_config("llava15_7b:dtype=bfloat16")
    # LLaVA-1.5-7B, 7,300 vision tokens, batch 32: the KV cache alone is ~120 GiB.
    kv = gpu_bench.kv_bytes(cfg, 32, 7300 + 47)
    assert 110 * 2 ** 30 < kv < 130 * 2 ** 30
    assert gpu_bench.estimate_bytes(cfg, 14 * 2 ** 30, 32, 7300, 7347, 32, "cudnn") > kv
    with pytest.raises(SystemExit):
        gpu_bench.main(["--out", "/tmp/x", "--attention", "flash"])
    with pytest.raises(ValueError, match="unknown --models"):
        gpu_bench.Options(models=("gpt",)).model_specs()
