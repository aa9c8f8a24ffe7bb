"""The image part vs transformers' Mllama (tiny random configs through our HF loader), gates, freezing, counts,
export to transformers and Meta's layout."""

import dataclasses

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from skimage import data as skdata

from mm_llama.adapters import ComposedModel, VisionEncoder, export_hf_mllama, load_pretrained
from mm_llama.adapters.files import load_composed, save_part
from mm_llama.adapters.generation import Collate
from mm_llama.adapters.image import ImagePart, build_image_part, default_schedule, get_vision_preset
from mm_llama.adapters.meta_format import _grid_to_table, save_meta_vision, table_to_grid
from mm_llama.adapters.samples import Samples
from mm_llama.adapters.xattn import GatedCrossAttentionBlock
from mm_llama.data.collate import cross_attention_mask
from mm_llama.data.conversation import Message, Part
from mm_llama.llama import CheckpointError, RopeScaling, Transformer, get_preset
from tests import tiny

V = tiny.HF_V


def hf_lib():
    """transformers, the numeric reference (the dev extra): missing is a failure of the HF tests only, never a skip
    of the pure unit tests beside them."""
    try:
        import transformers  # noqa: PLC0415 - missing fails the HF tests only
    except ImportError as e:
        pytest.fail(f"transformers (the reference; `make install-dev` installs it) cannot be imported: {e}")
    return transformers


def hf_mllama(tmp_path, cross_layers, n_text_layers, kv_heads=2, seed=0):
    hf_lib()
    return tiny.hf_mllama(tmp_path, cross_layers, n_text_layers, kv_heads, seed)


def inputs(ids, images, seed=0, img=V):
    """images: per sample a list of (num_tiles, aspect_ratio_id)."""
    g = torch.Generator().manual_seed(seed)
    B, I = len(ids), max(max((len(x) for x in images), default=0), 1)  # noqa: E741
    px = torch.randn(B, I, 4, 3, 28, 28, generator=g)
    ar_ids = torch.zeros(B, I, dtype=torch.long)
    ar_mask = torch.zeros(B, I, 4, dtype=torch.long)
    ar_mask[:, :, 0] = 1
    for b, imgs in enumerate(images):
        for i, (n, rid) in enumerate(imgs):
            ar_ids[b, i], ar_mask[b, i, :n] = rid, 1
    T = max(len(s) for s in ids)
    padded = torch.tensor([s + [0] * (T - len(s)) for s in ids])
    xm = cross_attention_mask(ids, img, [[n for n, _ in imgs] for imgs in images], 4, length=T)
    return dict(
        input_ids=padded, pixel_values=px, aspect_ratio_ids=ar_ids, aspect_ratio_mask=ar_mask, cross_attention_mask=xm
    )


