"""Every shell command of README.md and launch/README.md runs as written, unless it needs what
CI does not have (real weights, a cloud project, a TPU, hours).

Commands are the lines of ```bash blocks (continuations joined, `&&` chains split, comment lines
dropped, option fragments starting with `--` skipped) and inline `python ...` / `pip ...` code
spans. Each is classified by a trailing `# needs: <what>` comment in the README, or else by
docs/commands.txt (`STATUS :: COMMAND`); an unclassified command fails the test. Statuses:
- `run`: run here (fast), in the repository root;
- `slow`: run here under the slow marker;
- `venv`: a `pip install` run in a throwaway venv (`--system-site-packages`, offline:
  PIP_NO_INDEX=1, no build isolation) on a copy of the checkout (slow marker);
- `mention`: a program named in prose, not a command;
- `needs: <what>`: not run (weights, cloud, cuda, long, placeholder, fix).
`/tmp/` in a command is mapped to a fresh temporary directory.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READMES = ("README.md", os.path.join("launch", "README.md"))
TABLE = os.path.join(ROOT, "docs", "commands.txt")
_FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.S | re.M)
_INLINE = re.compile(r"`((?:python|pip) [^`]+)`")
_MARKER = re.compile(r"\s+#\s*needs:\s*(.+)$")


def _strip_comment(line: str) -> tuple[str, str | None]:
    """(command, `needs` marker or None); a trailing `# ...` comment is removed."""
    m = _MARKER.search(line)
    if m:
        return line[:m.start()].rstrip(), m.group(1).strip()
    out, quote = [], None
    for i, ch in enumerate(line):   # cut at a '#' outside quotes, after whitespace
        if ch in "'\"":
            quote = None if quote == ch else (quote or ch)
        if ch == "#" and quote is None and (i == 0 or line[i - 1].isspace()):
            break
        out.append(ch)
    return "".join(out).rstrip(), None


def readme_commands() -> list[tuple[str, str, str | None]]:
    """[(file, command, marker)] in README order."""
    found = []
    for name in READMES:
        text = open(os.path.join(ROOT, name), encoding="utf-8").read()
        for m in _FENCE.finditer(text):
            if m.group(2) not in ("bash", "sh", "shell"):
                continue
            body = re.sub(r"\\\n\s*", "", m.group(3))      # join continuation lines
            for line in body.splitlines():
                cmd, marker = _strip_comment(line.strip())
                if not cmd or cmd.startswith("--"):
                    continue
                for part in cmd.split(" && "):
                    found.append((name, part.strip(), marker))
        prose = _FENCE.sub("", text)      # inline spans only: fenced blocks are read above
        for m in _INLINE.finditer(re.sub(r"\n", " ", prose)):
            found.append((name, m.group(1).strip(), None))
    return found


def table() -> dict[str, str]:
    out = {}
    for line in open(TABLE, encoding="utf-8"):
        if line.strip() and not line.startswith("#"):
            status, _, cmd = line.rstrip("\n").partition(" :: ")
            out[cmd.strip()] = status.strip()
    return out


def classified() -> list[tuple[str, str, str]]:
    t = table()
    return [(f, c, f"needs: {marker}" if marker else t.get(c, "")) for f, c, marker in
            readme_commands()]


def _ids(items):
    return [re.sub(r"\W+", "_", c)[:60] for _, c, _ in items]


def test_every_command_is_classified():
    missing = [f"{f}: {c}" for f, c, s in classified() if not s]
    assert not missing, ("README commands with no `# needs: ...` marker and no line in "
                         "docs/commands.txt (`STATUS :: COMMAND`):\n" + "\n".join(missing))
    bad = [s for _, _, s in classified()
           if s not in ("run", "slow", "venv", "mention") and not s.startswith("needs: ")]
    assert not bad, bad
    stale = set(table()) - {c for _, c, _ in readme_commands()}
    assert not stale, f"docs/commands.txt lists commands no README has: {sorted(stale)}"


def _env(tmp) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVIPAL_")}
    env["PYTHONPATH"] = ROOT
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(str(tmp), "xla")
    return env


def _run_here(cmd: str, tmp_path, timeout: int) -> None:
    cmd = cmd.replace("/tmp/", f"{tmp_path}/")
    r = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=_env(tmp_path), capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}\n-> {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"


FAST = [x for x in classified() if x[2] == "run"]
SLOW = [x for x in classified() if x[2] == "slow"]
VENV = [x for x in classified() if x[2] == "venv"]


@pytest.mark.parametrize("where,cmd,status", FAST, ids=_ids(FAST))
def test_command_runs(where, cmd, status, tmp_path):
    _run_here(cmd, tmp_path, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("where,cmd,status", SLOW, ids=_ids(SLOW))
def test_slow_command_runs(where, cmd, status, tmp_path):
    _run_here(cmd, tmp_path, timeout=1200)


@pytest.mark.slow
@pytest.mark.parametrize("where,cmd,status", VENV, ids=_ids(VENV))
def test_install_command_runs_in_a_venv(where, cmd, status, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache", "workdir*", "logs"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # Offline: every pinned package is already installed (tests/test_packaging.py checks it).
    env.update(PATH=f"{venv}/bin{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv),
               PIP_NO_INDEX="1", PIP_NO_BUILD_ISOLATION="0", PIP_DISABLE_PIP_VERSION_CHECK="1")
    r = subprocess.run(["bash", "-c", cmd.replace("pip install", "python -m pip install", 1)
                        if cmd.startswith("pip ") else cmd], cwd=src, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    where_ = subprocess.run([str(venv / "bin" / "python"), "-c",
                             "import covipal_jax; print(covipal_jax.__file__)"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, check=True).stdout
    assert where_.startswith(str(src)), where_     # the editable install of the checkout
