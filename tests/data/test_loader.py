"""Streaming loader: rank x worker splitting, fixed epochs, exact resume, bad-sample accounting."""

import io
import json
import tarfile

import pytest

from mm_llama.data.badsamples import DataError, SampleError
from mm_llama.data.loader import StreamingLoader


def write_text_shards(tmp_path, counts, bad=None):
    """Shards of text-only samples; `bad` = {(shard, index)} get an empty text."""
    bad = bad or set()
    entries = []
    for s, n in enumerate(counts):
        name = f"t-{s:03d}.tar"
        with tarfile.open(tmp_path / name, "w") as tf:
            for i in range(n):
                for ext, data in (("txt", b"" if (s, i) in bad else f"s{s} i{i}".encode()), ("json", b"{}")):
                    ti = tarfile.TarInfo(f"s{s:03d}_{i:04d}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
        entries.append({"url": name, "samples": n})
    (tmp_path / "index.json").write_text(json.dumps({"version": 1, "shards": entries}))
    return str(tmp_path / "index.json")


def key_and_epoch(raw):
    text = raw["txt"].decode()
    if not text:
        raise SampleError("empty_text", f"{raw['__shard__']}:{raw['__key__']}: empty text")
    return raw["__sid__"][0], raw["__key__"]


def collate(items):
    return items


@pytest.mark.parametrize("counts", [[5, 3, 7, 1, 4, 6, 2, 9], [11, 6]], ids=["shard_split", "sample_split"])
def test_two_ranks_two_workers_exactly_once_per_epoch(tmp_path, counts):
    index = write_text_shards(tmp_path, counts)
    every_key = {f"s{s:03d}_{i:04d}" for s, n in enumerate(counts) for i in range(n)}
    seen = []
    lens = []
    for rank in (0, 1):
        loader = StreamingLoader(
            index,
            map_fn=key_and_epoch,
            collate_fn=collate,
            batch_size=1,
            num_workers=2,
            shuffle_buffer=0,
            rank=rank,
            world_size=2,
            batches_per_epoch=40,
        )
        batches = list(loader)
        lens.append(len(batches))
        seen += [k for b in batches for (e, k) in b if e == 0]
    assert lens == [40, 40]
    assert sorted(seen) == sorted(every_key)  # each sample once in data-epoch 0 across 2 ranks x 2 workers


def test_equal_batches_per_rank_from_index(tmp_path):
    index = write_text_shards(tmp_path, [9, 1, 2, 13])
    lens = []
    for rank in (0, 1):
        loader = StreamingLoader(
            index, map_fn=key_and_epoch, batch_size=3, num_workers=2, rank=rank, world_size=2, shuffle_buffer=4
        )
        assert len(loader) == 25 // (2 * 3)
        lens.append([len(list(loader)) for _ in range(2)])
    assert lens == [[4, 4], [4, 4]]


def _run(index, n, state=None, **kw):
    loader = StreamingLoader(index, map_fn=key_and_epoch, collate_fn=collate, **kw)
    if state is not None:
        loader.load_state_dict(json.loads(json.dumps(state)))  # through JSON: the state must serialise
    out = []
    while len(out) < n:
        for b in loader:
            out.append([k for _, k in b])
            if len(out) == n:
                break
    return out, loader.state_dict()


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("bucketed", [False, True])
def test_exact_resume(tmp_path, workers, bucketed):
    index = write_text_shards(tmp_path, [7, 5, 9, 4])
    kw = dict(batch_size=2, num_workers=workers, shuffle_buffer=6, seed=3, batches_per_epoch=5, rank=0, world_size=1)
    if bucketed:
        kw.update(length_fn=lambda item: len(item[1]) + hash(item[1][-1]) % 3, bucket_batches=3)
    full, _ = _run(index, 13, **kw)
    for k in (3, 5, 8):  # inside an epoch, at an epoch boundary, after one
        first, state = _run(index, k, **kw)
        rest, _ = _run(index, 13 - k, state=state, **kw)
        assert first + rest == full, f"resume after {k} batches"
    assert len({x for b in full for x in b}) > 10  # really shuffled data, not a constant


def test_resume_state_checks_layout(tmp_path):
    index = write_text_shards(tmp_path, [4, 4])
    _, state = _run(index, 2, batch_size=1, num_workers=0, batches_per_epoch=3, rank=0, world_size=1)
    loader = StreamingLoader(
        index, map_fn=key_and_epoch, batch_size=1, num_workers=2, batches_per_epoch=3, rank=0, world_size=1
    )
    with pytest.raises(ValueError, match="num_workers=0"):
        loader.load_state_dict(state)


def test_bad_samples_counted_and_limited(tmp_path):
    bad = {(0, 1), (1, 0), (2, 2)}
    index = write_text_shards(tmp_path, [10, 10, 10], bad=bad)
    loader = StreamingLoader(
        index,
        map_fn=key_and_epoch,
        batch_size=2,
        num_workers=0,
        batches_per_epoch=10,
        rank=0,
        world_size=1,
        max_bad_fraction=0.5,
        shuffle_buffer=0,
    )
    batches = list(loader)
    keys = [k for b in batches for _, k in b]
    assert len(keys) == 20 and "s000_0001" not in keys
    m = loader.metrics()
    assert m["bad_samples"] >= 1 and m["bad_reasons"]["empty_text"] == m["bad_samples"]
    strict = StreamingLoader(
        index,
        map_fn=key_and_epoch,
        batch_size=2,
        num_workers=0,
        batches_per_epoch=10,
        rank=0,
        world_size=1,
        max_bad_fraction=0.01,
        min_samples_for_limit=5,
    )
    with pytest.raises(DataError, match=r"empty_text in .*t-00\d\.tar key s00\d_000\d"):
        list(strict)


def test_truncated_shard_skipped_with_rest_delivered(tmp_path):
    index = write_text_shards(tmp_path, [6, 6])
    p = tmp_path / "t-001.tar"
    p.write_bytes(p.read_bytes()[:2000])
    loader = StreamingLoader(
        index,
        map_fn=key_and_epoch,
        batch_size=1,
        num_workers=0,
        batches_per_epoch=8,
        rank=0,
        world_size=1,
        shuffle_buffer=0,
        max_bad_fraction=0.5,
    )
    keys = [k for b in loader for _, k in b]
    assert keys[:6] == [f"s000_{i:04d}" for i in range(6)]
    assert loader.metrics()["bad_reasons"].get("truncated_tar", 0) >= 1


def test_batches_per_epoch_required_without_index(tmp_path):
    write_text_shards(tmp_path, [2])
    with pytest.raises(ValueError, match="batches_per_epoch"):
        StreamingLoader(str(tmp_path / "t-000.tar"), map_fn=key_and_epoch, batch_size=1)


def sources(tmp_path) -> list[str]:
    out = []
    for k, counts in enumerate(([6, 5], [4], [3, 3, 2])):
        (tmp_path / f"src{k}").mkdir()
        out.append(write_text_shards(tmp_path / f"src{k}", counts))
    return out


def source_and_key(raw):
    return raw["__src__"], raw["__key__"]


@pytest.mark.parametrize("workers", [0, 2])
def test_sources_mix_by_weight_and_resume_exactly(tmp_path, workers):
    idx = sources(tmp_path)
    kw = dict(batch_size=4, num_workers=workers, shuffle_buffer=5, seed=1, batches_per_epoch=500, rank=0, world_size=1)
    loader = StreamingLoader(idx, map_fn=source_and_key, weights=[2, 1, 1], **kw)
    drawn = [s for _, b in zip(range(500), loader) for s, _ in b]
    share = [drawn.count(k) / len(drawn) for k in range(3)]
    assert abs(share[0] - 0.5) < 0.04 and abs(share[1] - 0.25) < 0.04 and abs(share[2] - 0.25) < 0.04
    assert loader.metrics()["source_samples"] == [drawn.count(k) for k in range(3)]

    def run(n, state=None):
        ld = StreamingLoader(idx, map_fn=source_and_key, weights=[2, 1, 1], **{**kw, "batches_per_epoch": 7})
        if state is not None:
            ld.load_state_dict(json.loads(json.dumps(state)))
        out = []
        while len(out) < n:
            for b in ld:
                out.append(b)
                if len(out) == n:
                    break
        return out, ld.state_dict(), ld.metrics()["source_samples"]

    full, _, counts = run(12)
    first, state, _ = run(5)
    rest, _, counts_after = run(7, state)
    assert first + rest == full and counts_after == counts
    other = StreamingLoader(idx[:2], map_fn=source_and_key, weights=[1, 1], **kw)
    with pytest.raises(ValueError, match="3 data sources, this run has 2"):
        other.load_state_dict(state)


def _global_batches(index, steps, layout, state_per_rank=None, **kw):
    """`steps` global batches of a run laid out as (world, batch_size, grad_accum, workers): per step the set of
    sample keys all ranks' micro-batches hold, and every rank's state after the last step."""
    world, bs, accum, workers = layout
    loaders = []
    for r in range(world):
        opts = dict(batch_size=bs, num_workers=workers, batches_per_epoch=10**6, split="interleave")
        loader = StreamingLoader(index, map_fn=key_and_epoch, rank=r, world_size=world, **opts, **kw)
        if state_per_rank is not None:
            loader.load_state_dicts(state_per_rank)
        loaders.append((loader, iter(loader)))
    out = []
    for _ in range(steps):
        out.append(sorted(k for _, it in loaders for _ in range(accum) for _, k in next(it)))
    return out, [loader.state_dict() for loader, _ in loaders]


@pytest.mark.parametrize("workers", [0, 2])
def test_global_stream_is_the_same_on_any_layout_and_resumes_across_them(tmp_path, workers):
    """split=interleave: the stream is one sequence whatever the world size, batch size, accumulation and worker
    count; a state saved by one layout resumes on another with the same global batch (elastic resume)."""
    index = write_text_shards(tmp_path, [7, 5, 9, 4])
    kw = dict(shuffle_buffer=5, seed=3)
    layouts = [(1, 4, 1, workers), (2, 2, 1, workers), (4, 1, 1, 0), (1, 2, 2, workers), (2, 1, 2, 0)]
    full, _ = _global_batches(index, 9, layouts[0], **kw)
    assert len({k for b in full for k in b}) > 20
    for layout in layouts[1:]:
        assert _global_batches(index, 9, layout, **kw)[0] == full, layout
    for a, b in [(layouts[1], layouts[0]), (layouts[0], layouts[1]), (layouts[2], layouts[3])]:
        first, states = _global_batches(index, 4, a, **kw)
        rest, _ = _global_batches(index, 5, b, state_per_rank=states, **kw)
        assert first + rest == full, (a, b)
    _, states = _global_batches(index, 3, (1, 2, 1, 0), **kw)  # 6 samples: not a whole number of rounds of 4
    with pytest.raises(ValueError, match="global batch"):
        _global_batches(index, 1, (1, 4, 1, 0), state_per_rank=states, **kw)
    _, states = _global_batches(index, 1, (2, 2, 1, 0))
    loader = StreamingLoader(index, map_fn=key_and_epoch, batch_size=4, batches_per_epoch=9, rank=0, world_size=1)
    with pytest.raises(ValueError, match="saved by 2 ranks"):
        loader.load_state_dicts([{**st, "split": "shards"} for st in states])
