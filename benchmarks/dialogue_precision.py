"""The demo's dialogue answers in one precision or the other: is a drop in the held-out figures the tower's
precision when answering, or the adapters that training produced?

    python benchmarks/dialogue_precision.py runs/demo --dtype float32 [--adapter FILE ...] [--limit 60]
    python benchmarks/dialogue_precision.py runs/demo --checkpoint runs/demo/dialogue/checkpoints/step_00000100
    python benchmarks/dialogue_precision.py runs/demo --residual 16
    python benchmarks/dialogue_precision.py runs/demo --via-captions

`--dtype`: the frozen tower's weights for answering (the adapters stay fp32, as in the demo's evaluation; by default
the dtype the adapter files record). The held-out questions are answered by the demo's own evaluation
(`recipes/demo/evaluation.py eval_dialogue`, the same calls as `mm-llama ask`), the first `--limit` of each kind.
`--adapter` (repeat): other adapter files than the run's dialogue adapters; `--checkpoint`: a training checkpoint's
trainable weights loaded over them (the dialogue stage's `checkpoints/step_N`).

`--via-captions`: the typed place questions ("what is at the top left?") answered directly and read off the caption
the same adapters write of the same picture; and how many wrong direct answers name an item of another cell.
`--packing K`: the summed loss of K training conversations each alone, padded together and packed, in fp32 and
bf16. `--residual K`: on K training conversations, for each cross-attention block, the size of what it adds to the
tower's residual stream (relative to the stream) and the share of that addition a bf16 cast of the stream loses (the
tower's bf16 matmuls read the stream cast to bf16). Prints a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from mm_llama.adapters.files import load_composed, trained_tower_dtype
from mm_llama.adapters.generation import Collate, answer_samples
from mm_llama.adapters.modality import AnswerOptions
from mm_llama.adapters.xattn import GatedCrossAttentionBlock
from mm_llama.assets import resolve
from mm_llama.config import load_config
from mm_llama.data.shards import expand_urls, read_samples
from mm_llama.llama import Tokenizer
from mm_llama.recipes.demo import dialogue, scenes
from mm_llama.recipes.demo.config import DemoConfig, dialogue_files, load_tower
from mm_llama.recipes.demo.evaluation import eval_dialogue
from mm_llama.recipes.demo.scenes import POSITIONS
from mm_llama.recipes.train import load_train_config, model_for
from mm_llama.recipes.train_data import model_kinds, samples_for


def dialogue_model(run: Path, files: list[Path], dtype: str | None, limit: int, checkpoint: Path | None):
    """The demo config (`eval_limit`), `files` composed on the tower in `dtype` (as trained when None), a checkpoint's
    weights over them, and the tokenizer -> (cfg, model, tok, dtype)."""
    cfg = load_config(DemoConfig, None, [f"run_dir={run}", f"eval_limit={limit}"])
    dtype = dtype or trained_tower_dtype(files)
    tower, tok = load_tower(cfg)
    model = load_composed(tower, files).float()
    if checkpoint is not None:
        weights, own = load_file(checkpoint / "adapter.safetensors"), model.state_dict()
        if unknown := [k for k in weights if k not in own]:
            raise SystemExit(f"{checkpoint}: {len(unknown)} weights this model does not have, e.g. {unknown[0]}")
        model.load_state_dict(weights, strict=False)
    tower.to(getattr(torch, dtype))
    return cfg, model, tok, dtype


def answers(run: Path, loaded: tuple) -> tuple[dict, list[dict]]:
    """The held-out dialogue figures of a `dialogue_model`, and the answered rows."""
    cfg, model, tok, dtype = loaded
    with torch.inference_mode():
        res = eval_dialogue(cfg, run, model, tok)
    figures = {k: v for k, v in res.items() if k.endswith("_right")}
    return {"dtype": dtype, **figures, "by_question": res["by_question"]}, res["rows"]


def via_captions(loaded: tuple, rows: list[dict]) -> dict:
    """The typed place questions ("what is at the top left?") answered two ways by the same adapters: directly
    (`rows`), and from the caption they write of the same picture (the caption's item in the asked cell). For the
    wrong direct answers: does the named item stand in another cell of the caption?"""
    cfg, model, tok, _ = loaded
    asked = [r for r in rows if r["kind"] == "image" and dialogue.question_key(r["question"]) == "cell"]
    samples = [{"png": Path(r["media"][0]).read_bytes(), "__key__": r["media"][0]} for r in asked]
    with torch.inference_mode():
        captions = answer_samples(model, tok, "image", samples, AnswerOptions(max_new_tokens=cfg.max_new_tokens))
    out = {"questions": len(asked), "direct_right": 0, "from_caption_right": 0, "wrong_naming_another_cell": 0}
    for r, caption in zip(asked, captions, strict=True):
        layout = scenes.parse_composite_caption(caption) or {}
        cell = next(i for i, p in enumerate(POSITIONS) if r["answer"].startswith(f"at the {p} there"))
        out["direct_right"] += r["right"]
        out["from_caption_right"] += dialogue.right(dialogue.Asker.cell_answer(layout, cell), r["answer"])
        named = [c for c, v in layout.items() if r["hyp"].endswith(dialogue.item_phrase(v))]
        out["wrong_naming_another_cell"] += not r["right"] and bool(named) and cell not in named
    return out


def training_items(run: Path, n: int, dtype: torch.dtype):
    """The run's dialogue model as its stage trained it (the dialogue adapters on a tower of `dtype`), the first `n`
    training conversations as training items, and the stage's training config (-> model, items, cfg)."""
    cfg = load_train_config(
        run / "dialogue/config.yaml",
        [f"model.{k}.init={run}/dialogue/adapter-{k}.safetensors" for k in ("image", "video")],
    )
    tok = Tokenizer.from_pretrained(resolve(cfg.model.tokenizer))
    model = model_for(cfg, dtype).eval()
    make = samples_for(cfg, tok, model)
    raws = read_samples(expand_urls(str(run / "shards/dialogue_train/index.json")), n)
    return model, [make(dict(r, __src__=0)) for r in raws], cfg


def packing(run: Path, n: int) -> list[dict]:
    """The summed token loss of `n` training conversations, each alone, padded in one batch and packed into rows
    of the stage's `data.max_tokens`, in fp32 and under bf16 autocast (packing is a layout change only)."""
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        model, items, cfg = training_items(run, n, dtype)
        kinds = model_kinds(cfg)
        amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
        with torch.no_grad(), amp:
            alone = sum(float(model(**Collate(kinds)([it])).loss_sum) for it in items)
            padded = float(model(**Collate(kinds)(items)).loss_sum)
            packed = float(model(**Collate(kinds, pack_tokens=cfg.data.max_tokens)(items)).loss_sum)
        rows.append({"dtype": str(dtype).removeprefix("torch."), "alone": alone, "padded": padded, "packed": packed})
    return rows


def residual(run: Path, n: int) -> list[dict]:
    """Per cross-attention block: |what it adds| / |the stream|, and the share of the addition lost when the stream
    is cast to bf16, on the first `n` training conversations through the run's dialogue adapters (bf16 tower)."""
    model, items, cfg = training_items(run, n, torch.bfloat16)
    batch = Collate(model_kinds(cfg))(items)
    rows: list[dict] = []

    def hook(block, args, out):
        x, row = args[0].float(), args[3][..., 0] > 0
        if not bool(row.any()):
            return
        added = out.float() - x
        cast = out.float().bfloat16().float() - x.bfloat16().float()
        rows.append(
            {
                "block": len(rows),
                "added_over_stream": float(added[row].norm() / x[row].norm()),
                "lost_by_bf16_cast": float((cast - added)[row].norm() / added[row].norm()),
            }
        )

    for m in model.modules():
        if isinstance(m, GatedCrossAttentionBlock):
            m.register_forward_hook(hook)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(**batch)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--adapter", action="append", type=Path, help="default: the run's dialogue adapters")
    ap.add_argument("--checkpoint", type=Path, help="a dialogue checkpoint folder, loaded over the adapters")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], help="the tower's dtype (default: as trained)")
    ap.add_argument("--limit", type=int, default=250, help="held-out questions of each kind")
    ap.add_argument("--residual", type=int, default=0, help="measure the bf16 stream on this many conversations")
    ap.add_argument("--packing", type=int, default=0, help="packed vs alone losses of this many conversations")
    ap.add_argument("--via-captions", action="store_true", help="place questions: direct vs from the caption")
    a = ap.parse_args(argv)
    if a.packing:
        out = {"packing": packing(a.run, a.packing)}
        for r in out["packing"]:
            sums = "  ".join(f"{k} {r[k]:.4f}" for k in ("alone", "padded", "packed"))
            print(f"{r['dtype']:9s} loss sum: {sums}")
    elif a.residual:
        out = {"residual": residual(a.run, a.residual)}
        for r in out["residual"]:
            added, lost = r["added_over_stream"], r["lost_by_bf16_cast"]
            print(f"block {r['block']}: adds {added:.4f} of the stream; a bf16 cast loses {lost:.3f} of it")
    else:
        loaded = dialogue_model(a.run, a.adapter or dialogue_files(a.run), a.dtype, a.limit, a.checkpoint)
        out, rows = answers(a.run, loaded)
        for kind, qs in out["by_question"].items():
            asked = "  ".join(f"{q} {r}/{n}" for q, (r, n) in qs.items())
            print(f"{kind:10s} right {out[f'{kind}_right']:.3f}  {asked}")
        if a.via_captions:
            out["via_captions"] = v = via_captions(loaded, rows)
            n, direct, caption, other = (v[k] for k in v)
            print(f"place questions: {direct}/{n} answered right, {caption}/{n} right from the same adapters' captions")
            print(f"  wrong direct answers that name an item of another cell: {other}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
