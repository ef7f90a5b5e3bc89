"""The package's layout rules (issue 17, item 6), checked on the source tree.

* no file over ``MAX_LINES`` lines in ``llmq/``, ``kernels/`` and ``scripts/``;
* no module inside ``llmq/`` imports the package root (``import llmq``, ``from llmq import …``,
  ``from .. import …`` reaching it): the root's ``__init__`` is for users, and a module that
  needs it creates an import cycle through it (the version lives in ``llmq._version``);
* ``import llmq`` (and ``import llmq.recipes``) load neither torch, nor triton, nor transformers,
  as ``llmq/__init__.py`` says.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 400
EXEMPT: set[str] = set()  # no file is exempt


def _sources() -> list[Path]:
    return sorted([*(ROOT / "llmq").rglob("*.py"), *(ROOT / "kernels").glob("*.py"), *(ROOT / "scripts").glob("*.py")])


def test_no_file_over_the_line_limit():
    too_long = []
    for path in _sources():
        rel = path.relative_to(ROOT).as_posix()
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES and rel not in EXEMPT:
            too_long.append(f"{rel}: {n} lines")
    assert not too_long, f"files over {MAX_LINES} lines (split them by job):\n" + "\n".join(too_long)


def test_the_exemptions_still_exist():
    """An exemption for a file that is gone (or renamed) would silently exempt nothing: drop it."""
    for rel in EXEMPT:
        assert (ROOT / rel).is_file(), f"{rel} no longer exists: remove it from EXEMPT"


def root_imports(source: str, rel_path: str) -> list[str]:
    """The statements of ``source`` (the file at ``rel_path``, e.g. ``llmq/nn/backends.py``) that import
    the package root ``llmq`` itself."""
    parts = rel_path.removesuffix(".py").split("/")
    package = parts[:-1]  # where a relative import starts: the module's package (a package's own __init__ too)
    found = []
    for node in ast.walk(ast.parse(source, rel_path)):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names if a.name == "llmq"]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - (node.level - 1)] if node.level else []
            target = base + (node.module.split(".") if node.module else [])
            if target == ["llmq"]:
                names = ", ".join(a.name for a in node.names)
                found.append(f"{node.lineno}: from {'.' * node.level}{node.module or ''} import {names}")
    return found


def _package_modules() -> dict[str, Path]:
    """``{path inside the installed package: file}``: llmq/**.py, and kernels/*.py, which ships as llmq/kernels/."""
    modules = {p.relative_to(ROOT).as_posix(): p for p in (ROOT / "llmq").rglob("*.py")}
    modules.update({f"llmq/kernels/{p.name}": p for p in (ROOT / "kernels").glob("*.py")})
    return dict(sorted(modules.items()))


def test_no_module_imports_the_package_root():
    offenders = []
    for rel, path in _package_modules().items():
        if rel != "llmq/__init__.py":
            offenders += [f"{rel}:{line}" for line in root_imports(path.read_text(encoding="utf-8"), rel)]
    assert not offenders, ("modules inside llmq import the package root; import the defining module "
                           "(e.g. llmq._version, llmq.recipes) instead:\n" + "\n".join(offenders))


@pytest.mark.parametrize("source, rel_path, found", [
    ("from llmq import __version__\n", "llmq/checkpoint/config.py", True),
    ("import llmq\n", "llmq/nn/backends.py", True),
    ("from .. import recipes\n", "llmq/nn/backends.py", True),
    ("from . import recipes\n", "llmq/api.py", True),
    ("from . import backends\n", "llmq/nn/backends.py", False),
    ("from . import backends\n", "llmq/nn/__init__.py", False),
    ("import llmq.nn.backends\n", "llmq/api.py", False),
    ("from llmq._version import __version__\n", "llmq/checkpoint/config.py", False),
], ids=["from-root", "import-root", "relative-parent", "relative-at-top", "relative-sibling", "relative-in-init",
        "import-submodule", "version-module"])
def test_root_import_detector(source, rel_path, found):
    assert bool(root_imports(source, rel_path)) is found


@pytest.mark.parametrize("module", ["llmq", "llmq.recipes"])
def test_import_is_light(module):
    code = (f"import sys, {module}\n"
            "print(sorted(m for m in ('torch', 'triton', 'transformers') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", f"import {module} loaded {proc.stdout.strip()}"


def _imported_modules(path: Path) -> list[str]:
    """Every module named by an absolute import statement of ``path`` (at any depth)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.append(node.module)
    return names


def test_kernels_never_import_the_modules_that_launch_them():
    """One way, module -> chooser -> backend -> kernel launcher: a kernel file never imports llmq.nn,
    llmq.kv, the chooser, or transformers (DESIGN.md: kernels/ never touches llmq.nn, transformers)."""
    upward = ("llmq.nn", "llmq.kv", "llmq.backend_choice", "transformers")
    offenders = [f"kernels/{p.name}: {m}" for p in sorted((ROOT / "kernels").glob("*.py"))
                 for m in _imported_modules(p) if m == "llmq" or any(m == u or m.startswith(u + ".") for u in upward)]
    assert not offenders, "\n".join(offenders)
