"""Every bench script still imports: a bench is run by hand, rarely, so a name it imports from kiln (or from a
bench beside it) that has moved would otherwise go unnoticed until the next measurement."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("script", sorted(BENCH.glob("*.py")), ids=lambda path: path.name)
def test_bench_script_imports(script: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))  # as `python bench/NAME.py` puts bench/ first on the path
    spec = importlib.util.spec_from_file_location(f"bench_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)  # module level only: each script's work sits behind `__main__`
    assert callable(getattr(module, "main", None)), f"{script.name} has no main()"
