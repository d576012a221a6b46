"""Train CoViPAL's PPM for LLaVA-OneVision-7B (the paper's model) on LLaVA-format data.

    python -m covipal_jax.train --config configs/ppm_llava_ov_7b.py --workdir /ckpt/ppm_ov7b \
        --config.checkpoint=/models/llava-onevision-qwen2-7b-ov-hf \
        --config.data.json=/data/llava_ov_si.json --config.data.images=/data/images

As far as the paper is known (shared/reference/covipal_paper.md):
- guide layer 16 of Qwen2-7B's 28 (the paper's preliminary study on LLaVA-OneVision-7B);
- stage 1: MSE between the PPM's scores and the guide layer's attention to each vision token,
  summed over heads and over the query rows `label_queries` (the paper's query range is
  illegible; "all", every real token from the image on, vision and text, is the reviews'
  reading: "the total attention paid to vision token k by the other tokens, including visual and
  text tokens"; `queries=text_after_image|last` are the options);
- stage 2: the answer LM loss only (`kl=0, budget=0`: the paper preset; the KL-to-unpruned and
  keep-budget terms of covipal_jax's stage 2 stay options, e.g. `kl=1,budget=10`). With no
  budget term the soft keep probabilities would all drift to 1 (the unpruned model has the best
  LM loss), so the preset trains through the hard top-k keep set (`stage2_hard`, straight-through:
  the LM loss is that of the pruned model); `hard=0` restores the soft forward.
- reserve ratio r = 0.25 (the paper reports r = 0.5 and 0.25; `keep=0.5`).

Input: the trainer's pipeline feeds one base-resolution view per example (384 x 384, 729 vision
tokens; the `covipal_llava` source keeps single-image records, multi-image and video records are
counted and skipped). Packed rows train on the other kinds (`--config.data.packed=anyres`
with `data.num_views`, `=video` with `data.num_frames`, `=multi` with `data.max_images`; the
README's "AnyRes images, several images, video"). The PPM's positional input describes any layout (crop / frame, row,
column), so the PPM trained here runs on AnyRes images and video at inference; the model config
itself is LLaVA-OneVision's AnyRes-Max-9 (configs/llava_ov_7b.py).

The frozen LLaVA is cast to bf16; the PPM (d=512, 2 layers) and AdamW state are f32. Mesh: FSDP
over all devices. Hyperparameters other than the above are covipal_jax's (the paper's are not
known): those of configs/ppm_llava15_7b.py.
Args (after a colon): `layers=N` truncates the decoder (smoke tests; the guide layer scales
with it), `stages=1|2|12`, `steps1=`, `steps2=`, `keep=`, `queries=`, `kl=`, `budget=`, `hard=`.
"""
from covipal_jax.configs import common, llava_ov_7b

PAPER_GUIDE_LAYER, PAPER_LAYERS = 16, 28


def get_config(arg=None):
    a = common.parse_arg(arg, layers=0, stages="12", steps1=5000, steps2=2000, keep=0.25,
                         queries="all", kl=0.0, budget=0.0, hard=True)
    c = llava_ov_7b.get_config(f"layers={a.layers}" if a.layers else None)
    # max_len: Qwen2 chat template (system turn) + question + answer
    common.ppm_7b_training(c, stages=a.stages, steps1=a.steps1, steps2=a.steps2, keep=a.keep,
                           guide_fraction=PAPER_GUIDE_LAYER / PAPER_LAYERS,
                           data_name="llava_onevision_si_local", max_len=256)
    t = c.train
    t.loss = "mse"
    t.label_queries = a.queries
    t.lambda_kl = float(a.kl)
    t.lambda_budget = float(a.budget)
    t.stage2_hard = bool(a.hard)
    return c
