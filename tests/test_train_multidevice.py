"""Sharded training: on 8 fake CPU devices with a (data, fsdp, tensor) = (2, 2, 2) mesh, the
last stage-1 step and the first stage-2 step give the same PPM params (and losses) as on one
device.

The 8-device run starts from a copy of the single-device reference run's checkpoint at step
S1 - 1 (so it also restores a checkpoint onto another topology), runs step S1 (stage 1) and
step S1 + 1 (stage 2, from its own stage-1 params) and stops (`--stop_after`). The frozen tiny
LLaVA is initialized from the same key on both meshes (partitionable threefry: same values).

Tolerance: the sharded step reduces in another order (batch over data x fsdp, heads / MLP over
tensor), so f32 gradients differ by ~1e-7 relative. Adam's update g / (sqrt(v) + eps) turns that
into larger parameter differences only where the gradient is ~0 (e.g. the PPM head bias under
the shift-invariant listwise loss, key biases under softmax): measured max |diff| 7e-6 after
the stage-1 step and 2e-5 after the first stage-2 step (whose update is +-1.5e-3 per element).
So: 99% of the elements agree to 1e-6, all to 1e-4 (atol) / 1e-4 (rtol), and the steps move
the params by far more than that (a wrong sharding, e.g. a loss averaged per shard, breaks the
1e-6 quantile at once).
"""
from __future__ import annotations

import numpy as np

import train_util as tu

RTOL, ATOL = 1e-4, 1e-4


def test_eight_devices_match_one_device():
    ref = tu.reference_run()
    s1 = tu.STEPS[0]
    w = tu.workdir("eight_devices")
    tu.copy_checkpoint(ref, s1 - 1, w)
    r = tu.run(w, f"--stop_after={s1 + 1}", "--config.mesh.data=2", "--config.mesh.fsdp=2",
               "--config.mesh.tensor=2", "--config.train.eval_batches=0", devices=8)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert f"resumed from checkpoint step {s1 - 1}" in r.stdout
    losses, ref_losses = tu.step_losses(w), tu.step_losses(ref)
    assert sorted(losses) == [s1, s1 + 1]
    worst = {}
    for step in (s1, s1 + 1):                       # stage 1, then stage 2
        np.testing.assert_allclose(losses[step], ref_losses[step], rtol=1e-5)
        got, want = tu.checkpoint_params(w, step), tu.checkpoint_params(ref, step)
        prev = tu.checkpoint_params(ref, step - 1)
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=RTOL, atol=ATOL, err_msg=k)
        diff = np.concatenate([np.abs(got[k] - want[k]).ravel() for k in want])
        moved = np.concatenate([np.abs(want[k] - prev[k]).ravel() for k in want])
        assert np.quantile(diff, 0.99) < 1e-6
        assert np.median(moved) > 3e-5 and np.median(moved) > 1000 * np.median(diff)
        worst[step] = float(diff.max())
    print(f"\n8 devices vs 1: max |param diff| stage-1 step {worst[s1]:.2e}, "
          f"stage-2 step {worst[s1 + 1]:.2e}")
