"""The chat's pieces that need no model: the upload store (random ids, its own folder, bounded, least recently used
out first) and the checks of a conversation body."""

import json

import pytest

from mm_llama.adapters.serve_chat import MEDIA_ID, HttpError, MediaStore, parse_chat


def add(store: MediaStore, data: bytes, name: str = "a.png") -> str:
    mid, path = store.reserve()
    path.write_bytes(data)
    store.add(mid, name, "image", path)
    return mid


def test_store_ids_are_random_and_files_stay_in_its_folder(tmp_path):
    store = MediaStore(tmp_path, max_files=8, max_bytes=1000)
    ids = [add(store, b"x", "../../evil.png") for _ in range(3)]
    assert len(set(ids)) == 3 and all(MEDIA_ID.fullmatch(i) for i in ids)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(ids)  # named by id, never by the client
    assert store.read(ids[0]) == ("../../evil.png", b"x")


def test_store_drops_the_least_recently_used(tmp_path):
    store = MediaStore(tmp_path, max_files=2, max_bytes=10)
    a, b = add(store, b"aaa"), add(store, b"bbb")
    store.read(a)  # a is used: b is now the oldest
    c = add(store, b"ccc")
    assert len(store) == 2 and not (tmp_path / b).exists()
    with pytest.raises(HttpError) as e:
        store.read(b)
    assert e.value.code == 422 and b in e.value.message
    d = add(store, b"d" * 9)  # over the byte budget: the rest go
    assert len(store) == 1 and store.read(d)[1] == b"d" * 9
    assert sorted(p.name for p in tmp_path.iterdir()) == [d] and a != c


def body(*messages) -> bytes:
    return json.dumps({"messages": list(messages)}).encode()


def text(role: str, t: str) -> dict:
    return {"role": role, "parts": [{"type": "text", "text": t}]}


def test_a_good_conversation_is_returned():
    media = {"role": "user", "parts": [{"type": "media", "id": "0" * 32}, {"type": "text", "text": "?"}]}
    msgs = [media, text("assistant", "a cat"), text("user", "and?")]
    assert parse_chat(body(*msgs)) == msgs


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "at least one message"),
        (body(), "at least one message"),
        (body(text("assistant", "hi")), "the last message"),
        (body(text("system", "hi"), text("user", "x")), "messages[0]"),
        (body({"role": "user", "parts": []}), "non-empty"),
        (body({"role": "user", "parts": [{"type": "media", "id": "/etc/passwd"}]}), "'/etc/passwd'"),
        (body({"role": "user", "parts": [{"type": "media", "id": "A" * 32}]}), "32 hex digits"),
        (body({"role": "assistant", "parts": [{"type": "media", "id": "0" * 32}]}, text("user", "x")), "from the user"),
        (body({"role": "user", "parts": [{"type": "text", "text": 3}]}), "messages[0].parts[0]"),
        (body({"role": "user", "parts": [{"type": "media", "id": "0" * 32}] * 65}), "at most 64"),
    ],
)
def test_a_bad_conversation_is_400_saying_why(raw, says):
    with pytest.raises(HttpError) as e:
        parse_chat(raw)
    assert e.value.code == 400 and says in e.value.message
