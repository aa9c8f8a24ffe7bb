"""Conversations rendered with the tower's chat format (Llama 3 headers on Meta's real tokenizer, ChatML on
SmolLM2's), media spliced where their parts stand, loss on the assistant turns only by default."""

import pytest

from mm_llama.data.badsamples import SampleError
from mm_llama.data.collate import IGNORE_INDEX
from mm_llama.data.conversation import Message, Part, parse_messages, render, show
from mm_llama.llama import Tokenizer

IMG = 128256  # Llama 3.2 Vision's <|image|>


@pytest.fixture(scope="module")
def llama3_tok(llama3_tokenizer_dir):
    return Tokenizer.from_pretrained(llama3_tokenizer_dir / "tokenizer.model")


def splice_image(part):
    return [IMG], part.ref


def chat(*turns):
    return [Message(role, parts if isinstance(parts, list) else [Part("text", parts)]) for role, parts in turns]


def test_text_only_prompt_equals_the_tokenizers_chat_format(llama3_tok, smollm_tok):
    msgs = chat(("system", "Be brief."), ("user", "  Hi there  "))
    as_json = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Hi there  "}]
    for tok in (llama3_tok, smollm_tok):
        r = render(msgs, tok, tok.chat_format, splice_image, add_generation_prompt=True)
        assert r.input_ids == tok.format_chat(as_json)


def test_llama3_layout_with_an_image_and_assistant_loss(llama3_tok):
    msgs = chat(
        ("user", [Part("image", ref="pixels", name="cat.jpg"), Part("text", "What is it?")]), ("assistant", "A cat.")
    )
    r = render(msgs, llama3_tok, "llama3", splice_image)
    text = llama3_tok.decode([t for t in r.input_ids if t != IMG])
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is it?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA cat.<|eot_id|>"
    )
    # Llama 3.2 Vision's layout: <|image|> right after the header's blank line, before the text
    at = r.input_ids.index(IMG)
    assert llama3_tok.decode(r.input_ids[:at]).endswith("<|end_header_id|>\n\n") and r.media == [("image", "pixels")]
    learned = [t for t, lab in zip(r.input_ids, r.labels) if lab != IGNORE_INDEX]
    assert llama3_tok.decode(learned) == "A cat.<|eot_id|>"
    assert show(r, llama3_tok).endswith("<|end_header_id|>\n\n[[A cat.<|eot_id|>]]")
    assert "<image:cat.jpg>What is it?" in show(r, llama3_tok)


def test_train_on_last_and_all(smollm_tok):
    msgs = chat(("user", "one"), ("assistant", "first"), ("user", "two"), ("assistant", "second"))
    learned = {}
    for mode in ("assistant", "last", "all"):
        r = render(msgs, smollm_tok, "chatml", splice_image, train_on=mode)
        learned[mode] = smollm_tok.decode([t for t, lab in zip(r.input_ids, r.labels) if lab != IGNORE_INDEX])
    assert learned["assistant"] == "first<|im_end|>second<|im_end|>"
    assert learned["last"] == "second<|im_end|>"
    assert learned["all"] == smollm_tok.decode(r.input_ids)


def test_media_anywhere_in_any_turn(smollm_tok):
    a, b, c = (Part("image", ref=i, name=f"{i}.png") for i in "abc")
    msgs = chat(("user", [Part("text", "Compare "), a, Part("text", " and "), b]), ("assistant", "Same."))
    msgs += chat(("user", [c]), ("assistant", "Different."))
    r = render(msgs, smollm_tok, "chatml", splice_image)
    assert [p for _, p in r.media] == ["a", "b", "c"]
    assert [r.input_ids[s] for s, _, _ in r.spans] == [IMG] * 3
    shown = show(r, smollm_tok)
    assert "<|im_start|>user\nCompare <image:a.png> and <image:b.png><|im_end|>" in shown
    assert "<|im_start|>user\n<image:c.png><|im_end|>" in shown and "[[Different.<|im_end|>]]" in shown


def test_plain_template_is_the_caption_layout(smollm_tok):
    """A caption sample rendered plain: [BOS] <|image|> PROMPT, then ` caption` + EOS learned (the layout every
    caption/transcript recipe has trained on)."""
    msgs = chat(("user", [Part("image", ref="x"), Part("text", "Describe")]), ("assistant", " a red square "))
    r = render(msgs, smollm_tok, "plain", splice_image, max_text_tokens=2)
    bos = [smollm_tok.bos_id] if smollm_tok.add_bos else []
    target = smollm_tok.encode(" a red square")[:2] + [smollm_tok.eos_id]
    assert r.input_ids == bos + [IMG] + smollm_tok.encode("Describe") + target
    assert r.labels == [IGNORE_INDEX] * (len(r.input_ids) - len(target)) + target


def test_bad_conversations_name_the_place():
    with pytest.raises(SampleError, match="f.jsonl:3: message 1: unknown role 'robot'"):
        parse_messages({"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}, "f.jsonl:3")
    with pytest.raises(SampleError, match="no assistant message"):
        parse_messages({"messages": [{"role": "user", "content": "x"}]}, "f:1")
    with pytest.raises(SampleError, match="unknown part type 'smell'"):
        parse_messages({"messages": [{"role": "user", "content": [{"type": "smell"}]}]}, "f:1")
    with pytest.raises(SampleError, match="image part names no file"):
        parse_messages({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, "f:1")
    got = parse_messages(
        {
            "messages": [
                {"role": "user", "content": [{"type": "image", "path": "a.jpg"}]},
                {"role": "assistant", "content": "ok"},
            ]
        },
        "f:1",
    )
    assert got[0].parts == [Part("image", ref="a.jpg", name="a.jpg")] and got[1].text == "ok"
