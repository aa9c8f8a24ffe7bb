"""GGUF dequantisation through our loader, and clear errors for bad checkpoints."""

import json

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf.quants import dequantize, quantize
from safetensors.torch import load_file, save_file

from mm_llama.llama import CheckpointError, RopeScaling, load_pretrained, save_meta
from mm_llama.llama.model import rope_inv_freq
from mm_llama.llama.slices import TowerRows
from tests import tiny

Q = gguf.GGMLQuantizationType
GGUF_NAMES = {
    "attention.wq": "attn_q",
    "attention.wk": "attn_k",
    "attention.wv": "attn_v",
    "attention.wo": "attn_output",
    "feed_forward.w1": "ffn_gate",
    "feed_forward.w2": "ffn_down",
    "feed_forward.w3": "ffn_up",
    "attention_norm": "attn_norm",
    "ffn_norm": "ffn_norm",
}


def to_gguf_name(key):
    if key == "tok_embeddings.weight":
        return "token_embd.weight"
    if key == "norm.weight":
        return "output_norm.weight"
    if key == "output.weight":
        return "output.weight"
    _, i, rest = key.split(".", 2)
    return f"blk.{i}.{GGUF_NAMES[rest.removesuffix('.weight')]}.weight"


def debug_model(**kw):
    return tiny.tower(**{"n_layers": 2, **kw})


