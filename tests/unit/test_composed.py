"""One composed model: image, video and speech parts on one frozen tower, any subset, mixed batches, labels."""

import itertools
import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from mm_llama.adapters.composed import ComposedModel, label_positions
from mm_llama.adapters.files import adapter_kind, load_composed, save_part, trained_tower_dtype
from mm_llama.adapters.modalities.image import image_batch
from mm_llama.llama.checkpoint import CheckpointError
from tests import tiny

T = 14  # every test sequence has this length, so samples batch without padding


@pytest.fixture(scope="module")
def inputs(tiny_model):
    """Per kind: (ids [1, T] with the kind's token(s), its media)."""
    m = tiny_model
    g = torch.Generator().manual_seed(1)
    text = torch.randint(3, m.args.vocab_size, (1, T), generator=g)
    img = Image.fromarray((torch.rand(40, 30, 3, generator=g) * 255).byte().numpy())
    frames = torch.randn(8, 3, 28, 28, generator=g)
    feats = torch.randn(37, 80, generator=g)
    n_speech = int(m.speech.output_rows(torch.tensor([37]))[0])
    assert 0 < n_speech < T - 3

    def with_token(kind, at, n=1):
        ids = text.clone()
        ids[0, at : at + n] = m.token_id(kind)
        return ids

    return {
        "text": (text, None),
        "image": (with_token("image", 1), img),
        "video": (with_token("video", 1), frames),
        "speech": (with_token("speech", 2, n_speech), feats),
    }


def media_kwargs(model, kind, ids, media):
    if kind == "image":
        return image_batch(model, [[media]])
    if kind == "video":
        return {"videos": [media]}
    if kind == "speech":
        return {"speech_features": [media]}
    return {}


def logits(model, kind, ids, media):
    return model(ids, **media_kwargs(model, kind, ids, media)).logits


SUBSETS = [set(s) for n in range(4) for s in itertools.combinations(("image", "video", "speech"), n)]


@pytest.mark.parametrize("subset", SUBSETS, ids=lambda s: "+".join(sorted(s)) or "none")
@torch.no_grad()
def test_every_subset_is_exact(tiny_tower, tiny_parts, inputs, subset):
    """Text rows equal the bare tower; each input's output equals the model with only the part(s) it needs."""
    need = {"image": {"image"}, "video": {"image", "video"}, "speech": {"speech"}}
    loaded = set().union(subset, *(need[k] for k in subset))
    model = ComposedModel(tiny_tower, {k: tiny_parts[k] for k in loaded})
    assert set(model.modalities) == loaded
    assert torch.equal(logits(model, "text", *inputs["text"]), tiny_tower(inputs["text"][0]))
    for kind in sorted(subset):
        alone = ComposedModel(tiny_tower, {k: tiny_parts[k] for k in need[kind]})
        assert torch.equal(logits(model, kind, *inputs[kind]), logits(alone, kind, *inputs[kind])), kind


@torch.no_grad()
def test_mixed_batch(tiny_model, inputs):
    m = tiny_model
    kinds = ["image", "text", "speech", "video"]
    ids = torch.cat([inputs[k][0] for k in kinds])
    out = m(
        ids,
        **image_batch(m, [[inputs["image"][1]], [], [], []]),
        videos=[None, None, None, inputs["video"][1]],
        speech_features=[None, None, inputs["speech"][1], None],
    ).logits
    for b, kind in enumerate(kinds):
        torch.testing.assert_close(out[b : b + 1], logits(m, kind, *inputs[kind]), rtol=1e-5, atol=1e-5, msg=kind)
    # in a batch where the blocks run, a sample without media is exactly the bare tower on the same batch
    two = ids[:2]
    out = m(two, **image_batch(m, [[inputs["image"][1]], []])).logits
    assert torch.equal(out[1], m.tower(embeds=m.embed(two))[1])
    assert not torch.equal(out[0], m.tower(embeds=m.embed(two))[0])


