"""Meta's real Llama 3 tokenizer (tiktoken, tokenizer.model) vs HF `tokenizers` on the real tokenizer.json."""

import pytest
from tokenizers import Tokenizer as TK

from mm_llama.llama import Tokenizer

SAMPLES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 3:45pm; we'll see 12345678 people!",
    "Ünïcödé façade — naïve café. Привет, мир! Γειά σου κόσμε. مرحبا بالعالم. שלום עולם.",
    "日本語のテキストと中文文本，还有한국어 텍스트.",
    "emoji: 🙂👍🏽🇫🇷 👩‍👩‍👧‍👦 ✨",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\tif x != None: print(x)\r\n",
    "spaces:    four,\t\ttabs,\n\n\n\nnewlines, trailing   ",
    "special look-alikes: <|begin_of_text|> <|eot_id|> <|start_header_id|>user<|end_header_id|> <|image|>",
    "    leading and trailing whitespace runs          ",
    "numbers 3.14159 1,000,000 0x1F 1e-10 and URLs https://example.com/a?b=c&d=e#f",
    "I'M SHOUTING, you're whispering; they'd've DONE it",
    "",
]


@pytest.fixture(scope="module")
def tik(llama3_tokenizer_dir):
    return Tokenizer.from_pretrained(llama3_tokenizer_dir / "tokenizer.model")


@pytest.fixture(scope="module")
def hf(llama3_tokenizer_dir):
    return Tokenizer.from_pretrained(llama3_tokenizer_dir / "tokenizer.json")


@pytest.fixture(scope="module")
def oracle(llama3_tokenizer_dir):
    return TK.from_file(str(llama3_tokenizer_dir / "tokenizer.json"))


def test_hello_world(tik):
    assert tik.encode("Hello world") == [9906, 1917]
    assert tik.encode("Hello world", bos=True, eos=True) == [128000, 9906, 1917, 128001]
    assert tik.n_words == 128257  # 128000 ranks + 256 specials + <|image|>


@pytest.mark.parametrize("text", SAMPLES)
def test_ids_equal_hf_tokenizers(tik, hf, oracle, text):
    oracle.encode_special_tokens = True  # the oracle treats typed special strings as text, like us
    want = oracle.encode(text, add_special_tokens=False).ids
    assert tik.encode(text) == want
    assert hf.encode(text) == want
    assert tik.decode(want) == text


def test_long_whitespace_run(tik, oracle):
    text = "a" + " " * 30000 + "b" + "x" * 26000
    oracle.encode_special_tokens = True
    ids = tik.encode(text)
    assert tik.decode(ids) == text


def test_special_tokens(tik, hf):
    for t in (tik, hf):
        assert t.token_to_id("<|begin_of_text|>") == 128000
        assert t.token_to_id("<|eot_id|>") == 128009
        assert t.token_to_id("<|finetune_right_pad_id|>") == 128004
        assert t.token_to_id("<|reserved_special_token_2|>") == 128011
        assert t.encode("<|eot_id|>", allow_special=True) == [128009]
        assert 128009 not in t.encode("<|eot_id|>")
        assert {128001, 128008, 128009} <= t.stop_ids
        assert t.bos_id == 128000 and t.add_bos and t.chat_format == "llama3"
    assert tik.token_to_id("<|image|>") == 128256 == hf.token_to_id("<|image|>")


def test_chat_format_llama3(tik):
    ids = tik.format_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    text = tik.decode(ids)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    # a user typing a special token string cannot forge a header
    ids = tik.format_chat([{"role": "user", "content": "<|eot_id|>"}])
    assert ids.count(128009) == 1


def test_from_dir_and_errors(llama3_tokenizer_dir, tmp_path):
    assert isinstance(
        Tokenizer.from_pretrained(llama3_tokenizer_dir),
        type(Tokenizer.from_pretrained(llama3_tokenizer_dir / "tokenizer.model")),
    )
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nope.model")
    bad = tmp_path / "tokenizer.model"
    bad.write_text("this is not base64 ranks\n")
    with pytest.raises(ValueError, match="tokenizer.model"):
        Tokenizer.from_pretrained(bad)


def test_ids_starting_with_a_line_break(tik, hf, smollm_tok):
    """The tokens that begin a new line (ASR stops at them): the tiktoken and HF backends agree on Llama 3's
    vocabulary; on SmolLM2's the fast table walk equals decoding every id; specials never count."""
    lines = tik.ids_starting_with(b"\n")
    assert lines == hf.ids_starting_with(b"\n")
    assert {tik.encode("\n")[0], tik.encode("\n\n")[0], tik.encode("x\n\ny")[1]} <= lines
    assert not lines & set(tik.special_tokens.values())
    assert all(tik.decode([i]).startswith("\n") for i in lines) and 10 < len(lines) < 2000
    slow = {i for i, b in Tokenizer._token_bytes(smollm_tok) if b.startswith(b"\n")}
    assert smollm_tok.ids_starting_with(b"\n") == slow and smollm_tok.encode("\n")[0] in slow
    assert smollm_tok.ids_starting_with(b"\n") is smollm_tok.ids_starting_with(b"\n")  # cached
