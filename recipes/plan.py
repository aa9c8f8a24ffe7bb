"""Will a training config fit, and how to lay it out: memory per GPU from the model's own code (adapters/plan.py).

    mm-llama plan --config recipes/configs/gpu_llama3_1_70b_image.yaml --gpus 16 --gpu-mem 80
    python -m recipes.plan --config ... --gpus 8 --gpu-mem 80 [--gpus-per-machine 8] [--json] [key=value ...]

Reads the same YAML (and key=value overrides) as recipes/train.py. The tower's shape comes from `tower.path` (a
Meta folder's params.json, an HF folder's config.json -- an HF Mllama folder brings its image adapter's shape too
-- or a GGUF header; no weights are read) or from `tower.preset`. Prints, per GPU, the tower, the adapter's frozen
and trainable weights, gradients, optimizer state and activations for the config's micro-batch (`data.batch_size`)
and sequence (`--seq-len`, default: `data.max_text_tokens` + 16 prompt tokens), with and without activation
checkpointing, for every layout (`parallel.tower`, `parallel.mesh`), and names the first that fits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import replace
from dataclasses import replace as dc_replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from mm_llama.adapters.composed import ComposedModel
from mm_llama.adapters.hf_mllama import is_mllama_folder, mllama_skeleton
from mm_llama.adapters.plan import USABLE, Layout, Workload, candidates, measure_model, param_bytes, plan
from mm_llama.adapters.registry import MODALITIES, get_modality
from mm_llama.assets import resolve
from mm_llama.config import ConfigError
from mm_llama.engine import exit_process
from mm_llama.engine.dist import launched_distributed
from mm_llama.engine.parallelize import weight_dtype
from mm_llama.engine.shard import is_sharded
from mm_llama.llama import Transformer, get_preset
from mm_llama.llama.checkpoint import CheckpointError, read_checkpoint
from mm_llama.options import RANGES, Parser

from .dry_run import dry_run
from .train import TowerCfg, load_train_config, run_kinds, trainer_for

PROMPT_TOKENS = 16  # BOS, the media token and a short prompt before the target text


def meta_model(cfg):
    """The config's model on the meta device (shapes only): its tower and the trained part on the frozen parts it
    requires; weight files named in the config are not read (a required part named by a file is built fresh)."""

    spec = get_modality(cfg.model.modality)
    sections = {name: _without_files(getattr(cfg.model, name), m.scale.file_options) for name, m in MODALITIES.items()}
    model_cfg = replace(cfg.model, **sections)
    path = Path(resolve(cfg.tower.path)) if cfg.tower.path else None
    if path is not None and not path.exists():
        if cfg.tower.preset == TowerCfg.preset:
            raise FileNotFoundError(f"tower.path {path} is not on this machine: give tower.preset=NAME for its shape")
        print(
            f"plan: tower.path {path} is not on this machine: the shape of tower.preset={cfg.tower.preset}",
            file=sys.stderr,
        )
        path = None
    parts = {}
    if path is not None and is_mllama_folder(path):  # Llama 3.2 Vision: its text model and its image part's shape
        fused, _, _ = mllama_skeleton(path)
        tower, image = fused.tower, fused.image
        image.requires_grad_(spec.name == "image")
        image.learnable_embedding.requires_grad_(spec.name == "image" and model_cfg.image.train_token_rows)
        image.vision_encoder.requires_grad_(spec.name == "image" and not model_cfg.image.freeze_vision)
        if spec.name == "image":
            tower.requires_grad_(False)
            return ComposedModel(tower, image=image)
        parts["image"] = image  # a video stage trains on a frozen image part
    else:
        if path is not None:
            args, _, _ = read_checkpoint(path)
        else:
            args = get_preset(cfg.tower.preset)
            if cfg.tower.vocab_size:
                args = args.replace(vocab_size=cfg.tower.vocab_size)
        with torch.device("meta"):
            tower = Transformer(args)
    tower.requires_grad_(False)
    with torch.device("meta"):
        for kind in run_kinds(cfg):  # every part the run trains (model.modalities), on the parts they require
            spec = MODALITIES[kind]
            if not all(r in parts for r in spec.requires):
                for need, base in spec.part.base_parts(tower, model_cfg).items():
                    parts.setdefault(need, base.requires_grad_(False))
            parts[kind] = spec.part.build(tower, model_cfg, parts)
    return ComposedModel(tower, parts)


def _without_files(section, names: tuple[str, ...]):
    """The modality's options without weight files to read (the plan needs shapes only)."""
    present = [f for f in names if hasattr(section, f)]
    return replace(section, **{f: None for f in present}) if present else section


