"""Why the demo's dialogue misses its "search" questions ("is there a bag?", "where is the sneaker?"): what the image
adapter's cross-attention blocks see at the token where the answer is decided, on held-out composites.

For place questions ("what is at the top left?", which the captions taught) and search questions ("where is the
X?"), after the answer's first words ("at the"), for each cross-attention block:
  - `attn_on_cell`: the attention mass on the asked cell (place) or on the item's cell (search), mean over heads and
    the best head (5 media tokens: the class token + 4 cells, so 0.2 is uniform);
  - `item_from_query`: how well a linear probe reads the asked item from the block's input at that token (the query
    side: does the text state carry what to look for?);
  - `cell_from_output`: how well a linear probe reads the item's cell from the block's attention output (the value
    side: does what it reads carry where?). Probes train on 2/3 of the questions and are scored on the rest.

    python benchmarks/dialogue_search.py runs/demo [--adapter FILE ...] [--n 400]

With `--write-search DIR` it also writes training conversations of the search questions alone, for the search-only
run docs/demo.md measures (the dialogue stage's config on those shards, from the stage's adapters).
It also reads, from the image part's own tokens, what a search needs (`tokens`): a linear probe of each occupied
cell's place and item from its media token and from the last block's keys.

The item-first captions experiment: `--write-reverse DIR` writes 8,000 training composites captioned with their
items in random order, each followed by its place ("a bag at the bottom right, a sandal at the top left and ..."),
so that every place in a caption is a lookup from an item to its cell; the image stage's config trains on them
(`data.train=DIR/index.json model.image.init=RUN/image/adapter.safetensors`). `--reverse` then scores an image
adapter (`--adapter`) on 300 held-out composites captioned that way, teacher-forced: the share of place words
(top / bottom / left / right) predicted right, and of captions with every place right.
Prints a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from mm_llama.adapters.chat import ask_messages
from mm_llama.adapters.files import load_composed, trained_tower_dtype
from mm_llama.adapters.generation import Collate
from mm_llama.adapters.samples import Samples
from mm_llama.adapters.xattn import GatedCrossAttentionBlock
from mm_llama.data.writer import write_shards
from mm_llama.recipes.demo import dialogue, scenes
from mm_llama.recipes.demo.config import DemoConfig, dialogue_files, load_tower
from mm_llama.recipes.demo.scenes import FASHION_CLASSES, POSITIONS


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 300) -> float:
    """A linear probe (standardised inputs, L2) trained on the first 2/3 -> its accuracy on the rest."""
    with torch.autocast(x.device.type, enabled=False):  # in fp32 whatever the model computed in
        return _probe(x.float(), y, classes, steps)


def _probe(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int) -> float:
    n = len(y) * 2 // 3
    mu, sd = x[:n].mean(0), x[:n].std(0) + 1e-5
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    opt = torch.optim.Adam([w], 1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z[:n] @ w, y[:n]) + 1e-3 * w.pow(2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(((z[n:] @ w).argmax(-1) == y[n:]).float().mean())


class Recorder:
    """Per cross-attention block, at the last position: the block's input, its attention weights [H, S] and its
    attention output (before the gate)."""

    def __init__(self, blocks: list[GatedCrossAttentionBlock]):
        self.rows: list[list[tuple]] = [[] for _ in blocks]
        for k, b in enumerate(blocks):
            b.register_forward_hook(lambda mod, args, out, k=k: self.rows[k].append(self.read(mod, *args[:3])))

    @staticmethod
    def read(block, x, kv, mask) -> tuple:
        a, xn = block.attention, block.attention_norm(x)
        B, T, _ = x.shape
        k, v = a.media_kv(kv) if torch.is_tensor(kv) else kv
        q = a.q_norm(a.wq(xn).view(B, T, a.n_heads, a.head_dim)).transpose(1, 2)
        scores = q @ k.repeat_interleave(a.n_heads // a.n_kv_heads, 1).transpose(-1, -2) / a.head_dim**0.5 + mask
        return x[0, -1], scores[0, :, -1].softmax(-1), a(xn, (k, v), mask)[0, -1]


def questions(n: int, seed: int, folder: Path) -> list[dict]:
    """Held-out composites, alternately a place question and a search question about an item seen once."""
    world, out = dialogue.World("test", seed), []
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        part, layout, png = world.composite(f"probe_{i:04d}.png")
        (folder / part.name).write_bytes(png)
        if i % 2:
            cell = i // 2 % 4
            out.append({"kind": "place", "q": f"what is at the {POSITIONS[cell]}?", "cell": cell, "file": part.name})
            continue
        once = [c for c, v in layout.items() if list(layout.values()).count(v) == 1]
        if once:
            cell = once[i // 2 % len(once)]
            item = layout[cell]
            out.append({"kind": "search", "q": f"where is the {FASHION_CLASSES[item]}?", "cell": cell, "item": item,
                        "file": part.name})  # fmt: skip
    return out


def write_search(folder: Path, seed: int, n: int = 3000) -> int:
    """Training conversations ("is there X?", "where is the X?", one turn each) -> shards in `folder`."""
    recs = [
        r
        for r in dialogue.plan("train", {"image": n}, seed)
        if dialogue.question_key(r["question"]) in ("has", "where")
    ]
    for r in recs:
        r["qa"] = r["qa"][:1]
    return write_shards(dialogue.training_records(recs), folder, prefix="search", maxcount=1000, progress=False,
                        replace=True).written  # fmt: skip


def item_first_caption(layout: dict[int, int], rng: np.random.Generator) -> str:
    """ "a bag at the bottom right, a sandal at the top left and a coat at the top right": the items in random
    order, each followed by its place."""
    cells = [int(c) for c in rng.permutation(sorted(layout))]
    parts = [f"{dialogue.item_phrase(layout[c])} at the {POSITIONS[c]}" for c in cells]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def item_first_records(split: str, n: int, seed: int):
    """Composites as the caption corpora draw them, captioned item first (`item_first_caption`)."""
    rng = np.random.default_rng(seed + 1)
    for r in scenes.composite_records(split, n, seed):
        yield {**r, "text": item_first_caption({int(k): v for k, v in r["json"]["layout"].items()}, rng)}


def reverse_lookup(model, tok, n: int = 300, seed: int = 5) -> dict:
    """Teacher-forced on `n` held-out item-first captions: the share of place words predicted right, and of
    captions with every place word right."""
    samples = Samples.of(model, tok, kinds=["image"])
    place = {tok.encode(" " + w)[0] for w in ("top", "bottom", "left", "right")}
    right = total = whole = 0
    for i, r in enumerate(item_first_records("test", n, seed)):
        b = Collate(["image"])([samples({"__key__": f"t{i}", "png": r["image"][1], "txt": r["text"].encode()})])
        ids, labels = b.pop("input_ids"), b.pop("labels")
        with torch.inference_mode():
            out = model(ids, labels=labels, **b)
        targets = labels[:, 1:][labels[:, 1:] != -100]
        at = torch.tensor([int(t) in place for t in targets])
        hit = (out.logits.argmax(-1) == targets)[at]
        right, total, whole = right + int(hit.sum()), total + len(hit), whole + bool(hit.all())
    return {"place_words_right": right / max(total, 1), "captions_all_places_right": whole / n}


def token_probes(model, tok, n: int = 400, seed: int = 9) -> dict:
    """Linear probes of each occupied cell's place (4) and item (10) from its media token and from the last
    cross-attention block's keys, on `n` held-out composites."""
    samples, rows = Samples.of(model, tok, kinds=["image"]), []
    for i, r in enumerate(scenes.composite_records("test", n, seed)):
        item = samples({"__key__": f"p{i}", "png": r["image"][1], "txt": r["text"].encode()})
        b = Collate(["image"]).inputs([item])
        with torch.inference_mode():
            media = model.image.encode(b["pixel_values"], b["aspect_ratio_ids"], b["aspect_ratio_mask"])
            keys = model.image.cross_attention_layers[-1].media_kv(media)[0][0]  # [G, S, K]
        for cell, label in r["json"]["layout"].items():
            at = int(cell) + 1  # the cell tokens follow the class token
            rows.append((media[0, at], keys[:, at].flatten(), int(cell), label))
    tokens, keys = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
    cells, items = torch.tensor([r[2] for r in rows]), torch.tensor([r[3] for r in rows])
    return {
        "token_to_cell": probe_accuracy(tokens, cells, 4),
        "token_to_item": probe_accuracy(tokens, items, len(FASHION_CLASSES)),
        "keys_to_cell": probe_accuracy(keys, cells, 4),
        "keys_to_item": probe_accuracy(keys, items, len(FASHION_CLASSES)),
    }


