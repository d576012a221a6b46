"""Shared pieces of every covipal_jax config.

Each `configs/<name>.py` defines `get_config(arg=None)` returning an `ml_collections.ConfigDict`.
Structural arguments go after a colon (`--config configs/llava15_7b.py:layers=2`), parsed by
`parse_arg`; scalar overrides use `--config.a.b=v` (absl `config_flags`).
"""
from __future__ import annotations

import ml_collections

from covipal_jax.sharding import LOGICAL_AXIS_RULES  # noqa: F401  (re-exported)



def parse_arg(arg: str | None, **defaults):
    """Parse `k=v,k2=v2,flag` into a ConfigDict with typed defaults (big_vision style)."""
    out = ml_collections.ConfigDict(defaults)
    if not arg:
        return out
    for item in arg.split(","):
        if not item:
            continue
        key, _, val = item.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config arg {key!r}; known: {sorted(defaults)}")
        typ = type(defaults[key])
        if not val:
            out[key] = True
        elif typ is bool:
            out[key] = val.lower() in ("1", "true", "yes")
        else:
            out[key] = typ(val)
    return out


def pruning_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        method="none",          # none | ppm | fastv | visionzip | dart | random | pool
        keep=1.0,               # ratio of n_v in (0, 1], or a whole number > 1: a token count
        positions="contiguous",  # contiguous (cumsum of the mask) | original (kept tokens' own)
        layer=2,                # K for in-LLM methods (FastV, DART)
        seed=0,                 # random method
        dart_pivots=8,
        visionzip_dominant_frac=54 / 64,
        ppm_checkpoint="",      # Orbax dir of trained PPM params (method=ppm)
        budget="global",        # packed inputs: global | per_image | per_frame top-k
    ))


def ppm_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        width=256, num_layers=2, num_heads=4, mlp_ratio=4, dropout=0.0,
        position="layout"))  # layout (any N: AnyRes, video) | table (n_v rows, format 1)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict()
    c.checkpoint = ""           # local Hugging Face LLaVA directory
    c.tokenizer = ""            # tokenizer dir ("" = the checkpoint dir; "builtin" = built in)
    c.template = "llava15"      # chat template: llava15 | qwen2 | plain
    c.text_buckets = (64, 128, 256, 512)
    c.max_new_tokens = 32
    c.batch_size = 1
    c.sampling = ml_collections.ConfigDict(dict(temperature=0.0, top_p=1.0, seed=0))
    c.pruning = pruning_config()
    c.ppm = ppm_config()
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.logical_axis_rules = LOGICAL_AXIS_RULES
    return c


def clip_vit_l_336() -> dict:
    return dict(kind="clip", image_size=336, patch_size=14, hidden_size=1024,
                intermediate_size=4096, num_layers=24, num_heads=16, layer_norm_eps=1e-5,
                act="quick_gelu", feature_layer=-2, select_strategy="default")


def siglip_so400m_384() -> dict:
    # LLaVA-OneVision drops SigLIP's last layer (26 of 27 kept) and uses hidden_states[-1].
    return dict(kind="siglip", image_size=384, patch_size=14, hidden_size=1152,
                intermediate_size=4304, num_layers=26, num_heads=16, layer_norm_eps=1e-6,
                act="gelu_tanh", feature_layer=-1, select_strategy="full")


def vicuna(size: str) -> dict:
    dims = {"7b": (4096, 11008, 32, 32), "13b": (5120, 13824, 40, 40)}[size]
    d, f, layers, heads = dims
    return dict(kind="llama", vocab_size=32064, hidden_size=d, intermediate_size=f,
                num_layers=layers, num_heads=heads, num_kv_heads=heads, head_dim=d // heads,
                rope_theta=10000.0, rms_norm_eps=1e-5, qkv_bias=False,
                tie_word_embeddings=False, max_position_embeddings=4096)


def qwen2_7b() -> dict:
    return dict(kind="qwen2", vocab_size=152128, hidden_size=3584, intermediate_size=18944,
                num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
                rope_theta=1000000.0, rms_norm_eps=1e-6, qkv_bias=True,
                tie_word_embeddings=False, max_position_embeddings=32768)


