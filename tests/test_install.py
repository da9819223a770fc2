"""scripts/install.sh chooses what to install from the machine: checked with --dry-run,
which prints the commands and creates or installs nothing (no network, about 0.1 s each).
Also: CI runs README's commands as README writes them."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "install.sh"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def dry_run(tmp_path, *args, gpu=False, **env) -> str:
    """The script's --dry-run output on a machine with or without an NVIDIA GPU (a fake
    nvidia-smi that works or fails), outside any venv unless env says otherwise."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    smi = fake_bin / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: Fake GPU'\n" if gpu else "#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    smi.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CI") and not k.startswith("DIFFSTREAM_")}
    base["PATH"] = f"{fake_bin}{os.pathsep}{base.get('PATH', '')}"
    base["DIFFSTREAM_VENV"] = str(tmp_path / "venv")  # a venv that does not exist yet
    base.update(env)
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], cwd=ROOT, env=base,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "venv").exists()  # a dry run creates nothing
    return result.stdout


def commands(output: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in output.splitlines() if line.startswith("+ ")]


def torch_install(output: str) -> list[str]:
    (cmd,) = [c for c in commands(output) if "torch==2.13.0" in c]
    return cmd


def test_help_says_what_each_part_adds():
    result = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for fragment in ("--dev", "--dry-run", ".[server]", ".[dev]", "diffstream serve", "pytest", "chromium",
                     "nvidia-smi", CPU_INDEX, "DIFFSTREAM_TORCH_INDEX", "VIRTUAL_ENV"):
        assert fragment in result.stdout, fragment
    bad = subprocess.run(["bash", str(SCRIPT), "--nope"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown option --nope" in bad.stderr


def test_cpu_machine_gets_a_venv_and_the_cpu_build_and_no_test_tools(tmp_path):
    out = dry_run(tmp_path)
    cmds = commands(out)
    assert cmds[0][1:] == ["-m", "venv", str(tmp_path / "venv")]
    python = str(tmp_path / "venv" / "bin" / "python")
    assert all(cmd[0] == python for cmd in cmds[1:])  # everything goes into that venv
    torch = torch_install(out)
    assert torch[torch.index("--index-url") + 1] == CPU_INDEX
    assert torch[torch.index("--timeout") + 1] == "10" and "--retries" in torch
    assert "torch: CPU build, asking " + CPU_INDEX in out
    assert [cmd[-2:] for cmd in cmds if "-e" in cmd] == [["-e", ".[server]"]]
    assert "[dev]" not in out and "chromium" not in out and "apt-get" not in out


def test_gpu_machine_gets_the_default_index_build(tmp_path):
    out = dry_run(tmp_path, gpu=True)
    torch = torch_install(out)
    assert "--index-url" not in torch and "CUDA build" in out
    assert "[dev]" not in out


@pytest.mark.parametrize("how", [("--dev",), ()])
def test_dev_or_ci_adds_test_tools_and_ci_skips_the_cpu_index(tmp_path, how):
    env = {} if how else {"CI": "true"}
    out = dry_run(tmp_path, *how, **env)
    assert [cmd[-2:] for cmd in commands(out) if "-e" in cmd] == [["-e", ".[dev]"]]
    assert "chromium:" in out  # installed, already there, or why not
    torch = torch_install(out)
    if env:
        assert "--index-url" not in torch and "CI=true: no CPU-index attempt" in out
    else:
        assert CPU_INDEX in torch


def test_an_active_venv_is_used_and_the_torch_index_can_be_overridden(tmp_path):
    venv = tmp_path / "active"
    out = dry_run(tmp_path, VIRTUAL_ENV=str(venv), DIFFSTREAM_TORCH_INDEX="https://example.invalid/whl/cu126")
    cmds = commands(out)
    assert not any("venv" in cmd[1:3] for cmd in cmds)
    assert all(cmd[0] == str(venv / "bin" / "python") for cmd in cmds)
    torch = torch_install(out)
    assert torch[torch.index("--index-url") + 1] == "https://example.invalid/whl/cu126"
    plain = torch_install(dry_run(tmp_path, DIFFSTREAM_TORCH_INDEX="skip"))
    assert "--index-url" not in plain


def test_ci_runs_the_readme_commands_as_written():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Two commands"):readme.index("## Using it")]
    first, test = [line.strip() for line in section.splitlines() if line.startswith("    ")][:2]
    assert first.startswith("bash scripts/install.sh && .venv/bin/diffstream run ")
    assert test == ".venv/bin/python -m pytest -q"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "bash scripts/install.sh --dev" in ci and test in ci and "bash scripts/check_fresh.sh" in ci
    assert ci.index("bash scripts/install.sh --dev") < ci.index(test)
    # check_fresh.sh runs the part after the install from README itself.
    assert "PREFIX='    bash scripts/install.sh && '" in (ROOT / "scripts" / "check_fresh.sh").read_text()
    assert ".venv/" in (ROOT / ".gitignore").read_text().splitlines()
