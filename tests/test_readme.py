"""Every python block of README.md runs as written, in order, as a reader would paste them
into one session (later blocks use the names earlier ones define), in a scratch directory."""
import importlib.util
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks(text):
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_python_blocks():
    with open(README, encoding="utf-8") as f:
        blocks = python_blocks(f.read())
    assert len(blocks) >= 8
    for block in blocks:
        code = "\n".join(line.split("#")[0] for line in block.splitlines())
        assert "..." not in code, f"a placeholder in a README block:\n{block}"


@pytest.mark.slow
def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch):
    # the optional engines the blocks show (CI installs them all; elsewhere: skip, not fail)
    for module in ("matplotlib", "sklearn", "scipy", "dask.distributed", "optuna", "onnx",
                   "onnxruntime", "torch"):
        pytest.importorskip(module)
    if "KERAS_BACKEND" not in os.environ:      # as the README says: keras on jax or torch
        monkeypatch.setenv("KERAS_BACKEND", "jax" if importlib.util.find_spec("jax")
                           else "torch")
    pytest.importorskip("keras")
    with open(README, encoding="utf-8") as f:
        blocks = python_blocks(f.read())
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as exc:  # name the block in the failure
            raise AssertionError(f"README python block {i + 1} failed: {exc!r}\n{block}") \
                from exc
