"""Sharded training: on 8 fake CPU devices with a (data, fsdp, tensor) = (2, 2, 2) mesh, the
last stage-1 step and the first stage-2 step give the same PPM params (and losses) as on one
device.

The 8-device run starts from a copy of the single-device reference run's checkpoint at step
S1 - 1 (so it also restores a checkpoint onto another topology), runs step S1 (stage 1) and
step S1 + 1 (stage 2, from its own stage-1 params) and stops (`--stop_after`). The frozen tiny
LLaVA is initialized from the same key on both meshes (partitionable threefry: same values).

Tolerance: the sharded step reduces in another order (batch over data x fsdp, heads / MLP over
tensor), f32 rounding differs by ~1e-7 relative; Adam divides by sqrt(v), which amplifies it for
parameters whose gradient is near 0, hence rtol 1e-4 / atol 2e-5 on params, and the step
must move the params by 20x the largest difference (a wrong sharding, e.g. a loss averaged per
shard, gives differences of the order of the update itself).
"""
from __future__ import annotations

import numpy as np

import train_util as tu

RTOL, ATOL = 1e-4, 2e-5


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
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=RTOL, atol=ATOL, err_msg=k)
        worst[step] = max(float(np.max(np.abs(got[k] - want[k]))) for k in want)
        moved = max(float(np.max(np.abs(want[k] - tu.checkpoint_params(ref, step - 1)[k])))
                    for k in want)
        # The step moved the params by far more than the 8-vs-1 difference.
        assert moved > 10 * ATOL and moved > 20 * worst[step], (moved, worst[step])
    print(f"\n8 devices vs 1: max |param diff| stage-1 step {worst[s1]:.2e}, "
          f"stage-2 step {worst[s1 + 1]:.2e}")
