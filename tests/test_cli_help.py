"""Every recipe answers --help (argparse %-formats help strings: a bare % in one crashed bench_llm.py --help)."""
import importlib
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch"


@pytest.mark.parametrize("script", sorted(p.stem for p in LAUNCH.glob("*.py")))
def test_recipe_help_exits_zero(script, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(LAUNCH))
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--" in out
