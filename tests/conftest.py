"""Shared fixtures. Session-scoped models are shared by many tests: a test that trains or edits one takes a fresh
copy from tests/tiny.py instead."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from mm_llama.adapters.composed import ComposedModel  # noqa: E402
from mm_llama.assets import asset_path  # noqa: E402
from mm_llama.llama import Tokenizer, load_pretrained  # noqa: E402
from tests import tiny  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs 2 workers on 2 cores: one compute thread each
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm_path():
    return asset_path("smollm2_gguf")


@pytest.fixture(scope="session")
def smollm(smollm_path):
    return load_pretrained(smollm_path, dtype=torch.float32)


@pytest.fixture(scope="session")
def smollm_tok(smollm_path):
    return Tokenizer.from_pretrained(smollm_path)


@pytest.fixture(scope="session")
def llama3_tokenizer_dir():
    return asset_path("llama3_tokenizer_model").parent


@pytest.fixture(scope="session")
def tiny_tower():
    """The debug tower with 16 layers (read-only: take tests.tiny.tower() to change one)."""
    return tiny.tower()


@pytest.fixture(scope="session")
def tiny_parts(tiny_tower):
    """image, video and speech parts on `tiny_tower`, gates open (read-only)."""
    return tiny.parts(tiny_tower)


@pytest.fixture(scope="session")
def tiny_model(tiny_tower, tiny_parts):
    """All three parts composed on the tiny tower (read-only)."""
    return ComposedModel(tiny_tower, tiny_parts).eval()


@pytest.fixture(scope="session")
def char_tok():
    return tiny.CharTok()


@pytest.fixture(scope="session")
def hf_mllama_folder(tmp_path_factory):
    """(folder, transformers model) of a tiny random Mllama: 6 text layers with cross-attention at 1 and 4."""
    folder = tmp_path_factory.mktemp("hf_mllama")
    return folder, tiny.hf_mllama(folder)


def pytest_collection_modifyitems(config, items):
    """The longest file, the reduced demo (one shared run of every stage), first: `make test`'s two workers
    (`--dist loadfile`) then overlap it with everything else instead of starting it last."""
    items.sort(key=lambda item: not item.nodeid.startswith("tests/integration/test_demo.py"))
