"""One composed model: image, video and speech adapters on one frozen tower, any subset, mixed batches."""

import itertools

import pytest
import torch
from PIL import Image

from mm_llama.adapters.asr import build_speech_model
from mm_llama.adapters.builders import attach_image_adapter
from mm_llama.adapters.composed import ComposedModel, label_positions
from mm_llama.adapters.fusion import TOKEN_ROWS
from mm_llama.adapters.inference import image_inputs
from mm_llama.adapters.speech import ADAPTER_PRESETS, CONFORMER_PRESETS, ConformerEncoder
from mm_llama.adapters.video import AggregatorArgs, FusedVideoModel
from mm_llama.data.collate import cross_attention_mask
from mm_llama.llama import Transformer, get_preset

T = 14  # every test sequence has this length, so samples batch without padding


def open_gates(blocks, value=0.7):
    with torch.no_grad():
        for blk in blocks:
            blk.gate_attn.fill_(value)
            blk.gate_ffwd.fill_(value)


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    tower = Transformer(get_preset("debug").replace(n_layers=16))
    tower.init_weights(std=0.05, generator=torch.Generator().manual_seed(0))
    tower.requires_grad_(False).eval()
    image = attach_image_adapter(tower, "debug")
    open_gates(image.cross_attention_layers)
    video = FusedVideoModel(image, AggregatorArgs(merge=4, heads=4))
    open_gates(video.video_cross_attention_layers)
    speech = build_speech_model(tower, ConformerEncoder(CONFORMER_PRESETS["debug"]), ADAPTER_PRESETS["debug"])
    for m in (image, video, speech):
        m.eval()
    return tower, image, video, speech


@pytest.fixture(scope="module")
def inputs(parts):
    """Per kind: (composed ids [1, T], single-model ids [1, T], media)."""
    tower, image, video, speech = parts
    V = tower.args.vocab_size
    g = torch.Generator().manual_seed(1)
    text = torch.randint(3, V, (1, T), generator=g)
    img = Image.fromarray((torch.rand(40, 30, 3, generator=g) * 255).byte().numpy())
    frames = torch.randn(8, 3, 28, 28, generator=g)
    feats = torch.randn(37, 80, generator=g)
    n_speech = int(speech.expected_speech_tokens(torch.tensor([37]))[0])
    assert 0 < n_speech < T - 3

    def with_token(single_id, composed_id, at, n=1):
        single, composed = text.clone(), text.clone()
        single[0, at : at + n], composed[0, at : at + n] = single_id, composed_id
        return composed, single

    return {
        "text": (text, text, None),
        "image": (*with_token(V, V + TOKEN_ROWS["image"][0], 1), img),
        "video": (*with_token(V + 1, V + TOKEN_ROWS["video"][0], 1), frames),
        "speech": (*with_token(V, V + TOKEN_ROWS["speech"][0], 2, n_speech), feats),
    }