def measure(cfg, *, device: str = "cuda", seq_len: int | None = None, labels: int | None = None):
    """ModelSizes for the config's model and micro-batch; dtype as the recipe picks it on `device`."""

    model = meta_model(cfg)
    dt = weight_dtype(cfg.dtype, device)
    labels = labels or cfg.data.max_text_tokens + 1
    seq_len = seq_len or labels + PROMPT_TOKENS
    w = Workload(cfg.data.batch_size, seq_len, labels, tower_dtype=dt, compute_dtype=dt)
    # weights are counted in their training dtypes; the pieces then run in the compute dtype (autocast on GPU)
    units = model.shard_units()
    unit_params = list(dict.fromkeys(p for u in units for p in u.parameters()))
    unit_trainable = sum(p.numel() for p in unit_params if p.requires_grad)
    unit_frozen = param_bytes([p for p in unit_params if not p.requires_grad], torch.float32)
    unit_max = max((sum(p.numel() for p in u.parameters()) for u in units), default=0)
    spec = get_modality(cfg.model.modality)
    for part in model.parts.values():
        part.to(dt)
    pieces = spec.scale.plan_pieces(model.part(spec.name), model.parts, w.batch, seq_len, dt, cfg.model)
    sizes = measure_model(model, pieces, w)
    sizes.unit_trainable_params, sizes.unit_frozen, sizes.unit_max_params = unit_trainable, unit_frozen, unit_max
    sizes.compute_bytes = torch.empty((), dtype=dt).element_size()
    return sizes, w


def plan_config(cfg, gpus: int, gpu_mem: float, gpus_per_machine: int = 8, **kw):
    """(sizes, workload, [Plan for every candidate layout], the config's own Plan)."""

    per_machine = min(gpus_per_machine, gpus)
    if cfg.parallel.mesh == "hybrid" and gpus % per_machine:
        raise ConfigError(
            f"parallel.mesh=hybrid: {gpus} GPUs do not split into machines of {per_machine} (training refuses it): "
            "give a --gpus that is a multiple of --gpus-per-machine, or parallel.mesh=flat"
        )
    sizes, w = measure(cfg, **kw)
    plans = [plan(sizes, lay, gpu_mem) for lay in candidates(gpus, per_machine)]
    own = Layout(
        gpus, per_machine, cfg.parallel.tower, cfg.parallel.mesh, cfg.activation_checkpointing, cfg.parallel.adapters
    )
    return sizes, w, plans, plan(sizes, own, gpu_mem)


def report(cfg, sizes, w, plans, own, gpus: int, gpu_mem: float, config_name: str) -> str:
    lines = [
        f"plan: {config_name}: {cfg.model.modality} adapter on a {sizes.tower_params / 1e9:.1f}B-parameter "
        f"tower ({sizes.n_layers} layers, {str(w.tower_dtype).replace('torch.', '')}); "
        f"{sizes.trainable_params / 1e9:.2f}B trainable parameters",
        f"per GPU: micro-batch {w.batch} x {w.seq_len} tokens ({w.labels} labelled); {gpus} GPUs x {gpu_mem:g} GB "
        f"(usable {USABLE:.0%})",
    ]
    cols = {
        "tower weights": "tower",
        "units gathered": "gathered",
        "adapter frozen weights": "adapter",
        "trainable weights": "trained",
        "gradients": "grads",
        "optimizer state": "AdamW",
        "activations: tower layers": "act:tower",
        "activations: adapter": "act:adapt",
        "activations: logits + loss": "act:loss",
    }
    width = max(len(p.layout.short()) for p in plans) + 2
    lines.append("GB per GPU: " + "; ".join(f"{v} = {k}" for k, v in cols.items()))
    lines.append(f"{'layout':<{width}}" + "".join(f"{v:>10}" for v in cols.values()) + f"{'total':>10}  fits")
    for p in plans:
        lines.append(
            f"{p.layout.short():<{width}}"
            + "".join(f"{p.rows[k]:>10.2f}" for k in cols)
            + f"{p.total:>10.2f}  {'yes' if p.fits else 'no'}"
        )
    best = next((p for p in plans if p.fits), None)
    lines.append(
        f"this config ({own.layout.describe()}): {own.total:.1f} GB per GPU: {'fits' if own.fits else 'does NOT fit'}"
    )
    if best is not None:
        lines.append(f"verdict: fits; use {best.layout.describe()} ({best.total:.1f} GB per GPU)")
    else:
        least = min(plans, key=lambda p: p.total)
        trainable = sum(least.rows[k] for k in ("trainable weights", "gradients", "optimizer state"))
        lines.append(
            f"verdict: does NOT fit on {gpus} x {gpu_mem:g} GB: the least is {least.total:.1f} GB per GPU "
            f"({least.layout.describe()}), of which {trainable:.1f} GB are trainable weights, their gradients and "
            f"AdamW state. More GPUs: {min_gpus(sizes, least.layout, gpu_mem)}; otherwise a smaller "
            "micro-batch or fewer cross-attention layers (model.<modality>.xattn_count)"
        )
    return "\n".join(lines)


