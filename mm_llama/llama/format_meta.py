"""Meta checkpoints: params.json + consolidated.NN.pth (model-parallel shards merged on read, split on write)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from .config import ModelArgs, RopeScaling, meta_ffn_dim
from .errors import CheckpointError, TensorStream, check_heads, positive_int, read_json_object
from .model import Transformer

_META_KEYS_USED = {
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "vocab_size",
    "multiple_of",
    "ffn_dim_multiplier",
    "norm_eps",
    "rope_theta",
    "use_scaled_rope",
    "rope_scaling_factor",
    "rope_high_freq_factor",
    "max_seq_len",
}
# keys llama-models' ModelArgs knows but the text tower does not use
_META_KEYS_IGNORED = {"max_batch_size", "use_scaled_rope_v2", "vision_chunk_size", "vision_max_num_chunks"}
_META_KEYS_IGNORED |= {"vision_num_cross_attention_layers", "quantization_args", "lora_args"}
# mm_llama's own additions for small vision models (Meta's sizes imply 16 heads and layers 3,7,15,23,30)
_META_KEYS_IGNORED |= {"vision_heads", "vision_return_intermediate"}


def args_from_meta_params(params: dict, source: str = "params.json") -> ModelArgs:
    unknown = set(params) - _META_KEYS_USED - _META_KEYS_IGNORED
    if unknown:
        raise CheckpointError(f"{source}: unknown keys {sorted(unknown)}")
    dim = positive_int(params, "dim", source)
    n_heads = positive_int(params, "n_heads", source)
    n_kv_heads = positive_int(params, "n_kv_heads", source, n_heads)
    check_heads(dim, n_heads, n_kv_heads, None, source)
    scaling = None
    if params.get("use_scaled_rope"):
        scaling = RopeScaling(
            factor=float(params.get("rope_scaling_factor") or 8.0),
            high_freq_factor=float(params.get("rope_high_freq_factor") or 4.0),
        )
    return ModelArgs(
        dim=dim,
        n_layers=positive_int(params, "n_layers", source),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=positive_int(params, "vocab_size", source),
        ffn_dim=meta_ffn_dim(dim, positive_int(params, "multiple_of", source, 256), params.get("ffn_dim_multiplier")),
        norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=params.get("rope_theta", 10000.0),
        rope_scaling=scaling,
        max_seq_len=params.get("max_seq_len") or (8192 if scaling is None else 131072),
    )


# Meta model-parallel layout: which dim each weight is split on (None = replicated)
_MP_DIM = {
    "tok_embeddings": 0,
    "output": 0,
    "wq": 0,
    "wk": 0,
    "wv": 0,
    "w1": 0,
    "w3": 0,
    "wo": 1,
    "w2": 1,
}


def _mp_dim(key: str) -> int | None:
    parts = key.split(".")
    return _MP_DIM.get(parts[-2]) if len(parts) >= 2 else None


def _meta_stream(folder: Path) -> tuple[ModelArgs, TensorStream]:
    params_path = folder / "params.json"
    params = read_json_object(params_path)
    args = args_from_meta_params(params, str(params_path))
    shards = sorted(folder.glob("consolidated.*.pth"))
    sds = []  # memory-mapped: opening them costs no copy
    for s in shards:
        try:
            sds.append(torch.load(s, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:  # corrupt / truncated / pickled objects
            raise CheckpointError(f"{s}: cannot be read as a weights-only torch checkpoint ({e})") from None
    if "output.weight" not in sds[0] and "tok_embeddings.weight" in sds[0] and not args.tie_embeddings:
        # Llama 3.2 1B/3B: params.json says nothing, the checkpoint has no output layer: the embeddings are tied
        print(
            f"{shards[0]}: no output.weight, so the output layer is tied to tok_embeddings (as in Llama 3.2 1B/3B)",
            file=sys.stderr,
        )
        args = args.replace(tie_embeddings=True)

    def stream() -> TensorStream:
        keys = list(sds[0])
        for s, sd in zip(shards[1:], sds[1:]):
            if set(sd) != set(keys):
                diff = sorted(set(sd) ^ set(keys))[:5]
                raise CheckpointError(f"{s}: model-parallel shard keys differ from {shards[0].name}: {diff}")
        for key in keys:
            if key.endswith("rope.freqs") or key == "freqs":
                continue
            parts = [sd.pop(key) for sd in sds]
            if len(parts) == 1:
                yield key, parts[0]
                continue
            dim = _mp_dim(key)
            yield key, (parts[0] if dim is None else torch.cat(parts, dim=dim))
            del parts

    return args, stream()


def save_meta(model: Transformer, folder: str | Path, *, model_parallel: int = 1) -> None:
    """Write `model` as a Meta checkpoint (params.json + consolidated.NN.pth), optionally split in shards."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    a = model.args
    mult = _find_meta_ffn_multiplier(a.dim, a.ffn_dim)
    params = {
        "dim": a.dim,
        "n_layers": a.n_layers,
        "n_heads": a.n_heads,
        "n_kv_heads": a.n_kv_heads,
        "vocab_size": a.vocab_size,
        "multiple_of": mult[0],
        "ffn_dim_multiplier": mult[1],
        "norm_eps": a.norm_eps,
        "rope_theta": a.rope_theta,
        "use_scaled_rope": a.rope_scaling is not None,
        "max_seq_len": a.max_seq_len,
    }
    if a.rope_scaling is not None:
        rs = a.rope_scaling
        if (rs.low_freq_factor, rs.original_max_position_embeddings) != (1.0, 8192):
            raise CheckpointError(f"Meta params.json cannot express RoPE scaling {rs}")
        params["rope_scaling_factor"] = rs.factor
        params["rope_high_freq_factor"] = rs.high_freq_factor
    if a.head_dim != a.dim // a.n_heads:
        raise CheckpointError("Meta params.json cannot express head_dim != dim // n_heads")
    (folder / "params.json").write_text(json.dumps(params, indent=2))
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for r in range(model_parallel):
        shard = {}
        for k, v in sd.items():
            d = _mp_dim(k)
            if model_parallel == 1 or d is None:
                shard[k] = v.clone()
            else:
                if v.shape[d] % model_parallel:
                    raise CheckpointError(f"{k}: dim {d} of size {v.shape[d]} not divisible by {model_parallel}")
                shard[k] = v.chunk(model_parallel, dim=d)[r].clone()
        torch.save(shard, folder / f"consolidated.{r:02d}.pth")


def _find_meta_ffn_multiplier(dim: int, ffn_dim: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) reproducing `ffn_dim` through Meta's formula."""
    for multiple_of in (256, 1024, 4096, 128, 64, 32, 16, 8, 4, 2, 1):
        if meta_ffn_dim(dim, multiple_of, None) == ffn_dim:
            return multiple_of, None
        base = int(2 * (4 * dim) / 3)
        guess = ffn_dim / base
        for m in (guess, round(guess, 6), round(guess, 4), round(guess, 2), math.floor(guess * 1e4) / 1e4):
            if meta_ffn_dim(dim, multiple_of, m) == ffn_dim:
                return multiple_of, m
    raise CheckpointError(f"FFN width {ffn_dim} cannot be expressed with Meta's params.json for dim {dim}")
