"""The benchmarks' peer selection: a peer whose package is missing is left out with one line, the rest run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def accuracy():
    pytest.importorskip("skimage")
    spec = importlib.util.spec_from_file_location("tireg_benchmark_accuracy", BENCHMARKS / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_a_missing_peer_is_left_out_with_one_line_and_the_rest_run(accuracy, monkeypatch, capsys):
    """accuracy.py --quick, --check and the default run stopped at the first missing peer with a traceback
    (ModuleNotFoundError: No module named 'itk'), where speed.py leaves a missing kornia out."""
    monkeypatch.setitem(sys.modules, "itk", None)  # import itk: ModuleNotFoundError, as if not installed
    monkeypatch.setitem(sys.modules, "kornia", None)
    methods, left_out = accuracy.select_methods(["tireg", "elastix", "kornia", "tireg", "elastix"])
    assert list(methods) == ["tireg"]
    assert left_out == ['elastix: itk-elastix is not installed (pip install -e ".[benchmark]"); left out',
                        'kornia: kornia is not installed (pip install -e ".[benchmark]"); left out']
    assert accuracy.main(["--check", "--methods", "tireg", "elastix", "--kinds", "translation"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == 'elastix: itk-elastix is not installed (pip install -e ".[benchmark]"); left out'
    assert "| tireg | translation | identity |" in out and "| elastix |" not in out
    assert accuracy.main(["--check", "--methods", "elastix"]) == 1  # nothing left: one line more, no traceback
    captured = capsys.readouterr()
    assert captured.err == "no method left to run\n" and "left out" in captured.out


def test_tireg_itself_failing_to_import_is_not_left_out(accuracy, monkeypatch):
    monkeypatch.setitem(sys.modules, "tireg", None)
    with pytest.raises(ImportError):
        accuracy.select_methods(["tireg"])