def min_gpus(sizes, layout, gpu_mem: float, limit: int = 65536) -> str:
    """The fewest GPUs (whole machines) on which `layout` fits, or a note that none up to `limit` does."""

    n = layout.gpus_per_machine
    while n <= limit:
        if plan(sizes, dc_replace(layout, gpus=n), gpu_mem).fits:
            return f"at least {n} GPUs with that layout"
        n *= 2
    fixed = plan(sizes, dc_replace(layout, gpus=limit), gpu_mem)
    big = sorted(fixed.rows.items(), key=lambda kv: -kv[1])[:3]
    return (
        "no number of GPUs: " + ", ".join(f"{k} {v:.1f} GB" for k, v in big) + " per GPU do not shrink with "
        "more of them"
    )


def to_json(sizes, w, plans, own) -> dict:
    best = next((p for p in plans if p.fits), None)
    return {
        "trainable_params": sizes.trainable_params,
        "batch": w.batch,
        "seq_len": w.seq_len,
        "labels": w.labels,
        "layouts": [
            {"layout": p.layout.describe(), "fits": p.fits, "total_gb": p.total, "rows_gb": p.rows} for p in plans
        ],
        "config": {"layout": own.layout.describe(), "fits": own.fits, "total_gb": own.total, "rows_gb": own.rows},
        "verdict": {"fits": best is not None, "use": best.layout.describe() if best else None},
    }


# ----------------------------------------------------------------------------------------------
# checking the plan against a real step on this machine (`--measure`, a scaled-down config)


def measured_step(cfg) -> tuple[int, dict, object]:
    """Peak bytes of one real training step of `cfg` on this rank: the training recipe's own trainer (model,
    placement, engine, optimizer) on the first batch of `data.train`, after a first step so AdamW's state exists
    (no run folder is touched: the trainer runs in a temporary one, resume off); under torchrun every rank runs it
    with the config's `parallel.*` layout. CUDA: the allocator's peak; CPU: the bytes of every live tensor of the
    model (this rank's shards), buckets and optimizer before the step plus the profiler's high-water mark of
    allocations during it. Returns (peak, the batch's shapes for the plan, the process-group info)."""

    cfg = replace(cfg, resume="none", run_dir=tempfile.mkdtemp(prefix="mm_llama_plan_"), tensorboard=False)
    trainer = trainer_for(cfg, batches_per_epoch=1, shuffle_buffer=1)
    batch = next(iter(trainer.loader))

    def step():
        trainer.step(iter([batch]))

    step()
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    shapes = {"seq_len": int(batch["input_ids"].shape[1]), "labels": labelled / batch["input_ids"].shape[0]}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(), shapes, trainer.info
    live: dict[int, int] = {}
    tensors = [*trainer.model.parameters(), *trainer.model.buffers()]
    tensors += [b.buffer for b in getattr(trainer.wrapped, "buckets", [])]
    tensors += [t for st in trainer.optimizer.state.values() for t in st.values() if torch.is_tensor(t)]
    for t in tensors:
        st = (t.to_local() if is_sharded(t) else t).untyped_storage()
        live[st._cdata] = st.nbytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    level = high = 0
    events = prof.profiler.kineto_results.events()
    for _, delta in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        level += delta
        high = max(high, level)
    return sum(live.values()) + high, shapes, trainer.info


