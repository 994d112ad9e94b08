"""The repository's ``kernels/`` folder is the package ``slora_kernels``; run from the repository
root (where ``python -m`` and pytest put it on ``sys.path``) it must not hide Hugging Face's
``kernels`` distribution, which transformers imports when a model's configuration loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_CHECK = """
import importlib.metadata, json, kernels, slora_kernels
from transformers.models.llama import configuration_llama
try:
    hf = importlib.metadata.version("kernels")
except importlib.metadata.PackageNotFoundError:
    hf = None
print(json.dumps({"kernels": kernels.__file__, "slora_kernels": slora_kernels.__file__, "hf": hf}))
"""


def test_kernels_folder_does_not_hide_hugging_face_kernels():
    run = subprocess.run([sys.executable, "-c", _CHECK], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(out["slora_kernels"]).resolve() == ROOT / "kernels" / "__init__.py"
    if out["hf"] is not None:  # installed (transformers 5.25 requires it): the name is its
        assert Path(out["kernels"]).resolve().parent != ROOT / "kernels"
