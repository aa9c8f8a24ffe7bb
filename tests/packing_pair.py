"""Two runs of the training recipe in one launch, the second with `data.pack=true` (the packing contract's check):

    torchrun --nproc_per_node 2 -m tests.packing_pair --out DIR --config C [key=value ...]

Rank 0 prints `PAIR {"padded": [losses], "packed": [losses]}`. Both runs read the same samples in the same order
(packing changes the layout of each batch only); their runs are DIR/padded and DIR/packed."""

from __future__ import annotations

import argparse
import json
import sys

from mm_llama.engine import exit_process
from recipes.train import load_train_config, trainer_for


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args(argv)
    out, trainer = {}, None
    for name, extra in (("padded", []), ("packed", ["data.pack=true"])):
        cfg = load_train_config(args.config, [*args.overrides, f"run_dir={args.out}/{name}", *extra])
        trainer = trainer_for(cfg)
        out[name] = trainer.run()
    if trainer.info.is_main:
        print("PAIR " + json.dumps(out), flush=True)
    exit_process(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
