"""Sharded training: on 8 fake CPU devices with a (data, fsdp, tensor) = (2, 2, 2) mesh, one
stage-1 step and one stage-2 step give the same PPM params (and losses) as on one device.

Two 8-device runs (in parallel) start from copies of the single-device reference run's
checkpoints, so they also restore checkpoints onto another topology: from step S1 - 1 one runs
the last stage-1 step S1; from step S1 (stage 1 complete) the other starts stage 2 with a fresh
optimizer and runs step S1 + 1; both stop there (`--stop_after`). The frozen tiny LLaVA is
initialized from the same key on both meshes (partitionable threefry: the same values).

Tolerance: the sharded step reduces in another order (batch over data x fsdp, heads / MLP over
tensor), so f32 gradients differ by ~1e-7 relative. Adam's update g / (sqrt(v) + eps) turns that
into larger parameter differences where the gradient is small: measured max |diff| 4e-9 after
the stage-1 step and 4e-5 after the first stage-2 step (a fresh optimizer: every element moves
by ~lr = 1.5e-3 whatever its gradient, so elements with a gradient of ~1e-8 are as sensitive as
it gets). So: 99% of the elements agree to 1e-6, all to atol 2e-4 / rtol 1e-4, and the steps
move the params by far more than that (a wrong sharding, e.g. a loss averaged per shard, breaks
the 1e-6 quantile at once). Parameters with an identically zero stage-1 gradient
(`train_util.ZERO_GRADIENT_PARAMS`: Adam-amplified rounding noise) are left out.
"""
from __future__ import annotations

import numpy as np
import pytest

import train_util as tu

RTOL, ATOL = 1e-4, 2e-4


@pytest.mark.slow
def test_eight_devices_match_one_device():
    ref = tu.reference_run()
    s1 = tu.STEPS[0]
    mesh = ("--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
            "--config.train.eval_batches=0")
    runs = {}
    for step in (s1, s1 + 1):                       # stage 1, then stage 2
        w = tu.workdir(f"eight_devices_{step}")
        tu.copy_checkpoint(ref, step - 1, w)
        runs[step] = (w, tu.start(w, f"--stop_after={step}", *mesh, devices=8))
    worst = {}
    for step, (w, proc) in runs.items():
        rc = proc.wait(timeout=600)
        log = open(w + ".log").read()
        assert rc == 0, log[-4000:]
        assert f"resumed from checkpoint step {step - 1}" in log
        losses = tu.step_losses(w)
        assert sorted(losses) == [step]
        np.testing.assert_allclose(losses[step], tu.step_losses(ref)[step], rtol=1e-5)
        got, want = tu.checkpoint_params(w, step), tu.checkpoint_params(ref, step)
        prev = tu.checkpoint_params(ref, step - 1)
        assert got.keys() == want.keys()
        keys = [k for k in want if k not in tu.ZERO_GRADIENT_PARAMS]
        for k in keys:
            np.testing.assert_allclose(got[k], want[k], rtol=RTOL, atol=ATOL, err_msg=k)
        diff = np.concatenate([np.abs(got[k] - want[k]).ravel() for k in keys])
        moved = np.concatenate([np.abs(want[k] - prev[k]).ravel() for k in keys])
        assert np.quantile(diff, 0.99) < 1e-6
        assert np.median(moved) > 3e-5 and np.median(moved) > 1000 * np.median(diff)
        worst[step] = float(diff.max())
    print(f"\n8 devices vs 1: max |param diff| stage-1 step {worst[s1]:.2e}, "
          f"stage-2 step {worst[s1 + 1]:.2e}")
