import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from mm_llama.assets import asset_path  # noqa: E402


@pytest.fixture(scope="session")
def smollm_path():
    return asset_path("smollm2_gguf")


@pytest.fixture(scope="session")
def smollm(smollm_path):
    from mm_llama.llama import load_pretrained

    return load_pretrained(smollm_path, dtype=torch.float32)


@pytest.fixture(scope="session")
def smollm_tok(smollm_path):
    from mm_llama.llama import Tokenizer

    return Tokenizer.from_pretrained(smollm_path)


@pytest.fixture(scope="session")
def llama3_tokenizer_dir():
    return asset_path("llama3_tokenizer_model").parent
