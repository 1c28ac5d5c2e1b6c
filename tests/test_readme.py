"""The README's code runs, and CI runs the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import grid_error

from tireg.transforms import TRANSFORMS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_python_examples_run_and_recover_the_transform(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) >= 2, "README lost a Python example"
    monkeypatch.chdir(tmp_path)  # the examples write files
    registered = 0
    for block in blocks:
        namespace = {}
        exec(compile(block, "README.md", "exec"), namespace)  # each block asserts what it recovered
        result, truth = namespace.get("result"), namespace.get("truth")
        if result is None or truth is None:
            continue
        # a block that registers a pair made with a known transform recovers all of it, the shifts
        # too (the second block asserts only its angle): each parameter as the truth's, about the
        # result's centre, and every pixel's destination (measured: 0.027 px, 0.046 px)
        registered += 1
        truth = truth.double()
        kind = TRANSFORMS[result.transform]
        expected = kind.from_matrix(truth, torch.tensor(result.center, dtype=torch.float64))
        for name in ("tx", "ty"):
            found, true = result.parameters[name], float(expected[kind.parameter_names.index(name)])
            assert abs(found - true) < 0.1, (block.splitlines()[2], name, found, true)
        assert grid_error(result.matrix, truth, result.fixed_size) < 0.2
    assert registered >= 2, "README lost an example that registers a known transform"


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)```", README, flags=re.S)[0].strip().splitlines()
    assert len(commands) == 2 and "pytest" in commands[1]
    ci = ROOT / ".ci" / "run"
    if not ci.is_file():
        pytest.skip(".ci/run is not in this checkout")
    assert commands[1] in ci.read_text().splitlines()
