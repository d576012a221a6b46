"""tools/aot.py on packed visual inputs (`--visual anyres:VIEWS | video:FRAMES`): the tiny
OneVision config's prefill compiles for v5e:2x2 with splash and with XLA attention, and the
report names the packed length, the kept count and the attention path compiled."""
from __future__ import annotations

import json

import pytest

from covipal_jax.tools import aot
from tests.test_aot import _python, needs_libtpu


@pytest.fixture(scope="module")
def packed_reports():
    if not aot.libtpu_available():
        pytest.skip("libtpu is not installed")
    res = _python("""
        import json
        from covipal_jax.tools import aot
        aot.setup_host()
        from covipal_jax.configs import tiny_ov
        out = {}
        def run(name, visual, keep, attention):
            config = tiny_ov.get_config()
            with config.unlocked():
                config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1
                config.model.attention = attention
            method = "none" if keep == 1.0 else "ppm"
            req = aot.Request("prefill", 4, 16, keep, method, 4, visual=visual)
            out[name] = aot.compile_step(req, config, "v5e:2x2")
        run("anyres_splash_pruned", "anyres:4", 0.25, "splash")
        run("video_xla_full", "video:4", 1.0, "xla")
        print("JSON" + json.dumps(out))
    """)
    assert res.returncode == 0, res.stderr[-4000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("JSON"))
    return json.loads(line[4:])


def _tiny_cfg():
    from covipal_jax.configs import tiny_ov
    return aot.model_config(tiny_ov.get_config())


def test_packed_lengths_and_parse():
    from covipal_jax.models import anyres

    cfg = _tiny_cfg()
    g = cfg.vision.grid[0]
    assert aot.num_visual_tokens("anyres:4", cfg) == g * g + anyres.bucket_capacity(cfg, 4)
    p = -(-g // 2)
    assert aot.num_visual_tokens("video:4", cfg) == 4 * p * p + 1
    assert aot.num_visual_tokens("", cfg) == cfg.num_vision_tokens
    assert aot.parse_visual("video:32") == ("video", 32)
    for bad in ("anyres", "video:0", "crops:3", "anyres:x"):
        with pytest.raises(ValueError, match="anyres:VIEWS or video:FRAMES"):
            aot.parse_visual(bad)
    from covipal_jax.configs import tiny
    with pytest.raises(ValueError, match="image_newline"):
        aot.visual_sds("anyres:4", aot.model_config(tiny.get_config()), 1, None)


@pytest.mark.slow  # two TPU compiles in a subprocess: ~50 s on an idle 2-core host
@needs_libtpu
def test_packed_prefill_compiles_for_v5e(packed_reports):
    cfg = _tiny_cfg()
    for name, r in packed_reports.items():
        assert r["devices"] == 4 and r["fits"] and r["bytes"]["total"] > 0, name
        assert r["flops_global"] > 0 and r["est_step_s"] > 0, name
        kind = name.split("_")[0]
        assert r["visual"].startswith(kind), name
        assert r["num_vision_tokens"] == aot.num_visual_tokens(r["visual"], cfg), name
    pruned, full = packed_reports["anyres_splash_pruned"], packed_reports["video_xla_full"]
    assert full["k"] == full["num_vision_tokens"]
    assert pruned["k"] == max(1, round(0.25 * pruned["num_vision_tokens"]))


@pytest.mark.slow
@needs_libtpu
def test_report_names_the_attention_path(packed_reports):
    att = packed_reports["anyres_splash_pruned"]["attention"]
    assert att["config"] == "splash"
    assert att["decoder_prefill"]["impl"] == "splash", att
    # the Pallas kernel was lowered for the decoder, the tower and the PPM (its scanned block)
    assert att["ppm"]["impl"] == "splash" and att["ppm"]["queries"] == \
        packed_reports["anyres_splash_pruned"]["num_vision_tokens"], att
    assert att["tpu_custom_calls"] == 3, att
    att = packed_reports["video_xla_full"]["attention"]
    assert att["decoder_prefill"]["impl"] == "xla" and att["tpu_custom_calls"] == 0
    assert "ppm" not in att     # unpruned: no PPM in the step


@needs_libtpu
def test_cli_refuses_bad_visual_and_attention():
    import subprocess
    import sys

    from tests.test_aot import ROOT, _env

    base = [sys.executable, "-m", "covipal_jax.tools.aot", "--config", "configs/tiny_ov.py",
            "--topology", "v5e-4", "--mode", "prefill", "--noflops"]
    for extra, msg in ((["--visual", "crops:3"], "anyres:VIEWS or video:FRAMES"),
                       (["--attention", "flash"], "--attention must be one of")):
        res = subprocess.run(base + extra, cwd=ROOT, env=_env(), capture_output=True,
                             text=True, timeout=600, check=False)
        assert res.returncode == 2 and msg in res.stderr, res.stderr[-2000:]
