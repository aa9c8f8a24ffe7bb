"""Several media of every kind in one conversation, through the one composed forward: every medium is read where
it stands and is invisible before it (the logits of a prefix equal those of the conversation cut there), a batch
mixes samples with and without each medium, and generation equals recomputation."""

import torch
from PIL import Image

from mm_llama.adapters.generation import Collate, generate_items
from mm_llama.adapters.samples import SampleOptions, Samples
from mm_llama.data.collate import IGNORE_INDEX, segment_positions
from mm_llama.data.conversation import Message, Part
from mm_llama.llama.model import Documents
from tests import tiny


def media():
    red, blue = Image.new("RGB", (40, 30), (200, 20, 20)), Image.new("RGB", (20, 50), (20, 20, 200))
    g = torch.Generator().manual_seed(0)
    wave_a, wave_b = torch.randn(4000, generator=g) * 0.1, torch.randn(5600, generator=g) * 0.1
    clip_a = (torch.rand(8, 3, 28, 28, generator=g) * 255).to(torch.uint8)
    clip_b = (torch.rand(8, 3, 28, 28, generator=g) * 255).to(torch.uint8)
    return red, blue, wave_a, wave_b, clip_a, clip_b


def conversation():
    red, blue, wave_a, wave_b, clip_a, clip_b = media()
    return [
        Message("system", [Part("text", "sys")]),
        Message(
            "user", [Part("image", ref=red), Part("text", "and"), Part("audio", ref=wave_a), Part("video", ref=clip_a)]
        ),
        Message("assistant", [Part("text", "one")]),
        Message(
            "user", [Part("video", ref=clip_b), Part("image", ref=blue), Part("audio", ref=wave_b), Part("text", "?")]
        ),
        Message("assistant", [Part("text", "two")]),
    ]


def batch_of(model, items):
    return {k: v for k, v in Collate(model.kinds)(items).items() if k != "labels"}


def test_every_medium_is_read_where_it_stands(tiny_model, char_tok):
    samples = Samples.of(tiny_model, char_tok, answer=None)
    msgs = conversation()
    item, r = samples.render(msgs, conversation=True)
    assert [k for k, _ in r.media] == ["image", "audio", "video", "video", "image", "audio"]
    assert len(item["image"]) == 2 and len(item["video"]) == 2 and len(item["speech"]) == 2
    # the learned tokens: both assistant turns and their end-of-turn tokens, nothing else
    learned = [t for t, lab in zip(r.input_ids, r.labels) if lab != IGNORE_INDEX]
    assert learned == char_tok.encode("one") + [411] + char_tok.encode("two") + [411]
    with torch.no_grad():
        full = tiny_model(**batch_of(tiny_model, [item])).logits[0]
        # cut right before the second turn's media: the same logits as the first turn alone
        first = samples.render(msgs[:3], conversation=True)[0]
        n = len(first["input_ids"])
        assert full.shape[0] > n
        alone = tiny_model(**batch_of(tiny_model, [first])).logits[0]
        torch.testing.assert_close(full[:n], alone, rtol=1e-5, atol=1e-5)
        # the second turn's media change what comes after them
        swapped = conversation()
        swapped[3].parts[0] = Part("video", ref=media()[4])
        other = tiny_model(**batch_of(tiny_model, [samples.render(swapped, conversation=True)[0]])).logits[0]
        assert torch.equal(other[:n], full[:n]) and not torch.allclose(other[n:], full[n:])


def test_mixed_batch_equals_each_sample_alone(tiny_model, char_tok):
    samples = Samples.of(tiny_model, char_tok, options=SampleOptions(train_on="all"))
    red, _, wave_a, _, clip_a, _ = media()
    convs = [
        conversation(),
        [Message("user", [Part("text", "text only")]), Message("assistant", [Part("text", "yes")])],
        [Message("user", [Part("audio", ref=wave_a)]), Message("assistant", [Part("text", "heard")])],
        [
            Message("user", [Part("video", ref=clip_a), Part("image", ref=red)]),
            Message("assistant", [Part("text", "x")]),
        ],
    ]
    items = [samples.render(c, conversation=True)[0] for c in convs]
    with torch.no_grad():
        together = tiny_model(**batch_of(tiny_model, items)).logits
        for b, it in enumerate(items):
            alone = tiny_model(**batch_of(tiny_model, [it])).logits[0]
            n = len(it["input_ids"])
            torch.testing.assert_close(together[b, :n], alone, rtol=1e-4, atol=1e-4)
        # a text-only conversation equals the bare tower exactly
        bare = tiny_model.tower(torch.tensor([items[1]["input_ids"]]))
        assert torch.equal(tiny_model(**batch_of(tiny_model, [items[1]])).logits, bare)


def test_answering_a_conversation_equals_recompute(tiny_model, char_tok):
    samples = Samples.of(tiny_model, char_tok)
    request = samples.request(conversation()[:4])
    got = generate_items(tiny_model, char_tok, [request], max_new_tokens=4)[0]
    seq = list(request["input_ids"])
    inputs = Collate(tiny_model.kinds).inputs([request])
    with torch.no_grad():
        for _ in range(4):
            seq.append(int(tiny_model(torch.tensor([seq]), **inputs).logits[0, -1].argmax()))
    assert got == char_tok.decode(seq[len(request["input_ids"]) :])
    opening = [tiny.CharTok.special_tokens["<|im_start|>"], *char_tok.encode("assistant\n")]
    assert request["input_ids"][-len(opening) :] == opening  # ends with an open assistant turn


def test_per_document_attention_equals_a_block_diagonal_mask(tiny_tower):
    """The packed layout's attention (each document on its own) == one dense block-diagonal causal mask."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 400, (2, 12), generator=g)
    spans = [[(0, 5), (5, 9)], [(0, 12)]]
    seg = torch.full((2, 12), -1)
    for b, row in enumerate(spans):
        for s, (a, e) in enumerate(row):
            seg[b, a:e] = s
    dense = (seg[:, :, None] == seg[:, None, :]) & torch.ones(12, 12, dtype=torch.bool).tril()
    pos = segment_positions(seg)
    with torch.no_grad():
        want = tiny_tower(ids, positions=pos, mask=dense[:, None])
        got = tiny_tower(ids, positions=pos, mask=Documents(spans))
    real = seg >= 0
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    # a document alone gives the same logits as inside its packed row
    alone = tiny_tower(ids[:1, 5:9])[0]
    torch.testing.assert_close(got[0, 5:9], alone, rtol=1e-5, atol=1e-5)