def train_config() -> ml_collections.ConfigDict:
    """`config.train` of the PPM trainer (`python -m covipal_jax.train`); see train/loop.py."""
    return ml_collections.ConfigDict(dict(
        stage=0,                # 1 | 2 runs that stage alone; 0: run `stages`
        stages=(1,),            # e.g. (1, 2): stage 2 starts from the stage-1 params
        steps=(1000,),          # steps per stage (same length as `stages`)
        batch_size=8,           # global batch (divisible by data x fsdp and by the hosts)
        keep=0.25,              # r: keep ratio (float) or count (int) for top-k / budget
        lr=1e-3, lr_stage2=0.0,  # peak learning rates (0: stage 2 uses `lr`)
        warmup_steps=50, end_lr_ratio=0.1, weight_decay=0.01, clip_norm=1.0, b1=0.9, b2=0.999,
        frozen_dtype="bfloat16",  # the frozen LLaVA's params (PPM + optimizer stay f32)
        guide_layer=16,         # l_g (negative: from the end)
        label_queries="text_after_image",  # text_after_image | all | last
        label_answer_queries=True,  # the teacher-forced answer tokens count as queries
        loss="mse",             # stage 1: mse | kl | pairwise | listwise
        lambda_kl=1.0, lambda_budget=10.0, stage2_hard=False,  # stage 2 (see objectives.py)
        init_from="",           # an exported PPM dir to start from (e.g. stage 2 alone)
        seed=0,
        log_every=10, save_every=100, keep_checkpoints=3, async_checkpoint=True,
        eval_every=0, eval_batches=0,  # top-k recall on `data.eval_split` (0: off)
        progress=True,          # tqdm bar
        inject_nan_step=-1,     # fault injection (tests): NaN loss at this global step
    ))


def data_config() -> ml_collections.ConfigDict:
    """`config.data`: the TFDS source of the trainer; see data/pipeline.py."""
    return ml_collections.ConfigDict(dict(
        kind="synthetic",       # synthetic | llava
        name="tiny",            # synthetic: TFDS config (tiny | demo | demo96); llava: a name
        split="train", eval_split="",  # eval_split: synthetic only (top-k recall, train.eval_*)
        dir="",                 # TFDS data dir ("" = --data_dir or <workdir>/data)
        json="", images="",     # llava: LLaVA-format .json/.jsonl and the image folder
        max_len=64,             # prompt + answer tokens (left-padded; longer examples weight 0)
        shuffle=True, drop_remainder=True, seed=0, prefetch=2,
    ))


def ppm_7b_training(c: ml_collections.ConfigDict, *, stages: str, steps1: int, steps2: int,
                    keep: float, guide_fraction: float, data_name: str, max_len: int
                    ) -> ml_collections.ConfigDict:
    """The PPM-training block shared by the 7B PPM configs: frozen LLaVA in bf16, full remat
    (stage 2 backpropagates through every decoder layer), PPM d=512 x 2 layers, AdamW
    5e-4 / 1e-4, batch 32, FSDP over all devices, the guide layer at `guide_fraction` of the
    decoder depth. Fills `c.train`, `c.data`, `c.ppm`, `c.mesh`, `c.pruning` in place."""
    c.model["remat_policy"] = "full"
    c.train = train_config()
    c.data = data_config()
    t = c.train
    t.stages = tuple(int(s) for s in stages)
    t.steps = tuple(steps1 if s == 1 else steps2 for s in t.stages)
    t.batch_size = 32
    t.keep = float(keep)
    t.lr = 5e-4
    t.lr_stage2 = 1e-4
    t.warmup_steps = 200
    t.frozen_dtype = "bfloat16"
    t.guide_layer = max(1, round(c.model["text"]["num_layers"] * guide_fraction))
    t.log_every = 10
    t.save_every = 500
    t.keep_checkpoints = 3
    c.ppm.width = 512
    c.ppm.num_heads = 8
    c.ppm.num_layers = 2
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.data.kind = "llava"
    c.data.name = data_name
    c.data.max_len = max_len
    c.pruning.method = "ppm"
    c.pruning.keep = t.keep
    return c


def llava15_config(size: str, arg: str | None) -> ml_collections.ConfigDict:
    """LLaVA-1.5 (CLIP ViT-L/14-336 + Vicuna) of a given size; args `layers=N,dtype=...`."""
    a = parse_arg(arg, layers=0, dtype="bfloat16")
    c = base_config()
    text = vicuna(size)
    if a.layers:
        text["num_layers"] = a.layers
    c.model = dict(vision=clip_vit_l_336(), text=text, image_token_id=32000,
                   dtype=a.dtype, param_dtype=a.dtype, scan_layers=True, remat_policy="none",
                   attention="auto")
    c.template = "llava15"
    return c
