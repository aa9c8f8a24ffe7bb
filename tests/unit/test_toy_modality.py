"""A fourth modality from this file alone: a fixed-length float vector (a `.vec` file) projected to rows spliced into
the sequence. It goes through every generic path (shards, the training recipe and its trainer, the adapter file,
loading, answering a file) with no edit anywhere else: the plug-in contract is complete."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from mm_llama.adapters.describe import describe
from mm_llama.adapters.files import load_composed
from mm_llama.adapters.image import init_token_rows
from mm_llama.adapters.modality import (
    DataHooks,
    EvalHooks,
    InferenceHooks,
    Modality,
    PartHooks,
    decode_member,
)
from mm_llama.adapters.registry import register, token_rows, unregister
from mm_llama.adapters.samples import plain_requests
from mm_llama.data.badsamples import SampleError
from mm_llama.data.media import Medium, register_medium, unregister_medium
from mm_llama.data.writer import manifest_samples, write_shards
from mm_llama.llama import Tokenizer
from mm_llama.text import normalize_text
from recipes.train import build_tower, load_train_config, trainer_for

K = 16  # floats per vector


def decode_vector(data: bytes, name: str, ext: str = "vec") -> torch.Tensor:
    arr = np.frombuffer(data, dtype="<f4") if len(data) == 4 * K else None
    if arr is None or not np.isfinite(arr).all():
        raise SampleError("decode_vector", f"{name}: not {K} finite little-endian float32 values")
    return torch.from_numpy(arr.copy())


VECTOR = Medium("vector", ("vec",), decode_vector)


@dataclasses.dataclass
class VectorConfig:
    rows: int = 2  # rows each vector becomes


class VectorPart(nn.Module):
    def __init__(self, dim: int, rows: int):
        super().__init__()
        self.rows = rows
        self.proj = nn.Linear(K, rows * dim)
        self.learnable_embedding = nn.Embedding(1, dim)  # <|vector|>, each of its placeholders replaced

    def forward(self, vectors_BK: torch.Tensor) -> torch.Tensor:
        return self.proj(vectors_BK).view(vectors_BK.shape[0], self.rows, -1)


def build(tower, cfg, parts):
    part = VectorPart(tower.args.dim, cfg.vector.rows)
    init_token_rows(part.learnable_embedding, tower.tok_embeddings.weight)
    return part


def prepare(model, input_ids, inputs, cache_kv):
    vectors = inputs.get("vectors")
    if vectors is None or all(v is None for v in vectors):
        return None
    live = [b for b, v in enumerate(vectors) if v is not None]
    rows = model.vector(torch.stack([vectors[b] for b in live]).to(model.tok_embeddings.weight.device))
    return {b: r for b, r in zip(live, rows, strict=True)}


def input_rows(model, h, input_ids, state):
    h = h.clone()
    for b, rows in state.items():
        where = (input_ids[b] == model.token_id("vector")).nonzero().squeeze(-1)
        h[b, where] = rows.to(h.dtype)
    return h


class VectorMedia:
    """A vector part -> `rows` `<|vector|>` ids (each replaced by one projected row) + the vector."""

    def __init__(self, token_id: int, rows: int):
        self.token_id, self.rows = token_id, rows

    def decode(self, data: bytes, name: str, ext: str) -> torch.Tensor:
        return decode_vector(data, name)

    def plain(self, raw: dict, ext: str) -> torch.Tensor:
        return decode_member(raw, VECTOR)

    def splice(self, vector: torch.Tensor):
        return [self.token_id] * self.rows, vector


def media(model, tok, opts, cfg=None):
    return VectorMedia(model.token_id("vector"), model.vector.rows)


def collate(items: list[dict]) -> dict:
    if not any(it.get("vector") for it in items):
        return {}
    return {"vectors": [it["vector"][0] if it.get("vector") else None for it in items]}


def exact_match(refs: list[str], hyps: list[str]) -> dict:
    return {"exact": float(np.mean([normalize_text(r) == normalize_text(h) for r, h in zip(refs, hyps)]))}


def requests(model, tok, data, name, ext, opts):
    return plain_requests(model, tok, "vector", [decode_vector(data, name)], name, opts), None


TOY = Modality(
    name="vector",
    format="tests.vector_adapter.v1",
    rows=1,
    part=PartHooks(
        Config=VectorConfig,
        build=build,
        meta=lambda part: {"rows": part.rows},
        from_meta=lambda tower, meta, parts, source: VectorPart(tower.args.dim, meta["rows"]),
        row_table=lambda parts: (parts["vector"].learnable_embedding, 0),
        inputs=("vectors",),
        prepare=prepare,
        input_rows=input_rows,
        step_state=lambda state, start, n: state if start == 0 else None,
    ),
    data=DataHooks(medium=VECTOR, media=media, turn=lambda part, opts: [part], collate=collate),
    inference=InferenceHooks(what="description", requests=requests),
    evaluation=EvalHooks(metrics=exact_match),
)


@pytest.fixture()
def toy():
    register_medium(VECTOR)
    register(TOY)
    yield TOY
    unregister("vector")
    unregister_medium("vector")


def vector_bytes(seed: int) -> bytes:
    return np.random.default_rng(seed).standard_normal(K).astype("<f4").tobytes()


def test_a_toy_fourth_modality_trains_saves_loads_and_answers(toy, tmp_path, smollm_path):
    assert token_rows()["vector"] == (10, 1)  # after image (8), video (1), speech (1)
    manifest = tmp_path / "manifest.jsonl"
    with manifest.open("w") as f:
        for i in range(8):
            (tmp_path / f"v{i}.vec").write_bytes(vector_bytes(i))
            f.write(json.dumps({"vector": f"v{i}.vec", "text": f"vector number {i % 2}"}) + "\n")
    rep = write_shards(manifest_samples(manifest), tmp_path / "shards", progress=False)
    assert rep.written == 8 and not rep.skipped
    cfg = load_train_config(
        None,
        [
            f"run_dir={tmp_path / 'run'}",
            "steps=2",
            "ckpt_every=2",
            "tower.vocab_size=49152",
            "model.modality=vector",
            "model.tokenizer=asset:smollm2_gguf",
            "model.vector.rows=3",
            f"data.train={tmp_path / 'shards/index.json'}",
            "data.batch_size=4",
            "tensorboard=false",
        ],
    )
    losses = trainer_for(cfg).run()
    assert len(losses) == 2 and all(np.isfinite(losses))
    adapter = tmp_path / "run/adapter.safetensors"
    model = load_composed(build_tower(cfg), [adapter])  # the same seeded debug tower the run trained on
    assert model.modalities == ["vector"] and model.vector.rows == 3
    tok = Tokenizer.from_pretrained(smollm_path)
    answer = describe(model, tok, "query.vec", vector_bytes(0), max_new_tokens=3)
    assert answer.kind == "vector" and isinstance(answer.text, str)
    with pytest.raises(SampleError, match="bad.vec: not 16"):
        describe(model, tok, "bad.vec", b"1234", max_new_tokens=3)
