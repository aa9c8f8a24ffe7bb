"""Hugging Face checkpoints: config.json + model*.safetensors (q/k rows un-permuted to Meta's RoPE layout)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelArgs, RopeScaling
from .errors import CheckpointError, TensorStream, check_heads, positive_int, read_json_object


def _hf_rope(cfg: dict) -> tuple[float, RopeScaling | None]:
    """RoPE θ and scaling from an HF config (transformers 4 `rope_theta`/`rope_scaling` or 5 `rope_parameters`)."""
    rp = cfg.get("rope_parameters") or {}
    theta = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rs = cfg.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
    if not rs:
        return float(theta), None
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return float(theta), None
    if kind != "llama3":
        raise CheckpointError(f"config.json: unsupported rope scaling type {kind!r} (only 'llama3' is supported)")
    return float(theta), RopeScaling(
        factor=float(rs["factor"]),
        low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
    )


def args_from_hf_config(cfg: dict, source: str = "config.json") -> ModelArgs:
    if cfg.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{source}: model_type {cfg.get('model_type')!r} is not a Llama model")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise CheckpointError(f"{source}: attention_bias/mlp_bias are not part of Llama 3")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{source}: hidden_act {act!r} is not SwiGLU/silu")
    theta, scaling = _hf_rope(cfg)
    dim = positive_int(cfg, "hidden_size", source)
    n_heads = positive_int(cfg, "num_attention_heads", source)
    n_kv_heads = positive_int(cfg, "num_key_value_heads", source, n_heads)
    head_dim = positive_int(cfg, "head_dim", source, None)
    check_heads(dim, n_heads, n_kv_heads, head_dim, source)
    return ModelArgs(
        dim=dim,
        n_layers=positive_int(cfg, "num_hidden_layers", source),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=positive_int(cfg, "vocab_size", source),
        ffn_dim=positive_int(cfg, "intermediate_size", source),
        norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        head_dim=head_dim or dim // n_heads,
        max_seq_len=positive_int(cfg, "max_position_embeddings", source, 8192),
    )


def hf_to_meta_key(key: str) -> str | None:
    """Map an HF `LlamaForCausalLM` key to the Meta name (None: not a tower weight, e.g. rotary buffers)."""
    key = key.removeprefix("model.")
    if key == "embed_tokens.weight":
        return "tok_embeddings.weight"
    if key == "norm.weight":
        return "norm.weight"
    if key == "lm_head.weight":
        return "output.weight"
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
    if m:
        idx, rest = m.groups()
        table = {
            "self_attn.q_proj.weight": "attention.wq.weight",
            "self_attn.k_proj.weight": "attention.wk.weight",
            "self_attn.v_proj.weight": "attention.wv.weight",
            "self_attn.o_proj.weight": "attention.wo.weight",
            "mlp.gate_proj.weight": "feed_forward.w1.weight",
            "mlp.down_proj.weight": "feed_forward.w2.weight",
            "mlp.up_proj.weight": "feed_forward.w3.weight",
            "input_layernorm.weight": "attention_norm.weight",
            "post_attention_layernorm.weight": "ffn_norm.weight",
        }
        if rest in table:
            return f"layers.{idx}.{table[rest]}"
        if "rotary_emb" in rest:
            return None
    if "rotary_emb" in key:
        return None
    raise KeyError(key)


def meta_to_hf_key(key: str) -> str:
    if key == "output.weight":
        return "lm_head.weight"
    inverse = {
        "tok_embeddings.weight": "embed_tokens.weight",
        "norm.weight": "norm.weight",
        "attention.wq.weight": "self_attn.q_proj.weight",
        "attention.wk.weight": "self_attn.k_proj.weight",
        "attention.wv.weight": "self_attn.v_proj.weight",
        "attention.wo.weight": "self_attn.o_proj.weight",
        "feed_forward.w1.weight": "mlp.gate_proj.weight",
        "feed_forward.w2.weight": "mlp.down_proj.weight",
        "feed_forward.w3.weight": "mlp.up_proj.weight",
        "attention_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
    }
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
    if m:
        return f"model.layers.{m.group(1)}.{inverse[m.group(2)]}"
    return "model." + inverse[key]


def permute_meta_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved-pair RoPE rows (Meta) -> rotate-half rows (HF)."""
    out_dim, in_dim = w.shape
    hd = out_dim // n_heads
    return w.view(n_heads, hd // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def permute_hf_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out_dim, in_dim = w.shape
    hd = out_dim // n_heads
    return w.view(n_heads, 2, hd // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _hf_stream(folder: Path) -> tuple[ModelArgs, TensorStream]:
    cfg_path = folder / "config.json"
    cfg = read_json_object(cfg_path)
    try:
        args = args_from_hf_config(cfg, str(cfg_path))
    except KeyError as e:
        raise CheckpointError(f"{cfg_path}: missing required key {e}") from None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({folder / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index}: lists shard {f.name}, which is missing")
    else:
        files = sorted(folder.glob("*.safetensors"))

    def stream() -> TensorStream:
        for f in files:
            try:
                handle = safe_open(str(f), framework="pt")
            except Exception as e:  # noqa: BLE001 -- garbage, truncated, or not safetensors at all
                raise CheckpointError(f"{f}: not a readable safetensors file ({type(e).__name__}: {e})") from None
            with handle as sf:
                for hf_key in sf.keys():
                    try:
                        key = hf_to_meta_key(hf_key)
                    except KeyError:
                        raise CheckpointError(f"{f}: unexpected key {hf_key!r} for a Llama tower") from None
                    if key is None:
                        continue
                    try:
                        t = sf.get_tensor(hf_key)
                    except Exception as e:  # noqa: BLE001
                        raise CheckpointError(f"{f}: tensor {hf_key!r} cannot be read ({e})") from None
                    if key.endswith("attention.wq.weight"):
                        t = permute_hf_to_meta(t, args.n_heads)
                    elif key.endswith("attention.wk.weight"):
                        t = permute_hf_to_meta(t, args.n_kv_heads)
                    yield key, t

    return args, stream()
