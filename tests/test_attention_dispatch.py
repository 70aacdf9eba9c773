"""The choice of attention path: one dispatcher, a one-way import graph, and a fallback to
the torch path (with one warning) when the Triton kernels fail to compile or launch.

The dispatcher is exercised on CPU tensors by declaring the Triton path available, so this
runs without a GPU and without triton installed.
"""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest
import torch
from ase.build import bulk

from ase_crystalformer import Crystalformer, ModelConfig, attention, triton_attention
from ase_crystalformer.geometry import collate, windows_for

PACKAGE = Path(attention.__file__).parent


@pytest.fixture
def failing_triton(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Triton 'available' on CPU, its entry point raising as a failed compile would."""
    calls: list[int] = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("PTX compile failed (simulated)")

    monkeypatch.setattr(triton_attention, "_FAILURE", [])
    monkeypatch.setattr(triton_attention, "available", lambda *t: not triton_attention._FAILURE)
    monkeypatch.setattr(triton_attention, "window_attention", broken)
    return calls


def test_failed_kernels_fall_back_to_torch_with_one_warning(failing_triton, monkeypatch):
    torch.manual_seed(0)
    model = Crystalformer(ModelConfig(n_blocks=2, d_model=32, n_heads=2, d_ff=32, d_head_mlp=16)).eval()
    batch = collate(windows_for([bulk("NaCl", "rocksalt", a=5.64), bulk("Si", "diamond", a=5.43)], 10.0))
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = model(batch)
        again = model(batch)
    failures = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(failures) == 1, [str(w.message) for w in caught]
    assert "Triton window attention failed (RuntimeError: PTX compile failed (simulated))" in str(
        failures[0].message
    )
    assert failing_triton == [1]  # tried once, then switched off for the process
    monkeypatch.setattr(triton_attention, "available", lambda *t: False)  # the torch path
    with torch.no_grad():
        want = model(batch)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(again, want, rtol=0, atol=0)


def test_dispatcher_asks_triton_only_for_cuda_tensors():
    x = torch.zeros(2, 1, 4)
    assert not triton_attention.available(x, x)
    assert not triton_attention.available()


def _package_imports(module: str) -> set[str]:
    """Modules of this package that ``module`` imports, at top level or inside functions."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {a.name for a in node.names}
    return found


def test_import_graph_is_one_way():
    """attention imports triton_attention (lazily, to dispatch); never the other way round,
    except for type annotations."""
    assert "triton_attention" in _package_imports("attention")
    tree = ast.parse((PACKAGE / "triton_attention.py").read_text(encoding="utf-8"))
    runtime = [
        node for node in tree.body
        if isinstance(node, (ast.Import, ast.ImportFrom)) and getattr(node, "level", 0) == 1
    ]
    assert not runtime
    inside = {
        n.module
        for f in ast.walk(tree)
        if isinstance(f, ast.FunctionDef)
        for n in ast.walk(f)
        if isinstance(n, ast.ImportFrom) and n.level == 1
    }
    assert inside <= {"triton_attention_kernels"}
