"""Held-out scores of a model, one path for evaluation after training (recipes/evaluate.py) and during it
(`eval: {every: N, data: INDEX, samples: K}`: `InLoopEval`, called by the trainer every N steps).

Each trained modality's plug-in answers the samples that hold its medium and scores the answers (captions: BLEU,
CIDEr, exact match; speech: WER, CER); samples without it are counted as skipped. In the loop the token loss of the
same samples through the training sample maker is reported too (`eval_loss`). Ranks split the samples and the
scores are computed once on the gathered answers; with a sharded tower (`parallel.tower=fsdp`) every rank answers
every sample instead, because sharded layers run collectives and every rank must run the same forwards."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from mm_llama.adapters.generation import answer_samples, to_device
from mm_llama.adapters.modality import AnswerOptions, media_member
from mm_llama.adapters.registry import get_modality
from mm_llama.config import ConfigError
from mm_llama.data.badsamples import SampleError
from mm_llama.data.shards import expand_urls, read_samples

from .train_config import run_kinds
from .train_data import collate_for, samples_for


def answer_pairs(model, tok, cfg, kind: str, samples: Sequence[dict], *, batch_size: int, max_new_tokens: int):
    """(reference, answer) for each sample holding `kind`'s medium and a text, and how many were left out."""
    spec = get_modality(kind)
    usable = [s for s in samples if media_member(s, spec.exts) is not None and "txt" in s]
    opts = AnswerOptions(
        prompt=cfg.data.prompt,
        max_new_tokens=max_new_tokens,
        frames=getattr(getattr(cfg.model, kind), "frames", 8),
    )
    pairs = []
    for i in range(0, len(usable), batch_size):
        chunk = usable[i : i + batch_size]
        answers = answer_samples(model, tok, kind, chunk, opts)
        pairs += [(s["txt"].decode().strip(), a) for s, a in zip(chunk, answers, strict=True)]
    return pairs, len(samples) - len(usable)


def gather(obj, info) -> list:
    """Every rank's `obj`, in rank order (the object itself on one process)."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def scores(kind: str, pairs: list[tuple[str, str]]) -> dict:
    return get_modality(kind).evaluation.metrics([p[0] for p in pairs], [p[1] for p in pairs])


class InLoopEval:
    """The held-out figures of the model being trained: `eval_loss` and each trained modality's metrics
    (`eval_wer`, `eval_cider`, ...; `eval_KIND_METRIC` when the run trains several), with `eval_samples` and
    `eval_seconds` (the cost of one evaluation). The first `eval.samples` samples of `eval.data` are read once."""

    def __init__(self, cfg, tok, info):
        e = cfg.eval
        if not e.data:
            raise ConfigError("eval.every > 0 needs eval.data (an index.json or shards of held-out samples)")
        try:
            urls = expand_urls(e.data)
        except (OSError, ValueError) as err:
            raise ConfigError(f"eval.data: {err}") from None
        self.cfg, self.tok, self.info = cfg, tok, info
        self.samples = read_samples(urls, e.samples)
        if not self.samples:
            raise ConfigError(f"eval.data={e.data}: no samples")
        self.everywhere = cfg.parallel.tower == "fsdp"  # sharded layers: every rank runs the same forwards
        self.maker = None

    def mine(self) -> list[dict]:
        info = self.info
        return self.samples if self.everywhere else self.samples[info.rank :: info.world_size]

    def __call__(self, model, autocast_dtype: torch.dtype | None = None) -> dict:
        t0 = time.perf_counter()
        kinds = run_kinds(self.cfg)
        out: dict = {}
        loss_sum, tokens = self._loss(model, autocast_dtype)
        for kind in kinds:
            e = self.cfg.eval
            pairs, _ = answer_pairs(
                model, self.tok, self.cfg, kind, self.mine(), batch_size=e.batch_size, max_new_tokens=e.max_new_tokens
            )
            everyone = gather(pairs, self.info)
            pairs = everyone[0] if self.everywhere else [p for part in everyone for p in part]
            if not pairs:
                continue
            prefix = "eval_" if len(kinds) == 1 else f"eval_{kind}_"
            out |= {prefix + k: v for k, v in scores(kind, pairs).items() if isinstance(v, int | float)}
        out["eval_loss"] = loss_sum / max(tokens, 1)
        out["eval_samples"] = len(self.samples)
        out["eval_seconds"] = time.perf_counter() - t0
        return out

    @torch.no_grad()
    def _loss(self, model, autocast_dtype) -> tuple[float, int]:
        """The token loss of the held-out samples (the training maker and collate), summed over ranks."""
        if self.maker is None:
            self.maker, self.collate = samples_for(self.cfg, self.tok, model), collate_for(self.cfg)
        items = []
        for raw in self.mine():
            try:
                items.append(self.maker(raw))
            except SampleError:
                continue
        device = self.info.device
        amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        total, n = 0.0, 0
        bs = self.cfg.eval.batch_size
        for i in range(0, len(items), bs):
            batch = {k: to_device(v, device) for k, v in self.collate(items[i : i + bs]).items()}
            with amp:
                res = model(**batch)
            total, n = total + float(res.loss_sum), n + int(res.n_tokens)
        if self.everywhere or not self.info.distributed:
            return total, n
        t = torch.tensor([total, float(n)], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t[0]), int(t[1])
