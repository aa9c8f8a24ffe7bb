"""See what is trained: the first N training samples of a config as the tower sees them.

    mm-llama data preview --config CONFIG [--n N] [key=value ...]
    python -m recipes.preview --config CONFIG [--n N]

Each sample is printed as rendered text: the chat template's tokens as they decode, media as `<image:NAME>`,
`<video:NAME>`, `<audio:NAME>`, and the tokens that carry loss between `[[` and `]]`; a mixed run (`data.sources`)
ends with each source's share of the samples shown. The samples are those rank 0
of a one-process run reads first (the same shuffle, seed and sample maker as `recipes.train`); samples the run
would skip are printed as skipped with their reason. No weights are read: the model is built on the meta device.
"""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace

from mm_llama.assets import resolve
from mm_llama.config import ConfigError
from mm_llama.data.badsamples import SampleError
from mm_llama.data.conversation import show
from mm_llama.llama import Tokenizer
from mm_llama.options import RANGES, Parser

from .plan import meta_model
from .train import load_train_config, loader_for, samples_for


class Preview:
    """raw sample -> (its name, the rendered text or the reason it is skipped); picklable like the sample maker."""

    def __init__(self, samples, tok):
        self.samples, self.tok = samples, tok

    def __call__(self, raw: dict) -> tuple[str, str, int]:
        name, src = f"{raw.get('__shard__', '')}:{raw.get('__key__', '')}", raw.get("__src__", 0)
        try:
            _, rendered = self.samples.rendered(raw)
        except SampleError as e:
            return name, f"(skipped: {e.reason}: {e})", src
        return name, show(rendered, self.tok), src


def preview(cfg, n: int) -> list[tuple[str, str, int]]:
    tok = Tokenizer.from_pretrained(resolve(cfg.model.tokenizer))
    model = meta_model(cfg)
    info = SimpleNamespace(rank=0, world_size=1)
    batch = max(1, min(n, cfg.data.batch_size))
    loader = loader_for(
        cfg,
        tok,
        model,
        info,
        map_fn=Preview(samples_for(cfg, tok, model), tok),
        collate_fn=list,
        num_workers=0,
        batch_size=batch,
        max_bad_fraction=1.0,
    )
    out: list[tuple[str, str, int]] = []
    for group in loader:
        out += group
        if len(out) >= n:
            break
    return out[:n]


def main(argv=None, prog: str | None = None) -> int:
    ap = Parser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="a training config (YAML)")
    ap.add_argument("--n", type=RANGES["count"], default=4, help="how many samples (default 4)")
    ap.add_argument("overrides", nargs="*", help="key=value, as for recipes.train")
    args = ap.parse_intermixed_args(argv)
    try:
        cfg = load_train_config(args.config, args.overrides)
        shown = preview(cfg, max(1, args.n))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"{prog or 'preview'}: error: {e}", file=sys.stderr)
        return 2
    for i, (name, text, _) in enumerate(shown, 1):
        print(f"--- sample {i}: {name}")
        print(text)
    sources = cfg.data.sources
    if sources:  # a mixed run: each source's share of these samples, and what its weight asks for
        total = sum(s.weight for s in sources)
        print(f"--- sources of these {len(shown)} samples")
        for k, src in enumerate(sources):
            got = sum(1 for *_, s in shown if s == k)
            print(f"{src.train}: {got} ({got / len(shown):.0%}; weight {src.weight:g} = {src.weight / total:.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
