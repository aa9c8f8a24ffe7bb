"""The installed package as a user sees it, from outside the checkout: the installed names carry the project's name
(mm_llama.adapters, mm_llama.data, mm_llama.recipes; no generic `adapters`, `data` or `recipes`), every recipe imports
as a module without sys.path edits (`python -m recipes.NAME` from a checkout, mm_llama.recipes.NAME installed)."""

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.py") if p.name not in ("__init__.py", "__main__.py"))


def test_installed_names_carry_the_project_name():
    """Outside the repository, `adapters` and `data` are not importable; mm_llama.adapters / mm_llama.data are."""
    code = (
        "import importlib.util as u, mm_llama.adapters.composed, mm_llama.data.loader, mm_llama.recipes.plan; "
        "print(u.find_spec('adapters'), u.find_spec('data'), u.find_spec('recipes'))"
    )
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["None", "None", "None"]


def test_every_recipe_imports_as_a_module_in_one_process():
    """Every recipe module imports under both names, in one fresh process from outside the checkout (installed)
    and from the checkout (`recipes.X`); no source file edits sys.path."""
    names = [".".join(p.relative_to(ROOT).with_suffix("").parts) for p in RECIPES]
    installed = "; ".join(f"import mm_llama.{n}" for n in names)
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-c", installed], capture_output=True, text=True, cwd=tmp, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    local = "; ".join(f"import {n}" for n in names)
    r = subprocess.run([sys.executable, "-c", local], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    sources = [
        p for f in ("mm_llama", "adapters", "data", "recipes", "benchmarks", "tests") for p in (ROOT / f).rglob("*.py")
    ]
    edits = [p for p in sources if "sys.path." + "insert" in p.read_text() or "sys.path." + "append" in p.read_text()]
    assert not edits, edits