def check(cfg) -> dict:
    """The plan for this rank (its layout: one process, or the config's `parallel.*` under torchrun) vs a measured
    step of the same config and batch shapes."""

    measured, shapes, info = measured_step(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes, w = measure(cfg, device=device, **shapes)
    sharded = info.distributed and cfg.parallel.tower == "fsdp"
    layout = Layout(
        info.world_size,
        info.local_world_size,
        cfg.parallel.tower if sharded else "replicate",
        cfg.parallel.mesh,
        cfg.activation_checkpointing,
        cfg.parallel.adapters if sharded else "replicate",
    )
    predicted = plan(sizes, layout, 1e9)
    return {
        "predicted_gb": predicted.total,
        "measured_gb": measured / 1e9,
        "rank": info.rank,
        "layout": layout.describe(),
        "ratio": predicted.total * 1e9 / measured,
        "rows_gb": predicted.rows,
        **shapes,
    }


def main(argv=None, prog: str | None = None) -> int:
    ap = Parser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_intermixed_args(argv))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", required=True, help="a training config (recipes/configs/*.yaml)")
    ap.add_argument("--gpus", type=RANGES["gpus"], default=None, help="GPUs in total")
    ap.add_argument("--gpu-mem", type=RANGES["gpu_mem"], default=None, help="GB of memory per GPU (e.g. 80)")
    ap.add_argument("--gpus-per-machine", type=RANGES["gpus"], default=8)
    ap.add_argument("--seq-len", type=RANGES["seq_len"], default=None, help="tokens per sequence (default: text + 16)")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    ap.add_argument(
        "--measure",
        action="store_true",
        help="also run one real step of the config here (one process; scale it down with key=value) "
        "and print the plan's prediction for it beside the measured peak",
    )
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="build the config's full-size model on fake CUDA tensors (no memory) and run one training forward: "
        "every tensor off the device or in a stray dtype is reported (exit 1 when there is one); needs no --gpus",
    )
    ap.add_argument("overrides", nargs="*", help="key=value, as for recipes/train.py")


def run(args) -> int:
    if args.dry_run:
        return run_dry(args)
    if args.gpus is None or args.gpu_mem is None:
        print("mm-llama plan: error: --gpus and --gpu-mem are required (or --dry-run)", file=sys.stderr)
        return 2
    try:
        cfg = load_train_config(args.config, args.overrides)
        sizes, w, plans, own = plan_config(cfg, args.gpus, args.gpu_mem, args.gpus_per_machine, seq_len=args.seq_len)
    except (ConfigError, CheckpointError, FileNotFoundError, KeyError, NotImplementedError) as e:
        print(f"mm-llama plan: error: {e}", file=sys.stderr)
        return 2

    if os.environ.get("RANK", "0") != "0":
        pass  # under torchrun (--measure of a sharded layout): rank 0 prints
    elif args.json:
        print(json.dumps(to_json(sizes, w, plans, own)))
    else:
        print(report(cfg, sizes, w, plans, own, args.gpus, args.gpu_mem, args.config))
    if args.measure:
        c = check(cfg)
        if c["rank"] == 0:
            print(
                f"measured here (rank 0, {c['layout']}, batch {cfg.data.batch_size} x {c['seq_len']} tokens, "
                f"{c['labels']:.2f} labelled): predicted {c['predicted_gb']:.3f} GB, measured "
                f"{c['measured_gb']:.3f} GB, ratio {c['ratio']:.3f}",
                flush=True,
            )
            print(json.dumps({"plan_check": c}), flush=True)

        if launched_distributed():
            exit_process(0)
    return 0


def run_dry(args, inject=None) -> int:
    """`--dry-run`: the report of recipes/dry_run.py; exit 1 when it found a problem."""
    try:
        cfg = load_train_config(args.config, args.overrides)
        report = dry_run(cfg, lambda: meta_model(cfg), inject=inject)
    except (ConfigError, CheckpointError, FileNotFoundError, KeyError, NotImplementedError) as e:
        print(f"mm-llama plan: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        head = (
            f"dry run: {args.config}: {report['params'] / 1e9:.2f}B parameters on fake cuda ({report['dtype']} tower, "
            f"fp32 parts), one training forward of {report['batch']['input_ids']} tokens: {report['ops']} ops"
        )
        lines = [head, f"problems: {len(report['problems'])}"] + [f"  {p}" for p in report["problems"]]
        lines += [f"notes: {len(report['notes'])}"] + [f"  {n}" for n in report["notes"]]
        print("\n".join(lines))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
