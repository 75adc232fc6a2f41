"""The README's "Using the kernels directly" snippets run as written (here: CPU, Triton interpreter)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Using the kernels directly"


def _snippets():
    text = README.read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.DOTALL)


def test_the_section_has_snippets():
    assert len(_snippets()) == 3


@pytest.mark.parametrize("index", range(3), ids=["training", "generation", "svd"])
def test_snippet_runs(index, capsys):
    exec(compile(_snippets()[index], f"README snippet {index}", "exec"), {})
    assert capsys.readouterr().out.strip(), "each snippet prints what it computed"