def attention_table(run: Path, model, tok, n: int, seed: int) -> tuple[list[dict], int]:
    """Per block, on held-out place and search questions: attention on the asked cell, the query-side and
    value-side probes (the module docstring); prints the table. -> (rows, questions asked)"""
    samples = Samples.of(model, tok)
    blocks = [m for m in model.image.modules() if isinstance(m, GatedCrossAttentionBlock)]
    rec = Recorder(blocks)
    folder = run / "eval/search_probe"
    qs = questions(n, seed, folder)
    for x in qs:
        item = samples.request(ask_messages(model, samples, [str(folder / x["file"])], x["q"]))
        ids = list(item["input_ids"]) + tok.encode("at the")
        with torch.inference_mode():
            model(torch.tensor([ids]), **Collate(model.kinds).inputs([{**item, "input_ids": ids}]))
    kinds = np.array([x["kind"] for x in qs])
    cells = torch.tensor([x["cell"] for x in qs])
    search = torch.tensor(kinds == "search")
    items = torch.tensor([x.get("item", 0) for x in qs])[search]
    out = []
    print(f"{len(qs)} held-out questions ({int(search.sum())} search); 0.2 = uniform attention over 5 media tokens")
    print("block  gate  attn_on_cell place (mean/best head)  search (mean/best)  item_from_query  cell_from_output")
    for k, rows in enumerate(rec.rows):
        xs, att, outs = (torch.stack([r[j] for r in rows]).float() for j in range(3))
        on = att[torch.arange(len(qs)), :, cells + 1]  # [n, H]: the cell tokens follow the class token
        row = {"block": k, "gate": round(float(blocks[k].gate_attn.tanh()), 4)}
        for kind, sel in (("place", ~search), ("search", search)):
            row[f"attn_{kind}"] = round(float(on[sel].mean()), 3)
            row[f"attn_{kind}_best_head"] = round(float(on[sel].mean(0).max()), 3)
        row["item_from_query"] = round(probe_accuracy(xs[search], items, len(FASHION_CLASSES)), 3)
        row["cell_from_output"] = round(probe_accuracy(outs[search], cells[search], 4), 3)
        out.append(row)
        print(f"{k:5d} {row['gate']:6.3f}  {row['attn_place']:.2f}/{row['attn_place_best_head']:.2f}"
              f"{'':23s}{row['attn_search']:.2f}/{row['attn_search_best_head']:.2f}{'':11s}"
              f"{row['item_from_query']:.2f}{'':15s}{row['cell_from_output']:.2f}")  # fmt: skip
    return out, len(qs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--adapter", action="append", type=Path, help="default: the run's dialogue adapters")
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--write-search", type=Path, help="also write search-only training shards here")
    ap.add_argument("--write-reverse", type=Path, help="write item-first caption shards here, then stop")
    ap.add_argument("--reverse", action="store_true", help="score --adapter on held-out item-first captions")
    args = ap.parse_args()
    if args.write_reverse:
        rep = write_shards(item_first_records("train", 8000, 11), args.write_reverse, prefix="reverse",
                           maxcount=1000, progress=False, replace=True)  # fmt: skip
        print(f"item-first captions: {rep.written} composites in {args.write_reverse}")
        return
    if args.write_search:
        print(
            f"search-only training conversations: {write_search(args.write_search, args.seed)} in {args.write_search}"
        )
    tower, tok = load_tower(DemoConfig(run_dir=str(args.run)))
    files = args.adapter or dialogue_files(args.run)
    model = load_composed(tower, files).float().eval()
    tower.to(getattr(torch, trained_tower_dtype(files)))  # the tower the adapters were trained on (as `ask`)
    with model.compute_context():  # and computing as they were trained (autocast of a bf16 tower's dtype)
        measure(args, model, tok)


def measure(args, model, tok) -> None:
    """--reverse, or the token probes and the attention table; prints them and a final JSON line."""
    if args.reverse:
        res = reverse_lookup(model, tok)
        print(f"item-first captions, teacher-forced: place words right {res['place_words_right']:.1%}, "
              f"captions with every place right {res['captions_all_places_right']:.1%}")  # fmt: skip
        print(json.dumps(res))
        return
    probes = token_probes(model, tok)
    print("linear probes of an occupied cell's place / item: " + ", ".join(f"{k} {v:.2f}" for k, v in probes.items()))
    out, asked = attention_table(args.run, model, tok, args.n, args.seed)
    print(json.dumps({"questions": asked, "tokens": probes, "blocks": out}))


if __name__ == "__main__":
    main()