CASES = {
    "one_xattn_one_image_4_tiles": ([2], 5, [[V, 5, 6, 7, 8, 9]], [[(4, 6)]]),
    "two_xattn_two_images": ([1, 4], 6, [[3, V, 5, V, 6, 7, 8, 9]], [[(2, 2), (1, 1)]]),
    "consecutive_images_3_tiles": ([1, 4], 6, [[V, V, 5, 6, 7, V, 9, 10]], [[(3, 7), (1, 1), (4, 8)]]),
    "adjacent_xattn_and_last": ([2, 3, 6], 7, [[V, 5, 6, 7, 8]], [[(4, 8)]]),
    "mixed_batch_with_text_only": (
        [1, 4],
        6,
        [[V, 5, 6, 7], [3, 4, 5, 6, 7, 8], [V, 9, V, 11, 12]],
        [[(2, 5)], [], [(1, 1), (4, 6)]],
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_hf_mllama(tmp_path, name):
    cross, n_layers, ids, images = CASES[name]
    hf = hf_mllama(tmp_path, cross, n_layers)
    ours = load_pretrained(tmp_path, hf_compat_masking=True, intermediate_from="output")
    assert ours.image.schedule == [c - k for k, c in enumerate(cross)]
    x = inputs(ids, images)
    with torch.no_grad():
        ref = hf(**x).logits
        got = ours(**x).logits
        # the mask our data path builds from the <|image|> positions (no cross_attention_mask given)
        derived = ours(**{k: v for k, v in x.items() if k != "cross_attention_mask"}).logits
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4
    real = torch.tensor([[t < len(s) for t in range(got.shape[1])] for s in ids])
    assert torch.equal(derived[real], got[real])


def test_text_only_request_matches_hf(tmp_path):
    hf = hf_mllama(tmp_path, [1, 4], 6)
    ours = load_pretrained(tmp_path)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert (ours(ids).logits - hf(input_ids=ids).logits).abs().max().item() <= 1e-4


def test_intermediate_features_are_layer_inputs_as_in_meta(tmp_path):
    """Meta's reference encoder (and transformers 4.x) collects the INPUT of layers [3, 7, 15, 23, 30];
    transformers 5.x collects their OUTPUT. Ours (default, Meta) with indices [k] equals transformers 5.x
    with indices [k - 1], which pins both semantics down exactly."""
    hf_mllama(tmp_path, [2], 5)  # our indices [1, 3] (inputs) == transformers 5.x indices [0, 2] (outputs)
    ours = load_pretrained(tmp_path).image
    assert ours.vision_args.intermediate_from == "input"
    cfg = hf_lib().MllamaVisionConfig(
        hidden_size=32,
        attention_heads=4,
        num_hidden_layers=5,
        num_global_layers=2,
        intermediate_size=64,
        image_size=28,
        patch_size=14,
        max_num_tiles=4,
        intermediate_layers_indices=[0, 2],
        vision_output_dim=96,
    )
    shifted = hf_lib().models.mllama.modeling_mllama.MllamaVisionModel(cfg).eval()
    shifted.load_state_dict(ours.vision_encoder.state_dict())
    x = inputs([[V, 5]], [[(2, 2)]])
    args = (x["pixel_values"], x["aspect_ratio_ids"], x["aspect_ratio_mask"])
    with torch.no_grad():
        ref = shifted(pixel_values=args[0], aspect_ratio_ids=args[1], aspect_ratio_mask=args[2]).last_hidden_state
        assert torch.equal(ours.vision_encoder(*args), ref)


def test_meta_masking_differs_from_hf_only_on_rows_without_images(tmp_path):
    """Meta zeroes both branches for text rows that see no image; HF zeroes only the FFN branch (#39379)."""
    hf_mllama(tmp_path, [1, 4], 6)
    meta = load_pretrained(tmp_path, intermediate_from="output")  # Meta masking; same vision features as HF
    compat = load_pretrained(tmp_path, hf_compat_masking=True, intermediate_from="output")
    late = inputs([[3, 4, 5, V, 6, 7]], [[(2, 2)]])  # rows 0-2 see no image
    early = inputs([[V, 4, 5, 6, 7, 8]], [[(2, 2)]])  # every row sees the image
    with torch.no_grad():
        d_late = (meta(**late).logits - compat(**late).logits).abs().amax(-1)[0]
        d_early = (meta(**early).logits - compat(**early).logits).abs().max()
    assert d_late[:3].min() > 1e-3  # the leak changes the rows before the image ...
    assert d_early == 0  # ... and nothing when no row is fully masked
    # with Meta masking, rows before the first image equal the text-only model exactly
    with torch.no_grad():
        text_only = meta(late["input_ids"][:, :3]).logits
        assert torch.allclose(meta(**late).logits[:, :3], text_only, atol=1e-6)


def test_vision_encoder_bitwise_equal_to_hf(tmp_path):
    hf = hf_mllama(tmp_path, [2], 5)
    ours = load_pretrained(tmp_path, intermediate_from="output").image
    x = inputs([[V, 5]], [[(3, 7)]])
    with torch.no_grad():
        ref = hf.model.vision_model(
            pixel_values=x["pixel_values"],
            aspect_ratio_ids=x["aspect_ratio_ids"],
            aspect_ratio_mask=x["aspect_ratio_mask"],
        ).last_hidden_state
        got = ours.vision_encoder(x["pixel_values"], x["aspect_ratio_ids"], x["aspect_ratio_mask"])
    assert torch.equal(got, ref)


def small_model(**kw) -> ComposedModel:
    tower = tiny.tower(n_layers=8)
    return ComposedModel(tower, image=build_image_part(tower, "debug", **kw))


def test_zero_gates_equal_bare_tower_and_tower_frozen():
    model = small_model()
    assert model.image.schedule == [3, 7]
    x = inputs([[1, 512, 5, 6, 7], [512, 3, 4, 5, 6]], [[(2, 2)], [(1, 1)]], img=512)
    with torch.no_grad():
        fused = model(**x).logits
        bare = model.tower(embeds=model.embed(x["input_ids"]))  # same inputs (<|image|> reads its learnable row)
        text = torch.tensor([[1, 2, 3, 4, 5]])
        assert torch.equal(model(text).logits, model.tower(text))
    assert torch.equal(fused, bare)  # gates at 0: the composed model IS the tower
    assert not any(p.requires_grad for p in model.tower.parameters())
    model.train()
    assert not model.tower.training and model.image.vision_encoder.training
    before = {k: v.clone() for k, v in model.tower.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**x).logits.logsumexp(-1).mean().backward()
    opt.step()
    assert all(torch.equal(v, model.tower.state_dict()[k]) for k, v in before.items())
    assert model.image.cross_attention_layers[0].gate_attn.grad is not None


def test_parameter_counts():
    with torch.device("meta"):
        enc = VisionEncoder(get_vision_preset("llama3_2_vision"))
        hf_vis = hf_lib().models.mllama.modeling_mllama.MllamaVisionModel(hf_lib().MllamaVisionConfig())
    assert sum(p.numel() for p in enc.parameters()) == sum(p.numel() for p in hf_vis.parameters())
    # paper arithmetic per cross-attention layer: 2d^2 + 2d(d/4) + 3d*FFN (norms and gates aside)
    for preset, n_blocks, total in (
        ("llama3_1_8b", 8, 1.75e9),
        ("llama3_1_70b", 20, 17.1e9),
        ("llama3_1_405b", 31, 100e9),
    ):
        a = get_preset(preset)
        with torch.device("meta"):
            block = GatedCrossAttentionBlock.for_tower(a)
        n = sum(p.numel() for p in block.parameters()) * len(default_schedule(a.n_layers))
        assert len(default_schedule(a.n_layers)) == n_blocks
        assert abs(n - total) / total < 0.03, (preset, n)


def test_schedule_validation():
    with pytest.raises(ValueError, match="schedule"):
        ImagePart(get_preset("debug").replace(n_layers=8), get_vision_preset("debug"), [5, 3])


def test_adapter_file_roundtrip(tmp_path):
    model = small_model()
    with torch.no_grad():
        for p in model.image.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_part(model, "image", tmp_path / "adapter.safetensors")

    keys = load_file(tmp_path / "adapter.safetensors").keys()
    assert keys and not any(k.startswith("tower.") for k in keys)
    back = load_composed(tiny.tower(n_layers=8), [tmp_path / "adapter.safetensors"])
    x = inputs([[512, 3, 4, 5]], [[(2, 2)]], img=512)
    with torch.no_grad():
        assert torch.equal(back(**x).logits, model.eval()(**x).logits)
    other = Transformer(get_preset("debug").replace(n_layers=8, ffn_dim=96))
    with pytest.raises(CheckpointError, match="different tower.*ffn_dim"):
        load_composed(other, [tmp_path / "adapter.safetensors"])


@pytest.mark.parametrize("scaling", [False, True])
def test_export_roundtrip_through_transformers(tmp_path, scaling):
    """ours -> HF Mllama folder -> transformers logits == ours; and back through our loader."""

    args = get_preset("debug").replace(n_layers=7, rope_scaling=RopeScaling(factor=8.0) if scaling else None)
    tower = Transformer(args)
    tower.init_weights(std=0.05, generator=torch.Generator().manual_seed(1))
    # transformers 5.x takes intermediate features one layer later than Meta (see the test above): build the
    # adapter with its convention so its logits can be compared with transformers'
    vision = dataclasses.replace(get_vision_preset("debug"), intermediate_from="output")
    model = ComposedModel(tower.requires_grad_(False), image=build_image_part(tower, vision, hf_compat_masking=True))
    with torch.no_grad():
        for p in model.image.parameters():
            p.add_(0.02 * torch.randn_like(p))
        for block in model.image.cross_attention_layers:
            block.gate_attn.fill_(0.8)
            block.gate_ffwd.fill_(-0.6)
    model.eval()
    export_hf_mllama(model, tmp_path / "hf")
    hf = hf_lib().MllamaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    x = inputs([[512, 3, 4, 512, 5, 6], [7, 512, 8, 9, 10, 11]], [[(2, 2), (1, 1)], [(4, 6)]], img=512)
    with torch.no_grad():
        got = model(**x).logits
        assert (hf(**x).logits - got).abs().max().item() <= 1e-4
        back = load_pretrained(tmp_path / "hf", hf_compat_masking=True, intermediate_from="output")
        assert back.image.schedule == model.image.schedule
        assert (back(**x).logits - got).abs().max().item() <= 1e-5


@pytest.mark.parametrize("mp", [1, 2])
def test_meta_format_roundtrip_equals_hf_folder(tmp_path, mp):
    """HF folder -> ours -> Meta layout (consolidated.pth or 2 model-parallel shards) -> ours: same logits."""

    hf_mllama(tmp_path / "hf", [1, 4], 6)  # cross layers before tower layers 1 and 3 = Meta's uniform schedule
    a = load_pretrained(tmp_path / "hf")
    assert a.image.schedule == [1, 3]
    # HF's random init fills table entries no aspect ratio owns (e.g. tile 4 of a 3x1 image); converted real
    # checkpoints have zeros there, as Meta's grids imply: make the random model representable first

    ve, P, W = a.image.vision_encoder, a.image.vision_args.num_patches, a.image.vision_args.width
    with torch.no_grad():
        tables = (
            (ve.gated_positional_embedding.tile_embedding, P),
            (ve.pre_tile_positional_embedding.embedding, 1),
            (ve.post_tile_positional_embedding.embedding, 1),
        )
        for emb, p in tables:
            emb.weight.copy_(_grid_to_table(table_to_grid(emb.weight, 4, p, W), 4))
    save_meta_vision(a, tmp_path / "meta", model_parallel=mp)
    b = load_pretrained(tmp_path / "meta")
    assert b.image.schedule == a.image.schedule and b.image.vision_args == a.image.vision_args
    x = inputs([[V, 5, V, 6, 7], [3, 4, V, 8, 9]], [[(4, 6), (3, 7)], [(2, 5)]])
    with torch.no_grad():
        assert torch.equal(a(**x).logits, b(**x).logits)


def test_meta_tile_grid_semantics():
    """Meta indexes its [T, T, ...] tile grids as grid[:rows, :cols] in row-major tile order."""

    grid = torch.arange(4 * 4 * 1 * 2, dtype=torch.float32).reshape(4, 4, 1, 2)
    table = _grid_to_table(grid, 4).reshape(9, 4, 1, 2)
    assert torch.equal(table[6, :4], grid[:2, :2].reshape(4, 1, 2))  # id 6 = (2 rows, 2 cols)
    assert torch.equal(table[7, :3], grid[:3, :1].reshape(3, 1, 2))  # id 7 = (3 rows, 1 col)
    assert torch.equal(table[0], torch.zeros(4, 1, 2))
    back = table_to_grid(_grid_to_table(grid, 4), 4, 1, 2)
    used = torch.zeros(4, 4, dtype=torch.bool)
    for r, c in [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]:
        used[:r, :c] = True
    assert torch.equal(back[used], grid[used])


class SmallTok(tiny.CharTok):
    """The character tokenizer with every id below the tiny Mllama's vocabulary (ChatML markers at 110/111)."""

    special_tokens = {"<|begin_of_text|>": 2, "<|im_start|>": 110, "<|im_end|>": 111}

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return ([self.bos_id] if bos else []) + [3 + (ord(c) % 100) for c in text]


def test_rendered_conversation_with_two_images_matches_hf(tmp_path):
    """A two-turn conversation with an image in each user turn, rendered and collated by the training data path:
    logits and the assistant-only loss equal transformers' Mllama on the same ids, pixels and mask; it trains."""
    hf = hf_mllama(tmp_path, [1, 4], 6)
    ours = load_pretrained(tmp_path, hf_compat_masking=True, intermediate_from="output")
    photo = {n: Image.fromarray(getattr(skdata, n)()).convert("RGB") for n in ("astronaut", "chelsea")}
    msgs = [
        Message("user", [Part("image", ref=photo["astronaut"]), Part("text", "who?")]),
        Message("assistant", [Part("text", "her")]),
        Message("user", [Part("text", "and "), Part("image", ref=photo["chelsea"])]),
        Message("assistant", [Part("text", "a cat")]),
    ]
    item, _ = Samples.of(ours, SmallTok(), kinds=["image"]).render(msgs, conversation=True)
    assert item["input_ids"].count(V) == 2 and [p["ratio"] for p in item["image"]] != [0, 0]
    batch = Collate(["image"])([item])
    ids, labels = batch["input_ids"], batch["labels"]
    num_tiles = [[int(m.sum()) for m in batch["aspect_ratio_mask"][0]]]
    xmask = cross_attention_mask(ids.tolist(), V, num_tiles, 4)
    x = {k: batch[k] for k in ("input_ids", "pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
    with torch.no_grad():
        ref = hf(**x, cross_attention_mask=xmask, labels=labels)
        got = ours(**x, cross_attention_mask=xmask).logits
        loss = ours(**x, labels=labels).loss  # the mask from the <|image|> positions, as training builds it
    assert (got - ref.logits).abs().max().item() <= 1e-4
    assert abs(loss.item() - ref.loss.item()) <= 1e-5
    ours.image.requires_grad_(True)  # loaded frozen; train it
    ours.train()
    ours(**x, labels=labels).loss.backward()
    assert all(p.grad is not None for p in ours.image.cross_attention_layers.parameters())
