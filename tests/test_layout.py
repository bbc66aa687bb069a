"""Where code lives: building and running the generator pulls in neither the training code nor Ray."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
from vist3a.config import load_config
from vist3a.generator import SceneGenerator
SceneGenerator(load_config(None, ["splats.preview_views=0"])).generate(["a chair"], [1])
print(sorted({m.split(".")[0] + "." + m.split(".")[1] if m.startswith("vist3a.") else m.split(".")[0]
              for m in sys.modules if m.startswith(("vist3a.train", "ray"))}))
"""


def test_generation_imports_no_training_code_and_no_ray(repo_root):
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
