"""The demo's held-out figures over several seeds (`make demo-seeds`): every stage of the demo once per seed, each in
its own run folder, then one table of the figure table's targets and references (recipes/demo/figures.py) with
their mean, min and max, and whether each target holds for the WORST seed.

    python -m recipes.demo.seeds                          # seeds 0 1 2 into runs/demo_seeds/seed_N
    python -m recipes.demo.seeds --seeds 0 1 --config recipes/configs/demo/tiny.yaml   # any DemoConfig
    python -m recipes.demo.seeds --table-only             # re-tabulate finished runs

Writes RUN_ROOT/seeds.md and RUN_ROOT/seeds.json; exits 1 when a (non-stretch) target misses at the worst seed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mm_llama.config import load_config

from .config import DemoConfig
from .figures import FIGURES, seed_markdown, tabulate
from .stages import STAGES, run_demo


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m recipes.demo.seeds", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--root", default="runs/demo_seeds", help="one run folder per seed below this")
    ap.add_argument("--config", default=None, help="YAML of DemoConfig values (defaults: the full demo)")
    ap.add_argument("--table-only", action="store_true", help="only tabulate the runs already there")
    ap.add_argument("overrides", nargs="*", help="key=value DemoConfig overrides for every seed")
    a = ap.parse_intermixed_args(argv)
    root = Path(a.root)
    summaries = {}
    for seed in a.seeds:
        run = root / f"seed_{seed}"
        if not a.table_only:
            cfg = load_config(DemoConfig, a.config, [*a.overrides, f"seed={seed}", f"run_dir={run}"])
            print(f"== seed {seed} -> {run}", flush=True)
            run_demo(cfg, STAGES)
        f = run / "eval/summary.json"
        if f.exists():
            summaries[seed] = json.loads(f.read_text())
        else:
            print(f"seed {seed}: no {f} (the run did not finish its evaluation)", flush=True)
    table = tabulate(summaries)
    root.mkdir(parents=True, exist_ok=True)
    (root / "seeds.json").write_text(json.dumps(table, indent=1))
    text = seed_markdown(table)
    (root / "seeds.md").write_text(text)
    print(text, flush=True)
    misses = [f.key for f in FIGURES if f.key in table and table[f.key]["holds"] is False and not f.stretch]
    return 1 if misses else 0


if __name__ == "__main__":
    raise SystemExit(main())