def write_gguf(path, model, qtypes, extra_tensors=()):
    a = model.args
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(a.n_layers)
    w.add_embedding_length(a.dim)
    w.add_feed_forward_length(a.ffn_dim)
    w.add_head_count(a.n_heads)
    w.add_head_count_kv(a.n_kv_heads)
    w.add_rope_freq_base(a.rope_theta)
    w.add_layer_norm_rms_eps(a.norm_eps)
    w.add_context_length(a.max_seq_len)
    w.add_vocab_size(a.vocab_size)
    expected = {}
    sd = model.state_dict()
    for key, t in sd.items():
        if a.tie_embeddings and key == "output.weight":
            continue
        arr = t.numpy().astype(np.float32)
        qt = Q.F32 if arr.ndim == 1 else qtypes.get(key.split(".")[-2], Q.F32)
        if qt == Q.F32:
            w.add_tensor(to_gguf_name(key), arr)
            expected[key] = arr
        elif qt == Q.F16:
            w.add_tensor(to_gguf_name(key), arr.astype(np.float16))
            expected[key] = arr.astype(np.float16).astype(np.float32)
        else:
            qd = quantize(arr, qt)
            w.add_tensor(to_gguf_name(key), qd, raw_dtype=qt)
            expected[key] = dequantize(qd, qt).reshape(arr.shape)
    for name, arr, qt in extra_tensors:
        w.add_tensor(name, arr, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


QTYPES = {
    "tok_embeddings": Q.Q8_0,
    "output": Q.Q8_0,
    "wq": Q.Q4_0,
    "wk": Q.Q4_1,
    "wv": Q.Q8_0,
    "wo": Q.F16,
    "w1": Q.Q4_1,
    "w2": Q.Q4_0,
    "w3": Q.Q5_0,
}


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_quant_types_dequantise(tmp_path, tied):
    model = debug_model(tie_embeddings=tied)
    expected = write_gguf(tmp_path / "m.gguf", model, QTYPES)
    got = load_pretrained(tmp_path / "m.gguf")
    assert got.args.tie_embeddings == tied
    sd = got.state_dict()
    for key, arr in expected.items():
        assert torch.equal(sd[key], torch.from_numpy(arr)), key
    # quantisation really happened and stayed close
    err = (sd["layers.0.attention.wq.weight"] - model.layers[0].attention.wq.weight).abs().max()
    assert 0 < err < 0.05
    ref = debug_model(tie_embeddings=tied)
    ref.load_state_dict(sd)
    tokens = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        assert torch.equal(got(tokens), ref(tokens))


def test_gguf_llama3_rope_freqs_recovered(tmp_path):
    scaling = RopeScaling(factor=8.0)
    model = debug_model(rope_theta=500000.0, rope_scaling=scaling, dim=128, n_heads=2, n_kv_heads=1)
    hd = model.args.head_dim
    factors = (rope_inv_freq(hd, 500000.0) / rope_inv_freq(hd, 500000.0, scaling)).numpy().astype(np.float32)
    write_gguf(tmp_path / "m.gguf", model, {}, extra_tensors=[("rope_freqs.weight", factors, Q.F32)])
    got = load_pretrained(tmp_path / "m.gguf")
    assert got.args.rope_scaling == scaling
    tokens = torch.randint(0, 512, (1, 30))
    with torch.no_grad():
        assert torch.allclose(got(tokens), model(tokens), atol=1e-5)


def test_gguf_unsupported_quant_named(tmp_path):
    model = debug_model()
    qtypes = dict(QTYPES)
    write_gguf(tmp_path / "m.gguf", model, qtypes)
    # rewrite one tensor with a type we do not support (IQ4_NL)
    bad = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(str(bad), "llama")
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    for k, f in r.fields.items():
        if k.startswith("llama."):
            w.add_key_value(k, f.contents(), f.types[0])
    for t in r.tensors:
        if t.name == "blk.1.ffn_up.weight":
            nbytes = int(np.prod(t.shape)) // 32 * 18
            w.add_tensor(t.name, np.zeros((int(t.shape[1]), nbytes // int(t.shape[1])), np.uint8), raw_dtype=Q.IQ4_NL)
        else:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"bad\.gguf.*blk\.1\.ffn_up\.weight.*IQ4_NL"):
        load_pretrained(bad)


def test_gguf_wrong_arch(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="architecture 'gpt2'"):
        load_pretrained(tmp_path / "x.gguf")


def test_gguf_cut_short_names_the_tensor(tmp_path):
    """A GGUF file cut inside its tensor data: the tensor that runs past the end is named, nothing is read."""
    write_gguf(tmp_path / "m.gguf", debug_model(), QTYPES)
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"cut\.gguf: tensor '.*' ends at byte \d+, past the end"):
        load_pretrained(tmp_path / "cut.gguf")
    (tmp_path / "head.gguf").write_bytes(data[:200])
    with pytest.raises(CheckpointError, match=r"head\.gguf: GGUF header is damaged"):
        load_pretrained(tmp_path / "head.gguf")


@pytest.fixture()
def hf_dir(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf", safe_serialization=True)
    return tmp_path / "hf"


def test_unknown_format_and_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nothing")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_pretrained(tmp_path / "weights.bin")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_pretrained(tmp_path)


def test_hf_shape_mismatch_names_key_and_shapes(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatch for 'layers\.0\.feed_forward\.w\d\.weight': "
        r"checkpoint \((48, 32|32, 48)\) vs model \((64, 32|32, 64)\)",
    ):
        load_pretrained(hf_dir)


def test_hf_missing_and_unexpected_keys(hf_dir):
    f = hf_dir / "model.safetensors"
    sd = load_file(f)
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, f)
    with pytest.raises(CheckpointError, match=r"missing keys: layers\.1\.feed_forward\.w3\.weight"):
        load_pretrained(hf_dir)
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(48, 32)
    sd["model.layers.0.mlp.extra.weight"] = torch.zeros(3)
    save_file(sd, f)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*unexpected key 'model\.layers\.0\.mlp\.extra"):
        load_pretrained(hf_dir)


def test_hf_index_lists_missing_shard(hf_dir):
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00002.safetensors, which is missing"):
        load_pretrained(hf_dir)


def test_hf_unknown_rope_type(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    cfg.pop("rope_parameters", None)
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported rope scaling type 'yarn'"):
        load_pretrained(hf_dir)


def test_meta_errors(tmp_path):
    model = debug_model()
    save_meta(model, tmp_path / "m", model_parallel=2)
    params = json.loads((tmp_path / "m" / "params.json").read_text())
    (tmp_path / "m" / "params.json").write_text(json.dumps({**params, "n_expertz": 8}))
    with pytest.raises(CheckpointError, match=r"params\.json: unknown keys \['n_expertz'\]"):
        load_pretrained(tmp_path / "m")
    (tmp_path / "m" / "params.json").write_text(json.dumps(params))
    (tmp_path / "m" / "consolidated.01.pth").write_bytes(b"truncated garbage")
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth: cannot be read"):
        load_pretrained(tmp_path / "m")
    for f in (tmp_path / "m").glob("*.pth"):
        f.unlink()
    with pytest.raises(CheckpointError, match="no consolidated"):
        load_pretrained(tmp_path / "m")


def test_meta_refuses_pickled_objects(tmp_path):
    """weights_only=True: a checkpoint carrying arbitrary Python objects is rejected, never executed."""
    model = debug_model()
    save_meta(model, tmp_path / "m")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    sd = torch.load(tmp_path / "m" / "consolidated.00.pth", weights_only=True)
    sd["evil"] = Evil()
    torch.save(sd, tmp_path / "m" / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_pretrained(tmp_path / "m")


def test_meta_2shard_equals_1shard(tmp_path):
    model = debug_model()
    save_meta(model, tmp_path / "one")
    save_meta(model, tmp_path / "two", model_parallel=2)
    a, b = load_pretrained(tmp_path / "one"), load_pretrained(tmp_path / "two")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
        assert torch.equal(v, model.state_dict()[k]), k


def test_load_dtype_and_frozen(tmp_path):
    model = debug_model()
    save_meta(model, tmp_path / "m")
    m = load_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in m.parameters())
    assert m.inv_freq.dtype == torch.float32
    logits = m(torch.randint(0, 512, (1, 8)))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.parametrize("fmt", ["hf", "meta2"])
def test_rows_read_from_the_files_equal_the_loaded_tower(tmp_path, fmt):
    """Towers loaded shard by shard read rows [a, b) of each weight from the files (mm_llama/llama/slices.py):
    HF safetensors (q/k rows reordered from HF's rotary layout, ranges cutting through heads) and a Meta folder of
    two model-parallel parts (rows split across them, or columns): equal to the rows of the tower loaded whole."""
    if fmt == "hf":
        shape = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2)
        cfg = transformers.LlamaConfig(vocab_size=300, num_hidden_layers=2, tie_word_embeddings=False, **shape)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path, safe_serialization=True, max_shard_size="50KB")
    else:
        save_meta(tiny.tower(n_layers=2), tmp_path, model_parallel=2)
    whole = load_pretrained(tmp_path)
    rows = TowerRows(tmp_path)
    for name, p in whole.named_parameters():
        n = p.shape[0]
        for a, b in ((0, n), (3, n - 5), (n // 3, n // 3 + 7)):
            assert torch.equal(rows.rows(name, a, b).float(), p[a:b]), (name, a, b)
    rows.close()
