"""Load a Llama 3 tower from what the user has: a Meta folder, a Hugging Face folder or a GGUF file.

Every format is turned into one native state dict (Meta parameter names) and streamed into a model
built on the meta device, one tensor at a time, so peak memory stays about one copy of the model.

    Meta  : params.json + consolidated.NN.pth (model-parallel shards merged)
    HF    : config.json + model.safetensors | model-0000x-of-0000y.safetensors + index (q/k un-permuted)
    GGUF  : *.gguf, dequantised with the `gguf` package (q/k already in Meta's interleaved layout)
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from .config import ModelArgs, RopeScaling, meta_ffn_dim
from .model import Transformer, rope_inv_freq


class CheckpointError(ValueError):
    """A checkpoint could not be loaded; the message names the file and key."""


# ----------------------------------------------------------------------------------------------
# format detection


def detect_format(path: str | Path) -> str:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path does not exist: {p}")
    if p.is_file():
        if p.suffix == ".gguf":
            return "gguf"
        raise CheckpointError(f"unknown checkpoint format: {p} (expected a .gguf file, a Meta folder or an HF folder)")
    if (p / "params.json").is_file():
        if not sorted(p.glob("consolidated.*.pth")):
            raise CheckpointError(f"Meta folder {p} has params.json but no consolidated.NN.pth file")
        return "meta"
    if (p / "config.json").is_file():
        if not sorted(p.glob("*.safetensors")):
            raise CheckpointError(f"Hugging Face folder {p} has config.json but no *.safetensors file")
        return "hf"
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf"
    raise CheckpointError(
        f"unknown checkpoint format in {p}: expected params.json + consolidated.*.pth (Meta), "
        "config.json + *.safetensors (Hugging Face) or one .gguf file"
    )


def _gguf_file(path: Path) -> Path:
    if path.is_file():
        return path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) != 1:
        raise CheckpointError(f"expected exactly one .gguf file in {path}, found {len(ggufs)}")
    return ggufs[0]


# ----------------------------------------------------------------------------------------------
# configs


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
    for key in ("dim", "n_layers", "n_heads", "vocab_size"):
        if key not in params:
            raise CheckpointError(f"{source}: missing required key {key!r}")
    dim = params["dim"]
    scaling = None
    if params.get("use_scaled_rope"):
        scaling = RopeScaling(
            factor=float(params.get("rope_scaling_factor") or 8.0),
            high_freq_factor=float(params.get("rope_high_freq_factor") or 4.0),
        )
    return ModelArgs(
        dim=dim,
        n_layers=params["n_layers"],
        n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
        vocab_size=params["vocab_size"],
        ffn_dim=meta_ffn_dim(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
        norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=params.get("rope_theta", 10000.0),
        rope_scaling=scaling,
        max_seq_len=params.get("max_seq_len") or (8192 if scaling is None else 131072),
    )


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
    n_heads = cfg["num_attention_heads"]
    return ModelArgs(
        dim=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        vocab_size=cfg["vocab_size"],
        ffn_dim=cfg["intermediate_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
        max_seq_len=cfg.get("max_position_embeddings", 8192),
    )


# ----------------------------------------------------------------------------------------------
# key maps


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


_GGUF_LAYER = {
    "attn_norm": "attention_norm",
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
    "ffn_norm": "ffn_norm",
}


def gguf_to_meta_key(name: str) -> str | None:
    if name == "token_embd.weight":
        return "tok_embeddings.weight"
    if name == "output_norm.weight":
        return "norm.weight"
    if name == "output.weight":
        return "output.weight"
    if name == "rope_freqs.weight":
        return None
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if m and m.group(2) in _GGUF_LAYER:
        return f"layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}.weight"
    raise KeyError(name)


# ----------------------------------------------------------------------------------------------
# tensor sources: each yields (meta_key, tensor) pairs, one tensor at a time

TensorStream = Iterator[tuple[str, torch.Tensor]]

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
    try:
        params = json.loads(params_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{params_path}: invalid JSON ({e})") from None
    args = args_from_meta_params(params, str(params_path))
    shards = sorted(folder.glob("consolidated.*.pth"))

    def stream() -> TensorStream:
        sds = []
        for s in shards:
            try:
                sds.append(torch.load(s, map_location="cpu", weights_only=True, mmap=True))
            except Exception as e:  # corrupt / truncated / pickled objects
                raise CheckpointError(f"{s}: cannot be read as a weights-only torch checkpoint ({e})") from None
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


def _hf_stream(folder: Path) -> tuple[ModelArgs, TensorStream]:
    from safetensors import safe_open

    cfg_path = folder / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
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
            with safe_open(str(f), framework="pt") as sf:
                for hf_key in sf.keys():
                    try:
                        key = hf_to_meta_key(hf_key)
                    except KeyError:
                        raise CheckpointError(f"{f}: unexpected key {hf_key!r} for a Llama tower") from None
                    if key is None:
                        continue
                    t = sf.get_tensor(hf_key)
                    if key.endswith("attention.wq.weight"):
                        t = permute_hf_to_meta(t, args.n_heads)
                    elif key.endswith("attention.wk.weight"):
                        t = permute_hf_to_meta(t, args.n_kv_heads)
                    yield key, t

    return args, stream()


GGUF_SUPPORTED = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def _gguf_field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _scaling_from_rope_freqs(factors: torch.Tensor, head_dim: int, theta: float, source: str) -> RopeScaling:
    """llama.cpp stores llama3 scaling as per-frequency divisors; recover the parameters exactly."""
    base = rope_inv_freq(head_dim, theta)
    for factor in (8.0, 16.0, 32.0, 4.0, 2.0):
        for orig in (8192, 4096, 16384):
            cand = RopeScaling(factor=factor, original_max_position_embeddings=orig)
            want = base / rope_inv_freq(head_dim, theta, cand)
            if torch.allclose(want, factors.float(), rtol=1e-3, atol=1e-4):
                return cand
    raise CheckpointError(f"{source}: rope_freqs.weight does not match any llama3 RoPE scaling")


def _dequantize_rows(t, dtype: torch.dtype, rows_per_chunk: int = 2048) -> torch.Tensor:
    """Dequantise a GGUF tensor straight into a `dtype` tensor, a block of rows at a time (bounded temporaries)."""
    from gguf.quants import dequantize

    shape = tuple(int(s) for s in reversed(t.shape.tolist()))
    out = torch.empty(shape, dtype=dtype)
    data = t.data
    if len(shape) < 2 or data.ndim < 2:
        out.copy_(torch.tensor(dequantize(data, t.tensor_type)).reshape(shape))
        return out
    flat_out = out.view(-1, shape[-1])
    flat_data = data.reshape(flat_out.shape[0], -1)
    for r in range(0, flat_out.shape[0], rows_per_chunk):
        chunk = dequantize(flat_data[r : r + rows_per_chunk], t.tensor_type)
        if not chunk.flags.writeable:  # F32 comes back as a view of the read-only memory map
            chunk = chunk.copy()
        flat_out[r : r + rows_per_chunk].copy_(torch.from_numpy(chunk.reshape(-1, shape[-1])))
    return out


def _gguf_stream(path: Path, dtype: torch.dtype | None = None) -> tuple[ModelArgs, TensorStream]:
    import gguf
    from gguf.quants import dequantize

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not 'llama'")

    def need(key):
        v = _gguf_field(reader, key)
        if v is None:
            raise CheckpointError(f"{path}: missing GGUF metadata key {key!r}")
        return v

    dim = int(need("llama.embedding_length"))
    n_heads = int(need("llama.attention.head_count"))
    tensors = {t.name: t for t in reader.tensors}
    vocab = _gguf_field(reader, "llama.vocab_size")
    if vocab is None:
        vocab = int(tensors["token_embd.weight"].shape[-1])
    theta = float(_gguf_field(reader, "llama.rope.freq_base", 10000.0))
    head_dim = int(_gguf_field(reader, "llama.rope.dimension_count", dim // n_heads))
    scaling = None
    scale_type = _gguf_field(reader, "llama.rope.scaling.type")
    if scale_type not in (None, "none"):
        raise CheckpointError(f"{path}: unsupported RoPE scaling type {scale_type!r}")
    if "rope_freqs.weight" in tensors:
        rft = tensors["rope_freqs.weight"]
        rf = torch.tensor(dequantize(rft.data, rft.tensor_type))
        scaling = _scaling_from_rope_freqs(rf.reshape(-1), head_dim, theta, str(path))
    args = ModelArgs(
        dim=dim,
        n_layers=int(need("llama.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(_gguf_field(reader, "llama.attention.head_count_kv", n_heads)),
        vocab_size=int(vocab),
        ffn_dim=int(need("llama.feed_forward_length")),
        norm_eps=float(_gguf_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings="output.weight" not in tensors,
        head_dim=head_dim,
        max_seq_len=int(_gguf_field(reader, "llama.context_length", 8192)),
    )

    def stream() -> TensorStream:
        for name, t in tensors.items():
            try:
                key = gguf_to_meta_key(name)
            except KeyError:
                raise CheckpointError(f"{path}: unexpected tensor {name!r} for a Llama tower") from None
            if key is None:
                continue
            qname = t.tensor_type.name
            if qname not in GGUF_SUPPORTED:
                raise CheckpointError(
                    f"{path}: tensor {name!r} has unsupported quantisation {qname} "
                    f"(supported: {', '.join(GGUF_SUPPORTED)})"
                )
            yield key, _dequantize_rows(t, dtype or torch.float32)

    return args, stream()


# ----------------------------------------------------------------------------------------------
# public entry points


def read_checkpoint(path: str | Path, dtype: torch.dtype | None = None) -> tuple[ModelArgs, TensorStream, str]:
    """(ModelArgs, stream of (Meta key, tensor), format) for any supported checkpoint.

    `dtype` lets formats that must convert anyway (GGUF dequantisation) produce the target dtype directly."""
    p = Path(path)
    fmt = detect_format(p)
    if fmt == "meta":
        args, stream = _meta_stream(p)
    elif fmt == "hf":
        args, stream = _hf_stream(p)
    else:
        args, stream = _gguf_stream(_gguf_file(p), dtype)
    return args, stream, fmt


class ParamFiller:
    """Materialise the parameters of a model built on the meta device, one tensor at a time.

    `put` checks the name and shape and assigns the tensor in its final dtype/device; `finish` names every
    parameter nothing was put into. Shared by every checkpoint loader (tower, Mllama HF and Meta formats)."""

    def __init__(self, model: torch.nn.Module, *, source: str, dtype: torch.dtype, device, requires_grad=None):
        """requires_grad: None keeps each parameter's flag from the meta model; a bool sets it on all."""
        self.model, self.source, self.dtype, self.device = model, source, dtype, device
        self.requires_grad = requires_grad
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.seen: set[str] = set()

    def put(self, name: str, t: torch.Tensor, key: str | None = None) -> None:
        """`key`: the checkpoint's own name for the tensor, when it differs (quoted in errors)."""
        what = repr(name) if key is None or key == name else f"{name!r} (checkpoint key {key!r})"
        p = self.params.get(name)
        if p is None:
            raise CheckpointError(f"{self.source}: unexpected key {what}")
        if tuple(t.shape) != tuple(p.shape):
            raise CheckpointError(
                f"{self.source}: shape mismatch for {what}: checkpoint {tuple(t.shape)} vs model {tuple(p.shape)}"
            )
        module_name, _, pname = name.rpartition(".")
        grad = p.requires_grad if self.requires_grad is None else self.requires_grad
        new = torch.nn.Parameter(t.to(device=self.device, dtype=self.dtype), requires_grad=grad)
        setattr(self.model.get_submodule(module_name), pname, new)
        self.seen.add(name)

    def skip(self, name: str) -> None:
        """Count `name` as provided without assigning it (a tied weight)."""
        self.seen.add(name)

    def finish(self) -> None:
        missing = sorted(set(self.params) - self.seen)
        if missing:
            shown = ", ".join(missing[:8]) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
            raise CheckpointError(f"{self.source}: missing keys: {shown}")


def load_state_into(
    model: Transformer, stream: TensorStream, *, source: str, dtype: torch.dtype, device: torch.device | str
) -> None:
    """Materialise a meta-device model tensor by tensor from `stream`, checking keys and shapes."""
    filler = ParamFiller(model, source=source, dtype=dtype, device=device)
    tied = model.args.tie_embeddings
    for key, t in stream:
        if tied and key == "output.weight":
            # some tied checkpoints still store the output matrix; it must equal the embedding
            if key not in filler.params:
                raise CheckpointError(f"{source}: unexpected key {key!r}")
            filler.skip(key)
            continue
        filler.put(key, t)
        del t
    if tied:
        filler.skip("output.weight")
    filler.finish()
    model.tie_weights()


def load_pretrained(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    *,
    requires_grad: bool = False,
) -> Transformer:
    """Load a Llama 3 tower from a Meta folder, a Hugging Face folder or a .gguf file.

    The tower is returned in eval mode with `requires_grad=False` (frozen) unless asked otherwise.
    """
    args, stream, _ = read_checkpoint(path, dtype)
    with torch.device("meta"):
        model = Transformer(args)
    load_state_into(model, stream, source=str(path), dtype=dtype, device=device)
    model.reset_buffers()
    model.requires_grad_(requires_grad)
    return model.eval()


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