def test_labels_give_the_mean_loss_at_labelled_positions(inputs):
    m = tiny.model(["speech"])
    ids, feats = inputs["speech"]
    labels = torch.full_like(ids, -100)
    labels[0, -4:] = ids[0, -4:]
    out = m(ids, speech_features=[feats], labels=labels)
    full = m(ids, speech_features=[feats]).logits[0]
    sel = label_positions(labels)[0]
    assert out.logits.shape == (int(sel.sum()), m.args.vocab_size)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(full[sel], ids[0, 1:][sel[:-1]]))
    assert out.n_tokens == int(sel.sum()) == 4
    out.loss.backward()
    assert all(p.grad is not None for p in m.speech.adapter.parameters())
    assert all(p.grad is None for p in m.tower.parameters())


def test_token_ids_come_from_the_registry(tiny_model, tiny_tower, tiny_parts):
    V = tiny_tower.args.vocab_size
    assert [tiny_model.token_id(k) for k in ("image", "video", "speech")] == [V, V + 8, V + 9]
    assert tiny_model.token_rows == {"image": (0, 8), "video": (8, 1), "speech": (9, 1)}
    with pytest.raises(KeyError, match="no speech adapter"):
        ComposedModel(tiny_tower, image=tiny_parts["image"]).token_id("speech")
    with pytest.raises(ValueError, match="video adapter needs a image adapter"):
        ComposedModel(tiny_tower, video=tiny_parts["video"])


def test_frozen_parts_stay_in_eval_mode():
    m = tiny.model()
    m.image.requires_grad_(False)  # the video stage: its image part frozen
    m.speech.encoder.requires_grad_(False)
    m.train()
    assert not m.tower.training and not m.image.training and not m.speech.encoder.training
    assert m.video.aggregator.training and m.speech.adapter.training
    assert not any(p.requires_grad for p in m.tower.parameters())


@torch.no_grad()
def test_adapter_files_load_together_in_any_order(tiny_model, inputs, tmp_path):
    files = {k: tmp_path / f"{k}.safetensors" for k in ("image", "video", "speech")}
    for kind, path in files.items():
        save_part(tiny_model, kind, path)
    assert {k: adapter_kind(p) for k, p in files.items()} == {k: k for k in files}
    # files written before token rows, tower shapes and dtypes were recorded load as well
    old = tmp_path / "old_speech.safetensors"
    with safe_open(str(files["speech"]), framework="pt") as f:
        meta = json.loads(f.metadata()["mm_llama"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    for key in ("token_rows", "tower_dtype", "tower", "version"):
        meta.pop(key)
    save_file(state, str(old), metadata={"mm_llama": json.dumps(meta)})
    for order in ([files["speech"], files["video"], files["image"]], [files["image"], old, files["video"]]):
        model = load_composed(tiny.tower(), order)
        assert model.modalities == ["image", "video", "speech"]
        for kind in ("text", "image", "video", "speech"):
            assert torch.equal(logits(model, kind, *inputs[kind]), logits(tiny_model, kind, *inputs[kind]))
    with pytest.raises(CheckpointError, match="video adapter runs on its image adapter"):
        load_composed(tiny.tower(), [files["video"]])
    with pytest.raises(CheckpointError, match="two image adapters"):
        load_composed(tiny.tower(), [files["image"], files["image"]])
    with pytest.raises(CheckpointError, match="different tower"):
        load_composed(tiny.tower(n_layers=8), [files["image"]])


def test_adapter_files_record_the_tower_dtype(tmp_path):
    """Each adapter file says which tower weights it was trained on; `--dtype auto` loads that tower."""

    m = tiny.model(["image"])
    save_part(m, "image", tmp_path / "i32.safetensors")
    m.tower.to(torch.bfloat16)  # the part stays fp32, the tower is bf16
    save_part(m, "image", tmp_path / "i16.safetensors")
    assert trained_tower_dtype([tmp_path / "i32.safetensors"]) == "float32"
    assert trained_tower_dtype([tmp_path / "i16.safetensors"]) == "bfloat16"
    with pytest.raises(CheckpointError, match="different dtypes.*i16.safetensors: bfloat16"):
        trained_tower_dtype([tmp_path / "i32.safetensors", tmp_path / "i16.safetensors"])


def test_parts_hold_no_tower(tiny_tower, tiny_parts):
    towers = {id(m) for p in tiny_parts.values() for m in p.modules() if m is tiny_tower}
    assert not towers
    bad = torch.nn.Module()
    bad.tower = tiny_tower
    with pytest.raises(ValueError, match="parts hold only their own weights"):
        ComposedModel(tiny_tower, image=bad)
