"""The top-level ``kernels/`` folder ships and imports only as ``llmq.kernels``.

Hugging Face owns the top-level module name ``kernels``, and transformers >= 5.25 imports it
(``transformers.integrations.hub_kernels``). Whenever the repository root is on ``sys.path``
(``python -m pytest``, a user's script run from the root) a regular package ``kernels/`` there
would shadow it and crash ``import transformers``. These tests fail if that regresses.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ROOT / "kernels"  # (a venv inside the checkout, e.g. .venv-oldest/, may hold the real package)
KERNEL_FILES = sorted(p.name for p in (ROOT / "kernels").glob("*.py"))

PROBE = """
import json, sys
import transformers, llmq
from transformers import LlamaConfig            # imports transformers.activations -> hub_kernels -> kernels
import kernels
import llmq.kernels.dequant_gemv
print(json.dumps({"hf_kernels": kernels.__file__, "hf_kernels_path": list(getattr(kernels, "__path__", [])),
                  "llmq_kernels": list(llmq.kernels.__path__),
                  "gemv": llmq.kernels.dequant_gemv.__file__, "sys_path0": sys.path[0]}))
"""


def test_top_level_kernels_folder_is_not_a_regular_package():
    assert KERNEL_FILES, "the kernels/ folder holds the Triton kernels"
    assert not (ROOT / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py makes the folder importable as the top-level `kernels`, shadowing Hugging Face's "
        "package (see llmq/__init__.py, _register_kernels_subpackage)")


def test_no_source_imports_the_top_level_kernels_name():
    offenders = []
    for folder in ("llmq", "kernels", "scripts", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                stripped = line.strip()
                if stripped.startswith(("from kernels", "import kernels")) and path.name != Path(__file__).name:
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {stripped}")
    assert not offenders, "import the kernels as llmq.kernels:\n" + "\n".join(offenders)


def test_repository_root_on_sys_path_does_not_shadow_hugging_face_kernels():
    # needs Hugging Face's `kernels` installed (the test extra installs it), or there is nothing to shadow
    spec = importlib.util.find_spec("kernels")
    assert spec is not None and spec.origin and not Path(spec.origin).resolve().is_relative_to(OURS), (
        "install Hugging Face's kernels package (pip install -e '.[test]') so this test can check the shadowing")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["sys_path0"] in ("", str(ROOT)), "the probe must run with the repository root first on sys.path"
    assert not Path(found["hf_kernels"]).resolve().is_relative_to(OURS), found
    assert all(not Path(p).resolve().is_relative_to(OURS) for p in found["hf_kernels_path"]), found
    assert Path(found["gemv"]).resolve() == (ROOT / "kernels" / "dequant_gemv.py").resolve(), found


@pytest.mark.slow
def test_wheel_ships_every_kernel_under_llmq_kernels_only(tmp_path):
    # build from a copy, so the build leaves no build/ or egg-info in the checkout
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "llmq", source / "llmq", ignore=ignore)
    shutil.copytree(ROOT / "kernels", source / "kernels", ignore=ignore)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("llmq-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n.split("/", 2)[2] for n in names if n.startswith("llmq/kernels/"))
    assert shipped == KERNEL_FILES
    assert not [n for n in names if n.startswith("kernels/")], "the wheel must not install a top-level kernels"
