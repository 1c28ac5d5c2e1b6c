"""The README's code runs, and CI runs the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_python_examples_run_and_recover_the_transform(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) >= 2, "README lost a Python example"
    monkeypatch.chdir(tmp_path)  # the examples write files
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})  # each block asserts what it recovered


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)```", README, flags=re.S)[0].strip().splitlines()
    assert len(commands) == 2 and "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci
