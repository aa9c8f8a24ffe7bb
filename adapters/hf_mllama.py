"""Llama 3.2 Vision checkpoints in the Hugging Face Mllama layout: loading (a `ComposedModel` of the text tower and
its image part) and export (tower + trained image part -> a folder transformers loads).

Supported now: Hugging Face Mllama folders (`config.json` with model_type "mllama" + safetensors), in both the
transformers 4 key layout (`language_model.model.*`, `language_model.lm_head`, `vision_model.*`,
`multi_modal_projector.*`) and the transformers 5 one (`model.language_model.*`, `model.vision_model.*`,
`model.multi_modal_projector.*`, `lm_head`). HF keeps self- and cross-attention layers in ONE flat list
(cross layers at e.g. [3, 8, 13, ...]); here the tower keeps its own layers and block k runs before tower layer
`flat_k - k`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mm_llama.data.image import supported_aspect_ratios
from mm_llama.llama.checkpoint import (
    CheckpointError,
    ParamFiller,
    args_from_hf_config,
    hf_to_meta_key,
    meta_to_hf_key,
    permute_hf_to_meta,
    permute_meta_to_hf,
)
from mm_llama.llama.model import Transformer

from .composed import ComposedModel
from .image import NUM_EXTRA_TOKENS, ImagePart
from .meta_format import load_meta_vision
from .vision import VisionArgs

_XATTN_KEYS = {
    "cross_attn.q_proj.weight": "attention.wq.weight",
    "cross_attn.k_proj.weight": "attention.wk.weight",
    "cross_attn.v_proj.weight": "attention.wv.weight",
    "cross_attn.o_proj.weight": "attention.wo.weight",
    "cross_attn.q_norm.weight": "attention.q_norm.weight",
    "cross_attn.k_norm.weight": "attention.k_norm.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "cross_attn_attn_gate": "gate_attn",
    "cross_attn_mlp_gate": "gate_ffwd",
}


def vision_args_from_hf(vc: dict, source: str, intermediate_from: str = "input") -> VisionArgs:
    a = VisionArgs(
        image_size=vc.get("image_size", 448),
        patch_size=vc.get("patch_size", 14),
        width=vc.get("hidden_size", 1280),
        layers=vc.get("num_hidden_layers", 32),
        heads=vc.get("attention_heads", 16),
        mlp_dim=vc.get("intermediate_size", 5120),
        global_layers=vc.get("num_global_layers", 8),
        intermediate_layers=tuple(vc.get("intermediate_layers_indices", (3, 7, 15, 23, 30))),
        max_num_tiles=vc.get("max_num_tiles", 4),
        norm_eps=vc.get("norm_eps", 1e-5),
        num_channels=vc.get("num_channels", 3),
        intermediate_from=intermediate_from,
    )
    ratios = [tuple(r) for r in vc.get("supported_aspect_ratios", supported_aspect_ratios(a.max_num_tiles))]
    if ratios != supported_aspect_ratios(a.max_num_tiles):
        raise CheckpointError(f"{source}: supported_aspect_ratios {ratios} differ from the Llama 3.2 Vision list")
    if vc.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{source}: vision hidden_act {vc.get('hidden_act')!r} is not gelu")
    if "vision_output_dim" in vc and vc["vision_output_dim"] != a.output_dim:
        raise CheckpointError(f"{source}: vision_output_dim {vc['vision_output_dim']} != {a.output_dim}")
    return a


def _normalise_hf_key(key: str) -> tuple[str, str]:
    """-> (part, rest) with part in {language, lm_head, vision, projector}."""
    for prefix, part in (
        ("model.language_model.", "language"),
        ("language_model.model.", "language"),
        ("model.vision_model.", "vision"),
        ("vision_model.", "vision"),
        ("model.multi_modal_projector.", "projector"),
        ("multi_modal_projector.", "projector"),
    ):
        if key.startswith(prefix):
            return part, key[len(prefix) :]
    if key in ("lm_head.weight", "language_model.lm_head.weight"):
        return "lm_head", "weight"
    raise KeyError(key)


def mllama_skeleton(
    folder: Path, hf_compat_masking: bool = False, intermediate_from: str = "input"
) -> tuple[ComposedModel, list[int], dict]:
    """The model an HF Mllama folder describes, built on the meta device from its config.json alone (no weights
    read): (model, its HF flat indices of the cross-attention layers, flat index -> tower layer)."""
    cfg_path = folder / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: cannot be read ({e})") from None
    if cfg.get("model_type") != "mllama":
        raise CheckpointError(f"{cfg_path}: model_type {cfg.get('model_type')!r} is not 'mllama'")
    tc, vc = cfg.get("text_config", {}), cfg.get("vision_config", {})
    cross = list(tc.get("cross_attention_layers", []))
    n_flat = tc["num_hidden_layers"]
    # the text tower is a plain Llama once the cross-attention layers are taken out of the flat list
    text = {
        **tc,
        "model_type": "llama",
        "num_hidden_layers": n_flat - len(cross),
        "max_position_embeddings": tc.get("max_position_embeddings", 131072),
    }
    try:
        args = args_from_hf_config(text, f"{cfg_path} text_config")
    except KeyError as e:
        raise CheckpointError(f"{cfg_path}: text_config misses required key {e}") from None
    schedule = [c - k for k, c in enumerate(cross)]
    flat_to_self = {}
    j = 0
    for f in range(n_flat):
        if f not in cross:
            flat_to_self[f] = j
            j += 1
    vargs = vision_args_from_hf(vc, str(cfg_path), intermediate_from)
    with torch.device("meta"):
        tower = Transformer(args)
        model = ComposedModel(tower, image=ImagePart(args, vargs, schedule, hf_compat_masking=hf_compat_masking))
    return model, cross, flat_to_self


def load_hf_mllama(
    folder: Path,
    dtype=torch.float32,
    device="cpu",
    hf_compat_masking: bool = False,
    intermediate_from: str = "input",
    *,
    tower: Transformer | None = None,
    text_only: bool = False,
):
    # long: one pass over the checkpoint's keys; each HF key family mapped where it is read
    """An HF Mllama folder -> a ComposedModel of its text tower and image part (all frozen). `text_only`: only the
    text tower is read and returned (training a recipe on the folder's tower); `tower`: only the image part is read
    and returned, for this already-loaded tower of the same shape (the text weights are not read again)."""

    folder = Path(folder)
    model, cross, flat_to_self = mllama_skeleton(folder, hf_compat_masking, intermediate_from)
    args = model.tower.args
    if tower is not None and tower.args != args:
        raise CheckpointError(f"{folder}: its text model ({args}) is not the given tower ({tower.args})")
    filler = ParamFiller(model, source=str(folder), dtype=dtype, device=device, requires_grad=False)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors file")

    def put(name: str, get, key: str) -> None:
        text = name.startswith("tower.")
        if (tower is not None and text) or (text_only and not text):
            filler.skip(name)  # not read at all
        else:
            filler.put(name, get(), key)

    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                try:
                    part, rest = _normalise_hf_key(key)
                except KeyError:
                    raise CheckpointError(f"{f}: unexpected key {key!r} for an Mllama checkpoint") from None
                get = functools.partial(sf.get_tensor, key)
                if part == "vision":
                    put(f"image.vision_encoder.{rest}", get, key)
                elif part == "projector":
                    put(f"image.vision_projection.{rest}", get, key)
                elif part == "lm_head":
                    put("tower.output.weight", get, key)
                elif rest == "embed_tokens.weight":
                    t = sf.get_tensor(key)
                    V = args.vocab_size
                    if t.shape[0] != V + NUM_EXTRA_TOKENS:
                        raise CheckpointError(f"{f}: {key}: expected {V}+{NUM_EXTRA_TOKENS} rows, found {t.shape[0]}")
                    put("tower.tok_embeddings.weight", lambda t=t, V=V: t[:V], key)
                    put("image.learnable_embedding.weight", lambda t=t, V=V: t[V:], key)
                elif rest == "norm.weight":
                    put("tower.norm.weight", get, key)
                elif "rotary_emb" in rest:
                    continue
                else:
                    m = re.fullmatch(r"layers\.(\d+)\.(.+)", rest)
                    if not m:
                        raise CheckpointError(f"{f}: unexpected key {key!r}")
                    flat, tail = int(m.group(1)), m.group(2)
                    if flat in cross:
                        k = cross.index(flat)
                        if tail not in _XATTN_KEYS:
                            raise CheckpointError(f"{f}: unexpected cross-attention key {key!r}")
                        put(f"image.cross_attention_layers.{k}.{_XATTN_KEYS[tail]}", get, key)
                    else:
                        meta = hf_to_meta_key(f"layers.{flat_to_self[flat]}.{tail}")
                        if meta is None:
                            continue
                        heads = {"attention.wq.weight": args.n_heads, "attention.wk.weight": args.n_kv_heads}
                        n = next((h for suffix, h in heads.items() if meta.endswith(suffix)), None)
                        put(f"tower.{meta}", get if n is None else (lambda g=get, n=n: permute_hf_to_meta(g(), n)), key)
    if args.tie_embeddings:
        filler.skip("tower.output.weight")
    filler.finish()
    if tower is not None:
        return model.image.requires_grad_(False).eval()
    model.tower.tie_weights()
    model.tower.reset_buffers()
    if text_only:
        return model.tower.requires_grad_(False).eval()
    return model.requires_grad_(False).eval()


def is_mllama_folder(path) -> bool:
    p = Path(path) / "config.json"
    try:
        return p.is_file() and json.loads(p.read_text()).get("model_type") == "mllama"
    except (OSError, ValueError):
        return False


def load_pretrained(
    path, dtype=torch.float32, device="cpu", *, hf_compat_masking: bool = False, intermediate_from: str = "input"
):
    """Llama 3.2 Vision from a Hugging Face Mllama folder or a Meta folder (params.json + consolidated.pth): a
    ComposedModel of its text tower and image part.

    Defaults follow Meta's reference code. To reproduce transformers 5.x numerics exactly pass
    `hf_compat_masking=True` (its cross-attention row leak) and `intermediate_from="output"` (its vision encoder
    takes each listed layer's output where Meta and transformers 4.x take its input)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path does not exist: {p}")
    if (p / "config.json").is_file():
        return load_hf_mllama(p, dtype, device, hf_compat_masking, intermediate_from)
    if (p / "params.json").is_file():
        return load_meta_vision(p, dtype, device)
    raise CheckpointError(f"{p}: not an Mllama checkpoint folder (config.json with model_type 'mllama')")


# ----------------------------------------------------------------------------------------------
# export: tower + trained adapter -> a Hugging Face Mllama folder transformers can load

_XATTN_KEYS_INV = {v: k for k, v in _XATTN_KEYS.items()}


def export_hf_mllama(
    model: ComposedModel, folder: str | Path, *, dtype=None, bos_id=None, eos_id=None, pad_id=None
) -> Path:
    # long: the inverse of load_hf_mllama's key map and the config it implies, kept side by side
    """Write the tower and image part of `model` as config.json + model.safetensors in the Mllama layout (one flat
    layer list, cross-attention layers at flat index schedule[k] + k; embed_tokens = frozen table + learnable rows;
    q/k rows permuted for HF RoPE)."""

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image = model.part("image")
    a, v = model.tower.args, image.vision_args
    if a.head_dim != a.dim // a.n_heads:
        raise CheckpointError("Mllama configs cannot express head_dim != hidden_size // num_attention_heads")
    if v.stem:
        raise CheckpointError(f"Mllama configs cannot express a convolutional stem (vision stem {v.stem})")
    cross_flat = [s + k for k, s in enumerate(image.schedule)]
    n_flat = a.n_layers + len(cross_flat)
    self_flat = [f for f in range(n_flat) if f not in cross_flat]
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    sd: dict[str, torch.Tensor] = {}
    tsd = model.tower.state_dict()
    for key, t in tsd.items():
        if key == "output.weight" and a.tie_embeddings:
            continue
        if key == "tok_embeddings.weight":
            sd["language_model.model.embed_tokens.weight"] = torch.cat([t, image.learnable_embedding.weight], 0)
            continue
        if key == "output.weight":
            sd["language_model.lm_head.weight"] = t
            continue
        hf = meta_to_hf_key(key)  # model.layers.J.* / model.norm.weight
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf)
        if m:
            hf = f"model.layers.{self_flat[int(m.group(1))]}.{m.group(2)}"
        if key.endswith("attention.wq.weight"):
            t = permute_meta_to_hf(t, a.n_heads)
        elif key.endswith("attention.wk.weight"):
            t = permute_meta_to_hf(t, a.n_kv_heads)
        sd["language_model." + hf] = t
    for k, block in enumerate(image.cross_attention_layers):
        for name, t in block.state_dict().items():
            sd[f"language_model.model.layers.{cross_flat[k]}.{_XATTN_KEYS_INV[name]}"] = t
    for name, t in image.vision_encoder.state_dict().items():
        sd[f"vision_model.{name}"] = t
    for name, t in image.vision_projection.state_dict().items():
        sd[f"multi_modal_projector.{name}"] = t
    save_file({k: cast(t.detach().cpu().contiguous()) for k, t in sd.items()}, str(folder / "model.safetensors"))
    text_config = {
        "model_type": "mllama_text_model",
        "vocab_size": a.vocab_size,
        "hidden_size": a.dim,
        "num_hidden_layers": n_flat,
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_kv_heads,
        "intermediate_size": a.ffn_dim,
        "rms_norm_eps": a.norm_eps,
        "hidden_act": "silu",
        "rope_theta": a.rope_theta,
        "max_position_embeddings": a.max_seq_len,
        "cross_attention_layers": cross_flat,
        "tie_word_embeddings": a.tie_embeddings,
    }
    llama3 = a.vocab_size >= 128256  # Llama 3 special ids unless told otherwise
    # (other vocabularies: transformers insists on an in-range pad id for its embedding's padding_idx)
    for name, given, default in (
        ("bos_token_id", bos_id, 128000 if llama3 else None),
        ("eos_token_id", eos_id, 128001 if llama3 else None),
        ("pad_token_id", pad_id, 128004 if llama3 else 0),
    ):
        value = given if given is not None else default
        if value is not None:
            text_config[name] = value
    if a.rope_scaling is not None:
        text_config["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(a.rope_scaling)}
    vision_config = {
        "model_type": "mllama_vision_model",
        "hidden_size": v.width,
        "num_hidden_layers": v.layers,
        "num_global_layers": v.global_layers,
        "attention_heads": v.heads,
        "intermediate_size": v.mlp_dim,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "num_channels": v.num_channels,
        "max_num_tiles": v.max_num_tiles,
        "norm_eps": v.norm_eps,
        "intermediate_layers_indices": list(v.intermediate_layers),
        "vision_output_dim": v.output_dim,
        "supported_aspect_ratios": [list(r) for r in supported_aspect_ratios(v.max_num_tiles)],
        "hidden_act": "gelu",
    }
    config = {
        "model_type": "mllama",
        "architectures": ["MllamaForConditionalGeneration"],
        "image_token_index": a.vocab_size,
        "text_config": text_config,
        "vision_config": vision_config,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
