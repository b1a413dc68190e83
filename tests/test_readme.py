"""The README is part of the product: its test command is CI's, and its examples run."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _bash_blocks():
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_ci_runs_exactly_the_readme_test_command():
    commands = [line for block in _bash_blocks() for line in block.splitlines() if "pytest" in line]
    assert len(commands) == 1, commands
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[0] in ci_lines


def test_readme_has_exactly_two_setup_commands():
    setup = [line for block in _bash_blocks() for line in block.splitlines() if line.startswith("pip install")]
    assert len(setup) == 2 and any("bench --quick" in c for c in setup) and any("pytest" in c for c in setup)


def test_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks
    for i, block in enumerate(blocks):
        # A name that is not a file: torch.compile reads the source of the code it traces by file
        # name, and README.md itself is not Python.
        exec(compile(block, f"<README.md, python block {i + 1}>", "exec"), {"__name__": "readme"})