def image_kwargs(image, ids_BT, imgs):
    pix = image_inputs(image, imgs)
    a = image.vision_encoder.args
    xm = cross_attention_mask(ids_BT.tolist(), image.image_token_id, pix["num_tiles"], a.max_num_tiles)
    return {k: pix[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")} | {"cross_attention_mask": xm}


def single_output(parts, kind, ids, media):
    tower, image, video, speech = parts
    if kind == "text":
        return tower(ids)
    if kind == "image":
        return image(ids, **image_kwargs(image, ids, [[media]]))
    if kind == "video":
        return video(ids, videos=[media])
    return speech(ids, media[None], torch.tensor([media.shape[0]]))


def composed_output(model, kind, ids, media):
    if kind == "image":
        return model(ids, **image_kwargs(model.image, ids, [[media]])).logits
    if kind == "video":
        return model(ids, videos=[media]).logits
    if kind == "speech":
        return model(ids, speech_features=[media]).logits
    return model(ids).logits


SUBSETS = [set(s) for n in range(4) for s in itertools.combinations(("image", "video", "speech"), n)]


@pytest.mark.parametrize("subset", SUBSETS, ids=lambda s: "+".join(sorted(s)) or "none")
@torch.no_grad()
def test_every_subset_is_exact(parts, inputs, subset):
    """Text rows equal the bare tower; each input equals its single-adapter model, whatever else is loaded."""
    tower, image, video, speech = parts
    model = ComposedModel(tower, image=image if "image" in subset else None, video=video if "video" in subset else None,
                          speech=speech if "speech" in subset else None)  # fmt: skip
    loaded = set(model.modalities)
    assert loaded == subset | ({"image"} if "video" in subset else set())
    for kind in ("text", *sorted(loaded)):
        composed_ids, single_ids, media = inputs[kind]
        want = single_output(parts, kind, single_ids, media)
        assert torch.equal(composed_output(model, kind, composed_ids, media), want), kind


@torch.no_grad()
def test_mixed_batch(parts, inputs):
    tower, image, video, speech = parts
    model = ComposedModel(tower, image=image, video=video, speech=speech)
    kinds = ["image", "text", "speech", "video"]
    ids = torch.cat([inputs[k][0] for k in kinds])
    out = model(
        ids,
        **image_kwargs(image, ids, [[inputs["image"][2]], [], [], []]),
        videos=[None, None, None, inputs["video"][2]],
        speech_features=[None, None, inputs["speech"][2], None],
    ).logits
    for b, kind in enumerate(kinds):
        want = single_output(parts, kind, inputs[kind][1], inputs[kind][2])
        torch.testing.assert_close(out[b : b + 1], want, rtol=1e-5, atol=1e-5, msg=kind)
    # in a batch where the blocks run, a sample without media is exactly the bare tower on the same batch
    two = ids[:2]
    out = model(two, **image_kwargs(image, two, [[inputs["image"][2]], []])).logits
    assert torch.equal(out[1], tower(embeds=model.embed(two))[1])
    assert not torch.equal(out[0], tower(embeds=model.embed(two))[0])


def test_labels_give_the_mean_loss_at_labelled_positions(parts, inputs):
    tower, image, video, speech = parts
    model = ComposedModel(tower, speech=speech)
    ids, _, feats = inputs["speech"]
    labels = torch.full_like(ids, -100)
    labels[0, -4:] = ids[0, -4:]
    out = model(ids, speech_features=[feats], labels=labels)
    full = model(ids, speech_features=[feats]).logits[0]
    sel = label_positions(labels)[0]
    assert out.logits.shape == (int(sel.sum()), tower.args.vocab_size)
    want = torch.nn.functional.cross_entropy(full[sel], ids[0, 1:][sel[:-1]])
    torch.testing.assert_close(out.loss, want)
    assert out.n_tokens == int(sel.sum()) == 4
    out.loss.backward()
    assert all(p.grad is not None for p in speech.adapter.parameters())
    assert all(p.grad is None for p in tower.parameters())
    speech.zero_grad(set_to_none=True)


def test_token_rows_are_distinct_and_checked(parts):
    tower, image, video, speech = parts
    model = ComposedModel(tower, image=image, video=video, speech=speech)
    V = tower.args.vocab_size
    assert [model.token_id(k) for k in ("image", "video", "speech")] == [V, V + 8, V + 9]
    with pytest.raises(ValueError, match="overlap"):
        ComposedModel(tower, image=image, speech=speech, token_rows={"image": (0, 8, 0), "speech": (0, 1, 0)})
    with pytest.raises(KeyError, match="no speech adapter"):
        ComposedModel(tower, image=image).token_id("speech")
    other = Transformer(tower.args)
    with pytest.raises(ValueError, match="another tower"):
        ComposedModel(other, image=image)


def test_frozen_tower_and_train_mode(parts):
    tower, image, video, speech = parts
    model = ComposedModel(tower, image=image, video=video, speech=speech)
    model.train()
    assert not tower.training and not image.training  # the video stage keeps its image model frozen
    assert video.aggregator.training and speech.adapter.training
    assert not any(p.requires_grad for p in tower.parameters())
    model.eval()


@torch.no_grad()
def test_adapter_files_load_together_in_any_order(parts, inputs, tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from mm_llama.adapters.asr import save_speech_adapter
    from mm_llama.adapters.checkpoint import save_adapter
    from mm_llama.adapters.composed import adapter_kind, load_composed
    from mm_llama.adapters.video import save_video_adapter
    from mm_llama.llama.checkpoint import CheckpointError

    tower, image, video, speech = parts
    files = {
        "image": tmp_path / "i.safetensors",
        "video": tmp_path / "v.safetensors",
        "speech": tmp_path / "s.safetensors",
    }
    save_adapter(image, files["image"])
    save_video_adapter(video, files["video"])
    save_speech_adapter(speech, files["speech"])
    assert {k: adapter_kind(p) for k, p in files.items()} == {k: k for k in files}
    # files written before token rows were saved (the previous format) load with the default layout
    old = tmp_path / "old_speech.safetensors"
    with safe_open(str(files["speech"]), framework="pt") as f:
        meta = json.loads(f.metadata()["mm_llama"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    meta.pop("token_rows")
    meta.pop("tower_dtype")
    save_file(state, str(old), metadata={"mm_llama": json.dumps(meta)})

    want = ComposedModel(tower, image=image, video=video, speech=speech)
    for order in ([files["speech"], files["video"], files["image"]], [files["image"], old, files["video"]]):
        fresh = Transformer(tower.args)
        fresh.load_state_dict(tower.state_dict())
        model = load_composed(fresh.requires_grad_(False).eval(), order)
        assert model.modalities == ["image", "video", "speech"]
        for kind in ("text", "image", "video", "speech"):
            ids, _, media = inputs[kind]
            assert torch.equal(composed_output(model, kind, ids, media), composed_output(want, kind, ids, media))
    with pytest.raises(CheckpointError, match="video adapter runs on its image adapter"):
        load_composed(tower, [files["video"]])
    with pytest.raises(CheckpointError, match="two image adapters"):
        load_composed(tower, [files["image"], files["image"]])


def test_adapter_files_record_the_tower_dtype(parts, tmp_path):
    """Each adapter file says which tower weights it was trained on; `--dtype auto` loads that tower."""
    from mm_llama.adapters.checkpoint import save_adapter, trained_tower_dtype
    from mm_llama.adapters.video import save_video_adapter
    from mm_llama.llama.checkpoint import CheckpointError

    tower, image, video, _ = parts
    save_adapter(image, tmp_path / "i32.safetensors")
    save_video_adapter(video, tmp_path / "v32.safetensors")
    assert trained_tower_dtype([tmp_path / "i32.safetensors", tmp_path / "v32.safetensors"]) == "float32"
    bf16 = Transformer(tower.args)
    bf16.load_state_dict(tower.state_dict())
    bf16.to(torch.bfloat16).requires_grad_(False)
    save_adapter(attach_image_adapter(bf16, "debug"), tmp_path / "i16.safetensors")  # adapter fp32, tower bf16
    assert trained_tower_dtype([tmp_path / "i16.safetensors"]) == "bfloat16"
    with pytest.raises(CheckpointError, match="different dtypes.*i16.safetensors: bfloat16"):
        trained_tower_dtype([tmp_path / "v32.safetensors", tmp_path / "i16.safetensors"])
