#!/usr/bin/env python3
"""Cloud TPU VM / pod launcher for covipal_jax: create, copy, install, run, logs, stop, delete.

Thin wrapper over `gcloud compute tpus ...`: every step is one or a few gcloud commands, and
`--dry-run` prints them instead of running them (gcloud need not be installed). The same
command runs on every host of a slice (`--worker=all`) with `COVIPAL_DISTRIBUTED=1`, which makes
the program call `jax.distributed.initialize()` (the big_vision `run_tpu.sh` pattern).

    python launch/tpu_pod.py up --name covipal --zone us-west4-a \\
        --accelerator-type v5litepod-16 --queued --spot -- \\
        --config configs/ppm_llava15_7b.py --workdir gs://BUCKET/covipal/ppm64 \\
        --config.checkpoint=gs://BUCKET/llava15_7b

Subcommands: create, copy, install, run, up (= create + copy + install + run), logs, stop,
status, ssh, delete. Options may come before or after the subcommand; everything after `--`
is passed to the program (`--module`, default `covipal_jax.train`). See launch/README.md.
Standard library only.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DISTRIBUTED_ENV = "COVIPAL_DISTRIBUTED"
REMOTE_DIR = "covipal_jax"        # relative to the worker's $HOME
REMOTE_TARBALL = "covipal_jax.tar.gz"
DEFAULT_JAX = "0.10.2"

# Runtime (software) versions for JAX per TPU generation (cloud.google.com/tpu/docs/runtimes).
RUNTIMES = {
    "v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base", "v4": "tpu-ubuntu2204-base",
    "v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite", "v6e": "v2-alpha-tpuv6e",
}


# --------------------------------------------------------------------------------------------
# Topology.
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Topology:
    accelerator_type: str  # canonical gcloud name, e.g. "v5litepod-16"
    family: str            # v2 | v3 | v4 | v5p | v5litepod | v6e
    chips: int
    hosts: int

    @property
    def chips_per_host(self) -> int:
        return self.chips // self.hosts


def parse_accelerator(accelerator_type: str) -> Topology:
    """`v5litepod-16` -> 16 chips on 4 hosts; `v4-8` -> 4 chips, 1 host; `v5p-8` -> 4 chips.

    v2/v3/v4/v5p names count TensorCores (2 per chip, 4 chips per host); v5e (`v5litepod-N`,
    alias `v5e-N`) and v6e names count chips, 4 per host in multi-host slices and up to 8 on
    a single host.
    """
    m = re.fullmatch(r"(v2|v3|v4|v5p|v5litepod|v5e|v6e)-(\d+)", accelerator_type.strip().lower())
    if not m:
        raise ValueError(f"unrecognised accelerator type {accelerator_type!r} "
                         "(expected e.g. v4-8, v5p-16, v5litepod-16, v6e-8)")
    family, n = m.group(1), int(m.group(2))
    if family == "v5e":
        family = "v5litepod"
    if family in ("v2", "v3", "v4", "v5p"):
        if n < 8 and family in ("v2", "v3") or n % 2:
            raise ValueError(f"{accelerator_type}: bad core count")
        chips = n // 2
        hosts = max(1, chips // 4)
    else:
        chips = n
        hosts = 1 if n <= 8 else n // 4
        if n > 8 and n % 4:
            raise ValueError(f"{accelerator_type}: multi-host slices have 4 chips per host")
    return Topology(f"{family}-{n}", family, chips, hosts)


def num_workers(accelerator_type: str) -> int:
    """Number of TPU VM hosts (gcloud workers) of a slice."""
    return parse_accelerator(accelerator_type).hosts


# --------------------------------------------------------------------------------------------
# Command execution.
# --------------------------------------------------------------------------------------------
class Runner:
    """Runs (or, dry, prints) commands. Only processes it starts are ever signalled."""

    def __init__(self, dry_run: bool, out=sys.stdout):
        self.dry_run = dry_run
        self.out = out
        self.background: list[subprocess.Popen] = []

    def note(self, text: str) -> None:
        print(f"# {text}", file=self.out, flush=True)

    def run(self, cmd: Sequence[str], check: bool = True, capture: bool = False) -> str:
        print(shlex.join(cmd), file=self.out, flush=True)
        if self.dry_run:
            return ""
        res = subprocess.run(list(cmd), check=check, text=True,
                             stdout=subprocess.PIPE if capture else None)
        return res.stdout or ""

    def spawn(self, cmd: Sequence[str], log_path: str, detach: bool) -> None:
        print(f"{shlex.join(cmd)} >> {shlex.quote(log_path)} 2>&1 &", file=self.out, flush=True)
        if self.dry_run:
            return
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        with open(log_path, "ab") as f:
            proc = subprocess.Popen(list(cmd), stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=detach)
        self.background.append(proc)

    def wait_background(self) -> None:
        """Waits for the spawned log followers; Ctrl-C stops them (and only them)."""
        if self.dry_run or not self.background:
            return
        try:
            for proc in self.background:
                proc.wait()
        except KeyboardInterrupt:
            for proc in self.background:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in self.background:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()


# --------------------------------------------------------------------------------------------
# gcloud command builders.
# --------------------------------------------------------------------------------------------
class Pod:
    def __init__(self, args: argparse.Namespace):
        self.a = args
        self.topo = parse_accelerator(args.accelerator_type)
        self.version = args.version or RUNTIMES[self.topo.family]
        self.qr_id = args.qr_id or f"{args.name}-qr"

    # -- shared flags
    def _common(self) -> list[str]:
        flags = [f"--zone={self.a.zone}"]
        if self.a.project:
            flags.append(f"--project={self.a.project}")
        return flags

    def _ssh_flags(self) -> list[str]:
        flags = []
        if self.a.iap:
            flags.append("--tunnel-through-iap")
        if self.a.internal_ip:
            flags.append("--internal-ip")
        return flags

    def ssh(self, command: str, worker: str | int = "all") -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.a.name, *self._common(),
                f"--worker={worker}", *self._ssh_flags(), f"--command={command}"]

    def scp(self, src: str, dst: str, recurse: bool = False) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "scp", *(["--recurse"] if recurse else []),
                src, f"{self.a.name}:{dst}", *self._common(), "--worker=all",
                *self._ssh_flags()]

    # -- create / delete / status
    def create(self) -> list[list[str]]:
        a = self.a
        if a.queued:
            alpha = ["alpha"] if a.best_effort else []
            cmd = ["gcloud", *alpha, "compute", "tpus", "queued-resources", "create", self.qr_id,
                   f"--node-id={a.name}", *self._common(),
                   f"--accelerator-type={self.topo.accelerator_type}",
                   f"--runtime-version={self.version}"]
            cmd += ["--spot"] if a.spot else []
            cmd += ["--best-effort"] if a.best_effort else []
            cmd += ["--reserved"] if a.reserved else []
            cmd += [f"--valid-until-duration={a.valid_until}"] if a.valid_until else []
            return [cmd]
        if a.best_effort or a.reserved or a.valid_until:
            raise SystemExit("--best-effort/--reserved/--valid-until need --queued")
        cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", a.name, *self._common(),
               f"--accelerator-type={self.topo.accelerator_type}", f"--version={self.version}"]
        cmd += ["--spot"] if a.spot else []
        return [cmd]

    def describe_state(self) -> list[str]:
        if self.a.queued:
            return ["gcloud", "compute", "tpus", "queued-resources", "describe", self.qr_id,
                    *self._common(), "--format=value(state.state)"]
        return ["gcloud", "compute", "tpus", "tpu-vm", "describe", self.a.name, *self._common(),
                "--format=value(state)"]

    def delete(self) -> list[str]:
        if self.a.queued:  # --force also deletes the TPU VM the request created
            return ["gcloud", "compute", "tpus", "queued-resources", "delete", self.qr_id,
                    *self._common(), "--force", "--quiet"]
        return ["gcloud", "compute", "tpus", "tpu-vm", "delete", self.a.name, *self._common(),
                "--quiet"]

    # -- remote program
    def remote_env(self) -> list[str]:
        env = [f"{DISTRIBUTED_ENV}=1", f"COVIPAL_JAX_VERSION={self.a.jax_version}"]
        for kv in self.a.env or []:
            if "=" not in kv:
                raise SystemExit(f"--env expects KEY=VALUE, got {kv!r}")
            env.append(kv)
        return env

    def program(self, program_args: Sequence[str]) -> str:
        """`env ... bash launch/run_on_worker.sh MODULE ARGS` as one shell string."""
        return shlex.join(["env", *self.remote_env(), "bash", "launch/run_on_worker.sh",
                           self.a.module, *program_args])

    def log_file(self) -> str:
        return f"logs/{self.a.run_name}.log"

    def pid_file(self) -> str:
        return f"logs/{self.a.run_name}.pid"


# --------------------------------------------------------------------------------------------
# Subcommands.
# --------------------------------------------------------------------------------------------
def cmd_create(pod: Pod, r: Runner) -> None:
    t = pod.topo
    r.note(f"{t.accelerator_type}: {t.chips} chips on {t.hosts} host(s), runtime {pod.version}")
    for cmd in pod.create():
        r.run(cmd)
    if pod.a.queued and not pod.a.no_wait:
        r.note("waiting for the queued resource to become ACTIVE (polled every 30 s)")
        cmd = pod.describe_state()
        if r.dry_run:
            r.run(cmd)
            return
        while True:
            state = r.run(cmd, capture=True).strip()
            if state == "ACTIVE":
                return
            if state in ("FAILED", "SUSPENDED"):
                raise SystemExit(f"queued resource {pod.qr_id} is {state}")
            time.sleep(30)


def cmd_copy(pod: Pod, r: Runner) -> None:
    a = pod.a
    if a.git_url:
        ref = shlex.quote(a.git_ref)
        url = shlex.quote(a.git_url)
        r.run(pod.ssh(f"if [ -d {REMOTE_DIR}/.git ]; then git -C {REMOTE_DIR} fetch --all -q; "
                      f"else git clone -q {url} {REMOTE_DIR}; fi && "
                      f"git -C {REMOTE_DIR} checkout -q {ref} && "
                      f"(git -C {REMOTE_DIR} pull -q --ff-only 2>/dev/null || true)"))
        return
    repo = os.path.abspath(a.repo)
    if a.recurse:  # plain recursive copy of the working tree (includes .git and outputs)
        r.run(pod.ssh(f"rm -rf {REMOTE_DIR}"))
        r.run(pod.scp(repo, REMOTE_DIR, recurse=True))
        return
    # Default: a tarball of the files git knows (tracked + untracked, not ignored; minus the
    # local logs/), so outputs, checkpoints and .git stay home; one scp to all workers.
    tarball = os.path.join(a.tmp_dir, f"covipal_jax-{a.name}.tar.gz")
    qrepo = shlex.quote(repo)
    r.run(["bash", "-c",
           f"git -C {qrepo} ls-files -z -co --exclude-standard -- . ':(exclude)logs' | tar -czf "
           f"{shlex.quote(tarball)} -C {qrepo} --null --ignore-failed-read -T -"])
    r.run(pod.scp(tarball, REMOTE_TARBALL))
    r.run(pod.ssh(f"mkdir -p {REMOTE_DIR} && tar -xzf {REMOTE_TARBALL} -C {REMOTE_DIR} && "
                  f"rm -f {REMOTE_TARBALL}"))


def cmd_install(pod: Pod, r: Runner) -> None:
    env = shlex.join(["env", f"COVIPAL_JAX_VERSION={pod.a.jax_version}"])
    r.run(pod.ssh(f"cd {REMOTE_DIR} && {env} bash launch/run_on_worker.sh --install-only"))


def cmd_run(pod: Pod, r: Runner, program_args: Sequence[str]) -> None:
    a = pod.a
    prog = pod.program(program_args)
    t = pod.topo
    r.note(f"running `{a.module}` on {t.hosts} worker(s) ({t.chips} chips) as run "
           f"'{a.run_name}'; remote log ~/{REMOTE_DIR}/{pod.log_file()}")
    if a.foreground:
        r.run(pod.ssh(f"cd {REMOTE_DIR} && mkdir -p logs && set -o pipefail && "
                      f"{prog} 2>&1 | tee {pod.log_file()}"))
        return
    # Detached: nohup + all stdio redirected, so the job survives the ssh session; its pid
    # goes to logs/<run>.pid for `stop`. (`;` not `&&` before nohup: `a && b &` would put the
    # cd itself in the background.)
    r.run(pod.ssh(f"cd {REMOTE_DIR} || exit 1; mkdir -p logs; "
                  f"nohup {prog} > {pod.log_file()} 2>&1 < /dev/null & "
                  f"echo $! > {pod.pid_file()}"))
    if not a.no_follow:
        cmd_logs(pod, r)


def cmd_logs(pod: Pod, r: Runner) -> None:
    """One local file per worker: <log-dir>/<name>/<run>.worker<i>.log (tail -F over ssh)."""
    a = pod.a
    workers = (range(pod.topo.hosts) if not a.workers
               else [int(w) for w in a.workers.split(",")])
    local_dir = os.path.join(a.log_dir, a.name)
    tail = ["tail", "-n", "+1", *([] if a.no_follow else ["-F"]),
            f"{REMOTE_DIR}/{pod.log_file()}"]
    r.note(f"streaming {len(workers)} worker log(s) into {local_dir}/ (Ctrl-C stops the "
           "streaming, not the job)")
    for w in workers:
        r.spawn(pod.ssh(shlex.join(tail), worker=w),
                os.path.join(local_dir, f"{a.run_name}.worker{w}.log"), detach=a.detach)
    if not a.detach:
        r.wait_background()


def cmd_stop(pod: Pod, r: Runner) -> None:
    pid = f"{REMOTE_DIR}/{pod.pid_file()}"
    r.run(pod.ssh(f"if [ -f {pid} ]; then kill $(cat {pid}) 2>/dev/null; rm -f {pid}; fi; "
                  "true"))


def cmd_status(pod: Pod, r: Runner) -> None:
    r.run(pod.describe_state())


def cmd_ssh(pod: Pod, r: Runner, program_args: Sequence[str]) -> None:
    if not program_args:
        raise SystemExit("ssh: give the remote command after `--`")
    r.run(pod.ssh(" ".join(program_args), worker=pod.a.worker))


def cmd_delete(pod: Pod, r: Runner) -> None:
    r.note("deleting: every local disk of the slice is lost; checkpoints must be on GCS")
    r.run(pod.delete())


# --------------------------------------------------------------------------------------------
# CLI.
# --------------------------------------------------------------------------------------------
def _add_common(p: argparse.ArgumentParser, suppress: bool) -> None:
    def d(value):
        return argparse.SUPPRESS if suppress else value

    g = p.add_argument_group("TPU")
    g.add_argument("--name", default=d(os.environ.get("COVIPAL_TPU_NAME")),
                   help="TPU VM (node) name [$COVIPAL_TPU_NAME]")
    g.add_argument("--zone", default=d(os.environ.get("COVIPAL_TPU_ZONE")),
                   help="e.g. us-west4-a [$COVIPAL_TPU_ZONE]")
    g.add_argument("--project", default=d(os.environ.get("CLOUDSDK_CORE_PROJECT")),
                   help="GCP project (default: gcloud's)")
    g.add_argument("--accelerator-type", default=d("v5litepod-16"),
                   help="v5litepod-16 (alias v5e-16), v4-8, v5p-8, v6e-8, ...")
    g.add_argument("--version", default=d(None), help="runtime version (default per family)")
    g.add_argument("--queued", action="store_true", default=d(False),
                   help="use a queued resource (create/status/delete)")
    g.add_argument("--qr-id", default=d(None), help="queued resource id (default NAME-qr)")
    g.add_argument("--iap", action="store_true", default=d(False),
                   help="ssh/scp with --tunnel-through-iap")
    g.add_argument("--internal-ip", action="store_true", default=d(False))
    g.add_argument("--dry-run", action="store_true", default=d(False),
                   help="print the commands instead of running them")
    g = p.add_argument_group("program")
    g.add_argument("--module", default=d("covipal_jax.train"), help="python -m MODULE")
    g.add_argument("--run-name", default=d("train"), help="names the remote log/pid files")
    g.add_argument("--env", action="append", default=d(None), metavar="KEY=VALUE",
                   help="extra environment for the program (repeatable)")
    g.add_argument("--jax-version", default=d(DEFAULT_JAX))
    g.add_argument("--log-dir", default=d("logs"), help="local folder for streamed logs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpu_pod.py", description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(parser, suppress=False)
    sub = parser.add_subparsers(dest="cmd", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        _add_common(p, suppress=True)
        return p

    def create_flags(p):
        p.add_argument("--spot", action="store_true", help="Spot VMs (preemptible, cheaper)")
        p.add_argument("--best-effort", action="store_true",
                       help="queued best-effort (gcloud alpha; legacy preemptible quota)")
        p.add_argument("--reserved", action="store_true", help="queued, from a reservation")
        p.add_argument("--valid-until", default=None, help="queued: e.g. 6h")
        p.add_argument("--no-wait", action="store_true",
                       help="queued: return without waiting for ACTIVE")

    def copy_flags(p):
        p.add_argument("--repo", default=REPO_ROOT, help="local checkout to copy")
        p.add_argument("--git-url", default=None, help="clone this URL on workers instead")
        p.add_argument("--git-ref", default="main")
        p.add_argument("--recurse", action="store_true",
                       help="scp --recurse the whole folder (with .git) instead of a tarball")
        p.add_argument("--tmp-dir", default="/tmp")

    def run_flags(p):
        p.add_argument("--foreground", action="store_true",
                       help="keep ssh attached (output interleaved) instead of nohup")
        p.add_argument("--no-follow", action="store_true",
                       help="do not stream worker logs after starting / only dump them")
        p.add_argument("--detach", action="store_true",
                       help="leave the local log streamers running in the background")
        p.add_argument("--workers", default=None, help="logs: comma-separated worker ids")

    create_flags(add("create", "create the TPU VM / queued resource"))
    copy_flags(add("copy", "copy the code to every worker"))
    add("install", "venv + pip install on every worker")
    run_flags(add("run", "run the program on every worker (args after --)"))
    p = add("up", "create + copy + install + run")
    create_flags(p)
    copy_flags(p)
    run_flags(p)
    p = add("logs", "stream every worker's log into a local file each")
    p.add_argument("--no-follow", action="store_true", help="dump the logs once")
    p.add_argument("--detach", action="store_true")
    p.add_argument("--workers", default=None)
    add("stop", "kill the run started by `run` (by its pid file) on every worker")
    add("status", "state of the TPU VM / queued resource")
    p = add("ssh", "run a command (after --) on one or all workers")
    p.add_argument("--worker", default="all")
    add("delete", "delete the TPU VM / queued resource")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    program_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, program_args = argv[:i], argv[i + 1:]
    args = build_parser().parse_args(argv)
    for required in ("name", "zone"):
        if not getattr(args, required):
            raise SystemExit(f"--{required} is required (or set $COVIPAL_TPU_"
                             f"{required.upper()})")
    if not args.dry_run and shutil.which("gcloud") is None:
        raise SystemExit("gcloud not found: install the Google Cloud CLI, or use --dry-run")
    pod = Pod(args)
    r = Runner(args.dry_run)
    if program_args and args.cmd not in ("run", "up", "ssh"):
        raise SystemExit(f"{args.cmd} takes no program arguments after --")
    if args.cmd == "create":
        cmd_create(pod, r)
    elif args.cmd == "copy":
        cmd_copy(pod, r)
    elif args.cmd == "install":
        cmd_install(pod, r)
    elif args.cmd == "run":
        cmd_run(pod, r, program_args)
    elif args.cmd == "up":
        cmd_create(pod, r)
        cmd_copy(pod, r)
        cmd_install(pod, r)
        cmd_run(pod, r, program_args)
    elif args.cmd == "logs":
        cmd_logs(pod, r)
    elif args.cmd == "stop":
        cmd_stop(pod, r)
    elif args.cmd == "status":
        cmd_status(pod, r)
    elif args.cmd == "ssh":
        cmd_ssh(pod, r, program_args)
    elif args.cmd == "delete":
        cmd_delete(pod, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
