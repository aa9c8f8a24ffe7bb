"""The repository's style counts, from its sources (`make style` prints them; tests/unit/test_style.py holds them to
their limits):

  fmt_skip            `# fmt: skip` comments (the formatter formats; a skip only keeps a table's alignment)
  local_imports       imports inside functions (allowed for optional heavy dependencies, each marked
                      `# noqa: PLC0415` with its reason; ruff's import-outside-toplevel rule finds unmarked ones)
  long_files          files over LONG_FILE lines
  long_functions      functions over LONG_FUNCTION lines without a `# long: WHY` comment opening their body

    python -m tests.style [--list]
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("mm_llama", "adapters", "data", "recipes", "benchmarks", "tests")
LONG_FILE, LONG_FUNCTION = 400, 60
LIMITS = {"fmt_skip": 15, "local_imports": 40, "long_files": 0, "long_functions": 0}


def sources() -> list[Path]:
    return [p for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))]


def counts() -> dict[str, list[str]]:
    """Each count's offending places ("path:line")."""
    out: dict[str, list[str]] = {k: [] for k in LIMITS}
    for path in sources():
        rel = path.relative_to(ROOT).as_posix()
        text = path.read_text()
        lines = text.splitlines()
        out["fmt_skip"] += [f"{rel}:{i}" for i, ln in enumerate(lines, 1) if ln.rstrip().endswith("# fmt: skip")]
        if len(lines) > LONG_FILE:
            out["long_files"].append(f"{rel}:{len(lines)}")
        for node in ast.walk(ast.parse(text, rel)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    out["local_imports"].append(f"{rel}:{inner.lineno}")
            n = node.end_lineno - node.lineno + 1
            head = "\n".join(lines[node.lineno - 1 : node.body[0].lineno + 1])  # the signature and what follows
            if n > LONG_FUNCTION and "# long:" not in head:
                out["long_functions"].append(f"{rel}:{node.lineno} {node.name} ({n} lines)")
    out["local_imports"] = sorted(set(out["local_imports"]))  # nested functions are walked twice
    return out


def main(argv=None) -> int:
    c = counts()
    summary = {k: {"count": len(v), "limit": LIMITS[k]} for k, v in c.items()}
    print(json.dumps(summary))
    if "--list" in (argv if argv is not None else sys.argv[1:]):
        for k, places in c.items():
            for p in places:
                print(f"{k}: {p}")
    return 0 if all(len(v) <= LIMITS[k] for k, v in c.items()) else 1


if __name__ == "__main__":
    sys.exit(main())
