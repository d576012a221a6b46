"""Preemption: SIGKILL the trainer after it has written a checkpoint, run the same command
again: it resumes from the last finished checkpoint (a save cut short leaves only a temporary
directory, ignored and cleaned up), and every loss from there on, and the exported PPM, equal
those of the uninterrupted reference run."""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

import train_util as tu

KILL_AFTER = 5  # kill once checkpoint >= 5 is complete (stage 1 runs to step 20)


def _finished_checkpoints(workdir: str) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted(int(n) for n in os.listdir(d) if n.isdigit())


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted():
    tu.start_reference()
    w = tu.workdir("killed")
    proc = tu.start(w)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = _finished_checkpoints(w)
        if done and done[-1] >= KILL_AFTER:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = _finished_checkpoints(w)
    total = sum(tu.STEPS)
    assert at_kill and KILL_AFTER <= at_kill[-1] < total

    r = tu.run(w)                                     # the same command again
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    resumed = [int(line.split()[4]) for line in r.stdout.splitlines()
               if line.startswith("resumed from checkpoint step")]
    assert resumed and resumed[0] >= at_kill[-1]
    start = resumed[0]

    ref = tu.reference_run()
    got, want = tu.step_losses(w), tu.step_losses(ref)
    after = [s for s in want if s > start]
    assert after == list(range(start + 1, total + 1))
    for s in after:
        np.testing.assert_allclose(got[s], want[s], rtol=1e-6, err_msg=f"step {s}")
    a, b = tu.checkpoint_params(w, total), tu.checkpoint_params(ref, total)
    for k in b:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)
    assert os.path.exists(os.path.join(w, "ppm", "config.json"))
    print(f"\nkilled with checkpoints {at_kill[0]}..{at_kill[-1]}, resumed from {start}; "
          f"losses of steps {start + 1}..{total} equal the uninterrupted run's")
