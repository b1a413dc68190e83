"""What a newcomer meets first: the command line, where results go, the licence (issue 10, part 5)."""

import subprocess
import sys
from pathlib import Path

import pytest

from fastreg import __main__ as cli

ROOT = Path(__file__).resolve().parents[1]


def test_program_name_is_what_the_user_typed():
    assert cli.program_name("/venv/bin/fastreg") == "fastreg"
    assert cli.program_name("/repo/fastreg/__main__.py") == "python -m fastreg"


def test_help_is_plain_text(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and "python -m fastreg" in text
    assert "info" in text and "build" in text and "FASTREG_BACKEND" in text


def test_info_shows_the_backend_environment_variable(monkeypatch, capsys):
    monkeypatch.delenv("FASTREG_BACKEND", raising=False)
    assert cli.main(["info", "--no-build"]) == 0
    assert "FASTREG_BACKEND: not set" in capsys.readouterr().out
    monkeypatch.setenv("FASTREG_BACKEND", "torch")
    assert cli.main(["info", "--no-build"]) == 0
    assert "FASTREG_BACKEND=torch" in capsys.readouterr().out
    monkeypatch.setenv("FASTREG_BACKEND", "bogus")
    assert cli.main(["info", "--no-build"]) == 1
    out = capsys.readouterr().out
    assert "FASTREG_BACKEND='bogus': invalid" in out and "environment variable" in out


def _ignored(path):
    out = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT, capture_output=True)
    return out.returncode == 0


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the git checkout")
def test_quick_runs_write_where_git_ignores_them():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import digits
    finally:
        sys.path.pop(0)
    assert digits.parse_args(["--quick"]).out == digits.QUICK_OUT
    assert digits.parse_args([]).out == digits.DEFAULT_OUT
    assert _ignored(digits.QUICK_OUT / "results.json") and not _ignored(digits.DEFAULT_OUT / "results.json")

    import torch

    from bench import run

    cpu = torch.device("cpu")
    quick = run.default_out_dir(cpu, run.parse_args(["--quick"]))
    partial = run.default_out_dir(cpu, run.parse_args(["--cases", "mlp"]))
    full = run.default_out_dir(cpu, run.parse_args([]))
    assert _ignored(quick / "results.md") and _ignored(partial / "results.md")
    assert not _ignored(full / "results.md")


def test_licence_file_and_spdx_expression():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "BSD-3-Clause"  # an SPDX string, not the deprecated table
    assert "BSD 3-Clause License" in (ROOT / "LICENSE").read_text()
    assert project["license-files"] == ["LICENSE"]
