"""The main job (`python -m covipal_jax.demo --workdir DIR`): a tiny LLaVA trained from scratch on
the synthetic VQA set, its PPM (stages 1 and 2), and the pruning sweep on the held-out split.

Sizes are chosen for 2 CPU cores and 15 minutes in all; `--quick` merges `config.quick` (per-section
overrides) for a reduced run (tests). See `covipal_jax/demo_lib.py` for what each stage does.
Args: `image=64` (or 96: 144 vision tokens), `patch=8`.
"""
from configs import common
from covipal_jax.data import synthetic


def get_config(arg=None):
    a = common.parse_arg(arg, image=64, patch=8)
    c = common.base_config()
    c.seed = 0

    # The synthetic task: one object per patch (cell = patch), 2-4 objects per image.
    c.task = dict(image_size=a.image, cell_size=a.patch, object_size=(7, 8), n_objects=(2, 4),
                  shapes=("circle", "square", "triangle", "cross", "ring"),
                  colors=("red", "green", "blue", "yellow", "purple"),
                  n_heldout=5, heldout_seed=0, heldout_distractors_in_train=True)
    c.demo = dict(
        n_train=20000,          # training images (each with 1 + extra_turns questions)
        n_dev=400,              # held-out-combination questions for the pretraining stop rule
        n_validation=400,       # i.i.d. questions (reported, never used for decisions)
        n_test=1000,            # the held-out split the sweep reports
        extra_turns=5,          # extra questions per training image (multi-turn, LLaVA style)
        train_max_len=84,       # tokens of a multi-turn training sequence
        progress=True,
    )
    vocab = 64  # >= BuiltinTokenizer(synthetic.vocabulary(task)).vocab_size (checked at run time)
    c.model = dict(
        vision=dict(kind="clip", image_size=a.image, patch_size=a.patch, hidden_size=64,
                    intermediate_size=128, num_layers=3, num_heads=4, layer_norm_eps=1e-5,
                    act="quick_gelu", feature_layer=-2, select_strategy="default"),
        text=dict(kind="llama", vocab_size=vocab, hidden_size=64, intermediate_size=160,
                  num_layers=3, num_heads=4, num_kv_heads=4, head_dim=16, rope_theta=10000.0,
                  rms_norm_eps=1e-6, qkv_bias=False, tie_word_embeddings=False,
                  max_position_embeddings=512),
        image_token_id=4, dtype="float32", param_dtype="float32", scan_layers=True,
        remat_policy="none")
    c.tokenizer = "builtin"
    c.template = "plain"
    c.text_buckets = (20,)      # evaluation prompts (the longest question + cue fits)

    # Step 2: the LLaVA itself, every parameter trained, answer-only LM loss.
    c.pretrain = dict(steps=1500, batch_size=32, lr=1e-3, warmup_steps=50, end_lr_ratio=0.05,
                      weight_decay=0.05, clip_norm=1.0, b2=0.98, eval_every=250, target=0.97,
                      min_steps=0, seed=0, init="fan_in")

    # Step 3: the PPM (covipal_jax.train.loop), the LLaVA frozen.
    c.train = common.train_config()
    c.data = common.data_config()
    t = c.train
    t.stages = (1, 2)
    t.steps = (150, 150)
    t.batch_size = 32
    t.keep = 0.25
    t.lr = 3e-3
    t.lr_stage2 = 1e-3
    t.warmup_steps = 20
    t.frozen_dtype = "float32"
    t.guide_layer = 2           # of 3 decoder layers
    t.log_every = 50
    t.save_every = 1000
    t.keep_checkpoints = 1
    t.async_checkpoint = False
    c.data.max_len = 20
    c.data.prefetch = 2
    c.ppm.width = 64
    c.ppm.num_layers = 2
    c.ppm.num_heads = 4
    c.ppm.mlp_ratio = 2
    c.pruning.method = "ppm"
    c.pruning.keep = t.keep

    # Step 4: the sweep.
    c.eval = dict(methods=("ppm", "fastv", "visionzip", "dart", "random", "pool"),
                  ratios=(1.0, 0.5, 0.25, 0.125, 0.0625), batch_size=250, in_llm_layer=2)

    # --quick: a reduced run for tests (merged into this config, section by section).
    c.quick = dict(demo=dict(n_train=2000, n_dev=100, n_validation=100, n_test=200),
                   pretrain=dict(steps=60, eval_every=0, warmup_steps=10),
                   train=dict(steps=(10, 10)), eval=dict(batch_size=100))
    _ = synthetic  # the task fields are synthetic.SyntheticConfig's
    return c
