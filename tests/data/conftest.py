from pathlib import Path

import pytest

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "shards"


@pytest.fixture(scope="session")
def shard_dir():
    return ASSETS
