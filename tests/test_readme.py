"""The README's Python: its code blocks run as written, in a fresh interpreter, and every
``o2f.<module>.<name>`` it mentions resolves after a bare ``import o2f``."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.slow  # an R-50 forward at 800 px, in training and in inference
def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python block"
    checks = "\nassert set(losses) >= {'loss_cls', 'loss_box'}\n" \
             "assert set(detections[0]) == {'boxes', 'scores', 'labels'}\n"
    proc = run_python("\n".join(blocks) + checks)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_every_dotted_name_in_the_readme_resolves_after_import_o2f():
    names = sorted(set(re.findall(r"\bo2f(?:\.[a-z_]\w*)+", README.read_text())))
    names = [n for n in names if not n.endswith((".py", ".pt", ".onnx", ".yaml"))]
    assert "o2f.evaluation.duplicate_rate" in names and "o2f.assign.soft_label_ceiling" in names
    proc = run_python("import o2f\n" + "\n".join(f"assert callable({n}), '{n}'" for n in names))
    assert proc.returncode == 0, proc.stderr[-3000:]
