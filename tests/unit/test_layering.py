"""Import direction (docs/architecture.md): recipes/CLI -> adapters -> data -> core; the installed names carry
the project's name."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOP_LEVEL = {"mm_llama/cli.py"}  # the command line is the top layer, though it lives in the core package


def layer(rel: str) -> str:
    if rel in TOP_LEVEL or rel.startswith("recipes/"):
        return "top"
    return rel.split("/")[0].replace("mm_llama", "core")


# layer -> module prefixes it must not import
FORBIDDEN = {
    "core": ("mm_llama.adapters", "mm_llama.data", "recipes"),
    "data": ("mm_llama.adapters", "mm_llama.engine", "recipes"),
    "adapters": ("recipes",),
}
OLD_NAMES = ("adapters", "data")  # the repo folders' own names: importable only as mm_llama.adapters / mm_llama.data


def imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def sources():
    for folder in ("mm_llama", "adapters", "data", "recipes", "benchmarks", "tests"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_import_direction():
    bad = []
    for path in sources():
        rel = path.relative_to(ROOT).as_posix()
        for line, mod in imports(path):
            root = mod.split(".")[0]
            if root in OLD_NAMES:
                bad.append(f"{rel}:{line}: imports {mod!r}; use mm_llama.{mod}")
            for prefix in FORBIDDEN.get(layer(rel), ()):
                if mod == prefix or mod.startswith(prefix + "."):
                    bad.append(f"{rel}:{line}: the {layer(rel)} layer imports {mod}")
    assert not bad, "\n".join(bad)
