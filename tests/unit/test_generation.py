"""Generation through the one composed forward: media encoded and keys/values computed once per request, the
tower's KV cache, left-padded batches; the same tokens as recomputing the whole sequence at every step."""

import argparse

import pytest
import torch
from PIL import Image

from mm_llama.adapters.chat import answer, samples_for
from mm_llama.adapters.generation import Collate, generate_items
from mm_llama.adapters.modality import AnswerOptions
from mm_llama.adapters.samples import Samples, plain_requests
from mm_llama.data.conversation import Message, Part
from tests import tiny


def item(model, tok, kind: str, prompt: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    if kind == "image":
        img = Image.fromarray((torch.rand(40, 30 + 10 * seed, 3, generator=g) * 255).byte().numpy())
        return plain_requests(model, tok, "image", [img], "x.png", AnswerOptions(prompt=prompt))[0]
    if kind == "video":
        clip = torch.zeros(8, 3, 28, 28, dtype=torch.uint8)
        it = plain_requests(model, tok, "video", [clip], "x.mp4", AnswerOptions(prompt=prompt, frames=8))[0]
        return {**it, "video": [tiny.moving_square(("left", "right", "up")[seed % 3])]}
    wave = torch.randn(4000 + 1600 * seed, generator=g) * 0.1
    return plain_requests(model, tok, "speech", [wave], "x.wav", AnswerOptions())[0]


@torch.no_grad()
def greedy_by_recompute(model, tok, it: dict, n: int) -> list[int]:
    """The reference: the whole sequence through the training forward at every step, no cache, no prepared state."""
    seq = list(it["input_ids"])
    inputs = Collate(model.kinds).inputs([it])
    for _ in range(n):
        logits = model(torch.tensor([seq]), **inputs).logits[0, -1]
        seq.append(int(logits.argmax()))
    return seq[len(it["input_ids"]) :]


@pytest.mark.parametrize("kind", ["image", "video", "speech"])
def test_cached_generation_equals_recompute(tiny_model, char_tok, kind):
    it = item(tiny_model, char_tok, kind, "what is it")
    want = greedy_by_recompute(tiny_model, char_tok, it, 5)
    got = generate_items(tiny_model, char_tok, [it], max_new_tokens=5)
    assert got == [char_tok.decode(want)]


@pytest.mark.parametrize("kind", ["image", "video", "speech"])
def test_batched_equals_one_at_a_time(tiny_model, char_tok, kind):
    """One left-padded batch (the evaluation path) == each item alone, prompts of different lengths included."""
    items = [item(tiny_model, char_tok, kind, p, seed=i) for i, p in enumerate(["it", "where?", "the square is"])]
    one = [generate_items(tiny_model, char_tok, [it], max_new_tokens=6)[0] for it in items]
    assert generate_items(tiny_model, char_tok, items, max_new_tokens=6) == one
    assert len(set(one)) > 1  # the rows read their own media


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_tower_with_fp32_parts(char_tok, dtype):
    """A 16-bit tower with fp32 parts (how adapters load) computes under autocast, every modality, mixed batch."""
    m = tiny.model()
    m.tower.to(dtype)
    items = [item(m, char_tok, k, "x", seed=i) for i, k in enumerate(["image", "video", "speech"])]
    out = generate_items(m, char_tok, items, max_new_tokens=3)
    assert len(out) == 3 and all(isinstance(t, str) for t in out)


def test_image_batch_with_none_one_and_two_images(tiny_model, char_tok):
    """Several images per sample and text-only samples in one batch (Llama 3.2 Vision's mask rule): the cached
    batch equals each sample recomputed step by step."""

    red, blue = Image.new("RGB", (40, 30), (200, 20, 20)), Image.new("RGB", (20, 50), (20, 20, 200))
    samples = Samples.of(tiny_model, char_tok, kinds=["image"])
    items = []
    for imgs, prompt in (([red], "a photo of"), ([], "text only prompt"), ([blue, blue], "two images:")):
        parts = [Part("image", ref=img) for img in imgs] + [Part("text", prompt)]
        items.append(samples.request([Message("user", parts)], conversation=False))
    got = generate_items(tiny_model, char_tok, items, max_new_tokens=6)
    want = [char_tok.decode(greedy_by_recompute(tiny_model, char_tok, it, 6)) for it in items]
    assert got == want


def test_a_chat_answer_streams_the_text_it_returns(tiny_model, char_tok):
    """adapters/chat.py's answer (mm-llama ask / chat, the web page's chat): the chunks given to on_text, as the
    tokens are decoded, make the answer it returns (whitespace runs joined) and change nothing in it."""
    args = argparse.Namespace(template="auto", prompt="", frames=8, language="English", max_new_tokens=6)
    args.__dict__ |= {"temperature": 0.0, "top_p": 1.0, "seed": None}
    samples = samples_for(tiny_model, char_tok, args)
    messages = [Message("user", [Part("image", ref=Image.new("RGB", (40, 30), (200, 20, 20))), Part("text", "it?")])]
    chunks: list[str] = []
    got = answer(tiny_model, char_tok, samples, messages, args, on_text=chunks.append)
    assert len(chunks) > 1 and " ".join("".join(chunks).split()) == got
    assert got == answer(tiny_model, char_tok, samples, messages, args)
