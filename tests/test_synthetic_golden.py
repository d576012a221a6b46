"""Regression guard: the synthetic VQA generator's output is bit-identical to a recorded version.

The expected digests were computed on main at e0d37ad (before `data/synthetic/task.py` was split
into config / vocab / baselines / render / questions / task) by running the `_digest` /
`_split_digest` code below with the same configs, splits, seeds and counts, and pasted here.
If a deliberate change to the generator alters the data, recompute them the same way and say so
in the commit: every stored dataset, checkpoint and demo result depends on this stream.
"""
from __future__ import annotations

import hashlib
import json

import pytest

from covipal_jax.data.synthetic import task as S

EXPECTED = {
    ("default", "train"): "b45f11306479da435d72ddd42c7095354e18020f8603f720e2ad7d5fa0463fdc",
    ("default", "validation"): "438a4642ea0b27becc122fd95dd9149e8ea1d3efd24554d3e7ec90cc4a9adada",
    ("default", "test"): "e20f46d5b429e6f316502706c455f81f61956ae81d5b167adc78dcb15ee99660",
    ("paraphrase", "train"): "6e850ad9b6603ab9a160eed4f1ac5a0f28aa03563628857677027e16bee31ee8",
    ("paraphrase", "validation"):
        "011c347f2dc333fe653153a1d146a67f91bee7e455fb94024919fe27365affbe",
    ("paraphrase", "test"): "ac13b6f7c25191ca0e54131f237d757e14ef1123e4cc51f3b07998a8b5d00964",
}
EXPECTED_MAKE_EXAMPLE = "ce27e480c7070a7890ea660ca4d34e4945c9f5e53a076a8ff979032ef9e2a14f"
EXPECTED_VOCAB = "e204d4f716a8638065c57bbd1a176d52afe55915794b53fb8fac93f1eaecfed9"


def _configs() -> dict[str, S.SyntheticConfig]:
    return {
        "default": S.SyntheticConfig(),
        "paraphrase": S.SyntheticConfig(templates=S.PARAPHRASE_TEMPLATES, n_heldout=0,
                                        image_size=32),
    }


def _digest(ex: dict) -> str:
    """sha256 of the image bytes + shape and of every other field as sorted JSON."""
    h = hashlib.sha256()
    h.update(ex["image"].tobytes())
    h.update(str(ex["image"].shape).encode())
    rest = {k: ex[k] for k in ("question", "answer", "qtype", "objects", "queried", "targets")}
    h.update(json.dumps(rest, sort_keys=True, default=list).encode())
    return h.hexdigest()


def _split_digest(cfg: S.SyntheticConfig, split: str) -> str:
    """sha256 over the digests of examples 0..24 of `split` at seed 3."""
    h = hashlib.sha256()
    for ex in S.generate(split, 25, seed=3, cfg=cfg):
        h.update(_digest(ex).encode())
    return h.hexdigest()


@pytest.mark.parametrize("name,split", sorted(EXPECTED))
def test_generate_is_bit_identical(name, split):
    assert _split_digest(_configs()[name], split) == EXPECTED[(name, split)]


def test_make_example_and_vocabulary_are_bit_identical():
    assert _digest(S.make_example("test", 7, seed=1)) == EXPECTED_MAKE_EXAMPLE
    assert hashlib.sha256(" ".join(S.vocabulary()).encode()).hexdigest() == EXPECTED_VOCAB


def test_digest_detects_a_one_pixel_change():
    ex = S.make_example("train", 0, seed=3)
    before = _digest(ex)
    ex["image"] = ex["image"].copy()
    ex["image"][0, 0, 0] ^= 1
    assert _digest(ex) != before
