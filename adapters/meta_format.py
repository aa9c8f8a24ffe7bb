"""Llama 3.2 Vision checkpoints in Meta's format (params.json + consolidated[.NN].pth), as Meta's reference code
(llama-models `models/llama3/multimodal/model.py`) names and shapes them:

  text_model.{tok_embeddings, norm, output, layers.N.*}          -> the tower (already Meta names)
  text_model.learnable_embedding                                  -> learnable_embedding (8 rows)
  text_model.cross_attention_layers.K.*                           -> cross_attention_layers.K.* (same names)
  vision_model.vision_encoder.conv1._linear [W, 3*14*14]          -> patch conv [W, 3, 14, 14]
  vision_model.vision_encoder.positional_embedding [P, W]         -> gated_positional_embedding.embedding
  vision_model.vision_encoder.gated_positional_embedding [T,T,P,W] -> per-aspect-ratio table (precomputed)
  vision_model.vision_encoder.{pre,post}_tile_pos_embed.embedding [T,T,1,W] -> per-aspect-ratio tables
  vision_model.vision_encoder.{transformer,global_transformer}.resblocks.N.{attn.wq..wo, ln_1, ln_2,
      mlp.c_fc, mlp.c_proj, gate_attn, gate_ffn}                  -> *.layers.N.{self_attn.*, *_layernorm, mlp.fc*}
  vision_model.vision_projection                                  -> vision_projection

Meta's tile embeddings are grids: an image tiled as (rows, cols) uses embed[:rows, :cols] in row-major tile order;
here they are precomputed per aspect-ratio id (1-based index of (rows, cols) in the supported list, 0 = padding).
Model-parallel shards are merged (column-parallel weights on dim 0, row-parallel on dim 1, the rest replicated).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from mm_llama.data.image import supported_aspect_ratios
from mm_llama.llama.checkpoint import CheckpointError, ParamFiller, args_from_meta_params
from mm_llama.llama.format_meta import _find_meta_ffn_multiplier
from mm_llama.llama.model import Transformer

from .composed import ComposedModel
from .image import ImagePart, default_schedule
from .vision import VisionArgs

# model-parallel split dims by the last two name parts
_COL = {"wq", "wk", "wv", "w1", "w3", "c_fc", "_linear", "vision_projection", "output", "tok_embeddings"}
_COL |= {"learnable_embedding"}
_ROW = {"wo", "w2", "c_proj"}


def _split_dim(key: str, t: torch.Tensor) -> int | None:
    parts = key.split(".")
    owner = parts[-2] if len(parts) >= 2 else ""
    if owner in _ROW:
        return 1 if t.dim() == 2 else None  # a row-parallel bias is replicated
    if owner in _COL:
        return 0
    return None


def _grid_to_table(grid: torch.Tensor, max_tiles: int) -> torch.Tensor:
    """[T, T, P, W] grid -> [ids + 1, T * P * W] table with table[id] = grid[:rows, :cols] in tile order."""
    T, _, P, W = grid.shape
    ratios = supported_aspect_ratios(max_tiles)
    table = torch.zeros(len(ratios) + 1, max_tiles, P, W, dtype=grid.dtype)
    for i, (rows, cols) in enumerate(ratios, start=1):
        table[i, : rows * cols] = grid[:rows, :cols].reshape(rows * cols, P, W)
    return table.reshape(len(ratios) + 1, -1)


def table_to_grid(table: torch.Tensor, max_tiles: int, P: int, W: int) -> torch.Tensor:
    """Inverse of `_grid_to_table` (entries no aspect ratio uses come back as zeros)."""
    ratios = supported_aspect_ratios(max_tiles)
    t = table.reshape(len(ratios) + 1, max_tiles, P, W)
    grid = torch.zeros(max_tiles, max_tiles, P, W, dtype=table.dtype)
    for i, (rows, cols) in enumerate(ratios, start=1):
        grid[:rows, :cols] = t[i, : rows * cols].reshape(rows, cols, P, W)
    return grid


_RESBLOCK = {
    "attn.wq": "self_attn.q_proj",
    "attn.wk": "self_attn.k_proj",
    "attn.wv": "self_attn.v_proj",
    "attn.wo": "self_attn.o_proj",
    "ln_1": "input_layernorm",
    "ln_2": "post_attention_layernorm",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def meta_vision_key(rest: str) -> str | None:
    """Key under vision_model.vision_encoder. -> our vision_encoder key (None: handled specially)."""
    m = re.fullmatch(r"(transformer|global_transformer)\.resblocks\.(\d+)\.(.+)", rest)
    if m:
        stack, idx, tail = m.groups()
        for k, v in _RESBLOCK.items():
            if tail.startswith(k + "."):
                return f"{stack}.layers.{idx}.{v}{tail[len(k) :]}"
        if tail in ("gate_attn", "gate_ffn"):
            return f"{stack}.layers.{idx}.{tail}"
        raise KeyError(rest)
    simple = {
        "class_embedding": "class_embedding",
        "ln_pre.weight": "layernorm_pre.weight",
        "ln_pre.bias": "layernorm_pre.bias",
        "ln_post.weight": "layernorm_post.weight",
        "ln_post.bias": "layernorm_post.bias",
        "positional_embedding": "gated_positional_embedding.embedding",
        "gated_positional_embedding_gate": "gated_positional_embedding.gate",
        "pre_tile_pos_embed.gate": "pre_tile_positional_embedding.gate",
        "post_tile_pos_embed.gate": "post_tile_positional_embedding.gate",
    }
    if rest in simple:
        return simple[rest]
    if rest in (
        "conv1._linear.weight",
        "gated_positional_embedding",
        "pre_tile_pos_embed.embedding",
        "post_tile_pos_embed.embedding",
    ):
        return None
    raise KeyError(rest)


def _load_shards(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("consolidated.*.pth")) or sorted(folder.glob("consolidated.pth"))
    if not files:
        raise CheckpointError(f"{folder}: no consolidated.pth / consolidated.NN.pth")
    sds = []
    for f in files:
        try:
            sds.append(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:
            raise CheckpointError(f"{f}: cannot be read as a weights-only torch checkpoint ({e})") from None
    fused = [k for k in sds[0] if ".wqkv" in k or ".wkv" in k or "layer_norm_weight" in k]
    if fused:
        raise CheckpointError(f"{files[0]}: fused TransformerEngine-style keys ({fused[0]!r}) are not supported")
    if len(sds) == 1:
        return sds[0]
    out = {}
    for key in sds[0]:
        parts = [sd[key] for sd in sds]
        d = _split_dim(key, parts[0])
        out[key] = parts[0] if d is None else torch.cat(parts, dim=d)
    return out


def _count_blocks(sd: dict, prefix: str) -> int:
    idx = {int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)}
    if not idx:
        raise KeyError(prefix)
    return max(idx) + 1


def load_meta_vision(folder: Path, dtype=torch.float32, device="cpu") -> ComposedModel:
    # long: one pass over Meta's keys; each key family mapped where it is read
    params_path = folder / "params.json"
    params = json.loads(params_path.read_text())
    params = params.get("model", params)
    n_xattn = params.get("vision_num_cross_attention_layers")
    if not n_xattn:
        raise CheckpointError(f"{params_path}: no vision_num_cross_attention_layers: not a Llama 3.2 Vision model")
    args = args_from_meta_params(params, str(params_path))
    every = -(-args.n_layers // n_xattn)
    schedule = default_schedule(args.n_layers, every, n_xattn)
    sd = _load_shards(folder)
    ve = "vision_model.vision_encoder."
    try:
        width = sd[ve + "class_embedding"].shape[0]
        n_vis = _count_blocks(sd, ve + "transformer.resblocks.")
        n_glob = _count_blocks(sd, ve + "global_transformer.resblocks.")
        mlp_dim = sd[ve + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        grid = sd[ve + "gated_positional_embedding"]
        patch_in = sd[ve + "conv1._linear.weight"].shape[1]
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{folder}: vision encoder weights incomplete ({e})") from None
    patch = int(round((patch_in / 3) ** 0.5))
    max_tiles, P = grid.shape[0], grid.shape[2]
    image_size = params.get("vision_chunk_size") or int(round((P - 1) ** 0.5)) * patch
    proj_in = sd["vision_model.vision_projection.weight"].shape[1]
    n_inter = proj_in // width - 1
    inter = (3, 7, 15, 23, 30)[:n_inter] if n_inter == 5 else tuple(params.get("vision_return_intermediate", ()))
    if len(inter) != n_inter:
        raise CheckpointError(f"{folder}: cannot tell which {n_inter} intermediate layers the projection expects")
    heads = params.get("vision_heads", 16)
    vargs = VisionArgs(
        image_size=image_size,
        patch_size=patch,
        width=width,
        layers=n_vis,
        heads=heads,
        mlp_dim=mlp_dim,
        global_layers=n_glob,
        intermediate_layers=inter,
        max_num_tiles=max_tiles,
    )
    with torch.device("meta"):
        model = ComposedModel(Transformer(args), image=ImagePart(args, vargs, schedule))
    filler = ParamFiller(model, source=str(folder), dtype=dtype, device=device, requires_grad=False)
    params_ = filler.params
    for key, t in sd.items():
        if key.startswith("text_model."):
            rest = key[len("text_model.") :]
            if rest in ("rope.freqs", "freqs"):
                continue
            if rest.startswith("learnable_embedding."):
                rows = params_["image.learnable_embedding.weight"].shape[0]
                filler.put("image.learnable_embedding.weight", t[:rows], key)
            elif rest.startswith("cross_attention_layers."):
                name = f"image.{rest}"
                filler.put(
                    name, t.reshape(params_[name].shape) if rest.endswith(("gate_attn", "gate_ffwd")) else t, key
                )
            else:
                filler.put(f"tower.{rest}", t, key)
        elif key.startswith(ve):
            rest = key[len(ve) :]
            try:
                ours = meta_vision_key(rest)
            except KeyError:
                raise CheckpointError(f"{folder}: unexpected vision key {key!r}") from None
            if ours is not None:
                filler.put(
                    f"image.vision_encoder.{ours}", t.reshape(params_[f"image.vision_encoder.{ours}"].shape), key
                )
            elif rest == "conv1._linear.weight":
                filler.put("image.vision_encoder.patch_embedding.weight", t.reshape(width, 3, patch, patch), key)
            elif rest == "gated_positional_embedding":
                filler.put(
                    "image.vision_encoder.gated_positional_embedding.tile_embedding.weight",
                    _grid_to_table(t, max_tiles),
                    key,
                )
            else:
                which = "pre" if rest.startswith("pre") else "post"
                filler.put(
                    f"image.vision_encoder.{which}_tile_positional_embedding.embedding.weight",
                    _grid_to_table(t, max_tiles),
                    key,
                )
        elif key.startswith("vision_model.vision_projection."):
            filler.put("image.vision_projection." + key.rsplit(".", 1)[1], t, key)
        else:
            raise CheckpointError(f"{folder}: unexpected key {key!r}")
    if args.tie_embeddings:
        filler.skip("tower.output.weight")
    filler.finish()
    model.tower.tie_weights()
    model.tower.reset_buffers()
    return model.requires_grad_(False).eval()


def save_meta_vision(model: ComposedModel, folder: str | Path, *, model_parallel: int = 1) -> None:
    # long: the inverse of load_meta_vision's key map, kept in the same order
    """Write the tower and image part of `model` in Meta's Llama 3.2 Vision layout (the inverse of
    `load_meta_vision`)."""

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tower, image = model.tower, model.part("image")
    a, v = tower.args, image.vision_args
    if v.intermediate_from != "input":
        raise CheckpointError("Meta's format implies intermediate features taken from layer inputs")
    every = -(-a.n_layers // len(image.schedule))
    if image.schedule != default_schedule(a.n_layers, every, len(image.schedule)):
        raise CheckpointError(f"schedule {image.schedule} is not Meta's uniform fusion schedule")
    multiple_of, mult = _find_meta_ffn_multiplier(a.dim, a.ffn_dim)
    params = {
        "dim": a.dim,
        "n_layers": a.n_layers,
        "n_heads": a.n_heads,
        "n_kv_heads": a.n_kv_heads,
        "vocab_size": a.vocab_size,
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": mult,
        "norm_eps": a.norm_eps,
        "rope_theta": a.rope_theta,
        "use_scaled_rope": a.rope_scaling is not None,
        "vision_chunk_size": v.image_size,
        "vision_max_num_chunks": v.max_num_tiles,
        "vision_num_cross_attention_layers": len(image.schedule),
    }
    if a.rope_scaling is not None:
        params["rope_scaling_factor"] = a.rope_scaling.factor
    if v.heads != 16:
        params["vision_heads"] = v.heads
    if tuple(v.intermediate_layers) != (3, 7, 15, 23, 30):
        params["vision_return_intermediate"] = list(v.intermediate_layers)
    (folder / "params.json").write_text(json.dumps(params, indent=2))
    sd: dict[str, torch.Tensor] = {}
    for k, t in tower.state_dict().items():
        if not (a.tie_embeddings and k == "output.weight"):
            sd[f"text_model.{k}"] = t
    sd["text_model.learnable_embedding.weight"] = image.learnable_embedding.weight
    for k, t in image.cross_attention_layers.state_dict().items():
        sd[f"text_model.cross_attention_layers.{k}"] = t
    ve = "vision_model.vision_encoder."
    inv = {val: key for key, val in _RESBLOCK.items()}
    P, W = v.num_patches, v.width
    for k, t in image.vision_encoder.state_dict().items():
        m = re.fullmatch(r"(transformer|global_transformer)\.layers\.(\d+)\.(.+)", k)
        if m:
            stack, idx, tail = m.groups()
            for ours, meta in inv.items():
                if tail.startswith(ours + "."):
                    tail = meta + tail[len(ours) :]
                    break
            sd[f"{ve}{stack}.resblocks.{idx}.{tail}"] = t
        elif k == "patch_embedding.weight":
            sd[ve + "conv1._linear.weight"] = t.reshape(W, -1)
        elif k == "gated_positional_embedding.tile_embedding.weight":
            sd[ve + "gated_positional_embedding"] = table_to_grid(t, v.max_num_tiles, P, W)
        elif k.endswith("tile_positional_embedding.embedding.weight"):
            which = "pre" if k.startswith("pre") else "post"
            sd[f"{ve}{which}_tile_pos_embed.embedding"] = table_to_grid(t, v.max_num_tiles, 1, W)
        else:
            back = {
                "class_embedding": "class_embedding",
                "layernorm_pre.weight": "ln_pre.weight",
                "layernorm_pre.bias": "ln_pre.bias",
                "layernorm_post.weight": "ln_post.weight",
                "layernorm_post.bias": "ln_post.bias",
                "gated_positional_embedding.embedding": "positional_embedding",
                "gated_positional_embedding.gate": "gated_positional_embedding_gate",
                "pre_tile_positional_embedding.gate": "pre_tile_pos_embed.gate",
                "post_tile_positional_embedding.gate": "post_tile_pos_embed.gate",
            }
            sd[ve + back[k]] = t
    for k, t in image.vision_projection.state_dict().items():
        sd[f"vision_model.vision_projection.{k}"] = t
    sd = {k: t.detach().cpu().contiguous() for k, t in sd.items()}
    for r in range(model_parallel):
        shard = {}
        for k, t in sd.items():
            d = _split_dim(k, t)
            shard[k] = t.clone() if (model_parallel == 1 or d is None) else t.chunk(model_parallel, dim=d)[r].clone()
        name = "consolidated.pth" if model_parallel == 1 else f"consolidated.{r:02d}.pth"
        torch.save(shard, folder / name)
