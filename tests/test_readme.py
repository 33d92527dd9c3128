"""The README's code runs as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(section: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_the_model_usage_example_runs_and_returns_the_layer_output():
    (block,) = python_blocks("Using it in a model")
    scope: dict = {}
    exec(compile(block, str(README), "exec"), scope)
    y, hidden = scope["y"], scope["hidden"]
    assert y.shape == hidden.shape and y.dtype == scope["cfg"].runtime.torch_dtype
    assert y.isfinite().all() and y.abs().sum() > 0
