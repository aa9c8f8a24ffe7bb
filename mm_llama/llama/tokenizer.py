"""Tokenizers for the tower: Meta's Llama 3 tiktoken BPE, HF `tokenizer.json`, or the one embedded in a GGUF.

All three share one interface: `encode(text, bos=, eos=, allow_special=)`, `decode(ids)`, special-token ids,
`stop_ids` and `format_chat(messages)`. Special-token strings typed by a user (e.g. "<|eot_id|>" inside a prompt)
are encoded as plain text unless `allow_special=True`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as TK

from .format_gguf import read_gguf_metadata

# Meta's split pattern (llama-models `tokenizer.py`)
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_RESERVED = 256
LLAMA3_BASE_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]
# Meta's limits that keep tiktoken's regex fast on pathological inputs
_MAX_CHARS = 400_000
_MAX_RUN = 25_000

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}


def llama3_special_tokens() -> list[str]:
    n_extra = LLAMA3_NUM_RESERVED - len(LLAMA3_BASE_SPECIALS)
    return LLAMA3_BASE_SPECIALS + [f"<|reserved_special_token_{2 + i}|>" for i in range(n_extra)]


def _split_whitespace_runs(s: str, max_run: int) -> list[str]:
    """Split `s` so no piece holds more than `max_run` consecutive whitespace or non-whitespace chars."""
    pieces, start, run, kind = [], 0, 0, None
    for i, ch in enumerate(s):
        k = ch.isspace()
        run = run + 1 if k == kind else 1
        kind = k
        if run > max_run:
            pieces.append(s[start:i])
            start, run = i, 1
    pieces.append(s[start:])
    return pieces


class Tokenizer:
    """Common interface; build with `Tokenizer.from_pretrained(path)`."""

    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    stop_ids: set[int]
    special_tokens: dict[str, int]  # special-token string -> id
    add_bos: bool
    chat_format: str  # "llama3" | "chatml"
    n_words: int

    @staticmethod
    def from_pretrained(path: str | Path) -> Tokenizer:
        """tokenizer.model (tiktoken) | tokenizer.json (HF) | .gguf | a model folder holding one of these."""
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"tokenizer path does not exist: {p}")
        if p.is_dir():
            for name in ("tokenizer.model", "tokenizer.json"):
                if (p / name).is_file():
                    return Tokenizer.from_pretrained(p / name)
            for sub in ("original",):
                if (p / sub / "tokenizer.model").is_file():
                    return Tokenizer.from_pretrained(p / sub / "tokenizer.model")
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return Tokenizer.from_pretrained(ggufs[0])
            raise FileNotFoundError(f"no tokenizer.model, tokenizer.json or single .gguf file in {p}")
        if p.suffix == ".gguf":
            return GGUFTokenizer(p)
        if p.suffix == ".json":
            return HFTokenizer(p)
        return TiktokenTokenizer(p)

    # --- interface ------------------------------------------------------------------------
    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int:
        raise NotImplementedError

    def decode_token_bytes(self, ids: Sequence[int]) -> bytes:
        """Raw bytes of `ids` (for streaming: decode only complete UTF-8 sequences)."""
        raise NotImplementedError

    def ids_starting_with(self, prefix: bytes) -> frozenset[int]:
        """Ids of the ordinary (non-special) tokens whose bytes begin with `prefix` (e.g. b"\\n": the tokens that
        start a new line). Cached per prefix."""
        cache = self.__dict__.setdefault("_prefix_ids", {})
        if prefix not in cache:
            cache[prefix] = frozenset(i for i, b in self._token_bytes() if b.startswith(prefix))
        return cache[prefix]

    def _with_bos_eos(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        """`ids` with the BOS id before and/or the EOS id after (a ValueError for a tokenizer without one)."""
        if bos:
            if self.bos_id is None:
                raise ValueError("this tokenizer has no BOS token")
            ids = [self.bos_id, *ids]
        if eos:
            if self.eos_id is None:
                raise ValueError("this tokenizer has no EOS token")
            ids = [*ids, self.eos_id]
        return ids

    def _token_bytes(self) -> Iterator[tuple[int, bytes]]:
        """(id, bytes) of every ordinary token; backends override it with a faster table walk."""
        specials = set(self.special_tokens.values())
        return ((i, self.decode_token_bytes([i])) for i in range(self.n_words) if i not in specials)

    # --- chat -----------------------------------------------------------------------------
    def format_chat(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids for a conversation in the tower's chat format, ending with an open assistant turn."""
        for m in messages:
            if m.get("role") not in ("system", "user", "assistant", "ipython", "tool"):
                raise ValueError(f"unknown chat role {m.get('role')!r}")
        ids: list[int] = []
        if self.chat_format == "llama3":
            ids.append(self.token_to_id("<|begin_of_text|>"))
            sh, eh, eot = (self.token_to_id(t) for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
            for m in messages:
                ids += [sh, *self.encode(m["role"]), eh, *self.encode("\n\n" + m["content"].strip()), eot]
            if add_generation_prompt:
                ids += [sh, *self.encode("assistant"), eh, *self.encode("\n\n")]
        else:  # ChatML
            start, end = self.token_to_id("<|im_start|>"), self.token_to_id("<|im_end|>")
            for m in messages:
                ids += [start, *self.encode(f"{m['role']}\n{m['content']}"), end, *self.encode("\n")]
            if add_generation_prompt:
                ids += [start, *self.encode("assistant\n")]
        return ids


class TiktokenTokenizer(Tokenizer):
    """Meta's Llama 3 tokenizer: 128000 BPE ranks + 256 special tokens."""

    def __init__(self, model_path: Path) -> None:
        try:
            ranks = load_tiktoken_bpe(str(model_path))
        except Exception as e:
            raise ValueError(f"{model_path}: not a tiktoken BPE file ({e})") from None
        n = len(ranks)
        self.special_tokens = {t: n + i for i, t in enumerate(llama3_special_tokens())}
        # Llama 3.2 Vision: `<|image|>` is the first id past the text vocabulary (a learned extra embedding row)
        self.special_tokens["<|image|>"] = n + LLAMA3_NUM_RESERVED
        self.model = tiktoken.Encoding(
            name=model_path.name, pat_str=LLAMA3_PAT_STR, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.n_words = self.model.n_vocab
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.stop_ids = {self.eos_id, self.special_tokens["<|eom_id|>"], self.special_tokens["<|eot_id|>"]}
        self.add_bos = True
        self.chat_format = "llama3"

    def token_to_id(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self.model.encode_single_token(token)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        allowed = "all" if allow_special else set()
        ids: list[int] = []
        for i in range(0, len(text), _MAX_CHARS):
            for piece in _split_whitespace_runs(text[i : i + _MAX_CHARS], _MAX_RUN):
                ids += self.model.encode(piece, allowed_special=allowed, disallowed_special=())
        return self._with_bos_eos(ids, bos, eos)

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i < len(self.model._mergeable_ranks)]
        return self.model.decode(ids)

    def decode_token_bytes(self, ids: Sequence[int]) -> bytes:
        return self.model.decode_bytes([int(i) for i in ids])

    def _token_bytes(self) -> Iterator[tuple[int, bytes]]:
        return ((rank, b) for b, rank in self.model._mergeable_ranks.items())


class _TokenizersBackend(Tokenizer):
    """Shared code for backends built on HF `tokenizers`."""

    tk: TK

    def _setup(self, tk: TK, specials: dict[str, int]) -> None:
        self.tk = tk
        self.special_tokens = specials
        self.n_words = tk.get_vocab_size(with_added_tokens=True)
        # user text containing special-token strings is tokenized as plain text by default
        self.tk.encode_special_tokens = True

    def token_to_id(self, token: str) -> int:
        i = self.tk.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return i

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        self.tk.encode_special_tokens = not allow_special
        try:
            ids = self.tk.encode(text, add_special_tokens=False).ids
        finally:
            self.tk.encode_special_tokens = True
        return self._with_bos_eos(ids, bos, eos)

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def decode_token_bytes(self, ids: Sequence[int]) -> bytes:
        # byte-level BPE: map each token string back through the GPT-2 byte alphabet
        table = _byte_decoder()
        out = bytearray()
        for i in ids:
            tok = self.tk.id_to_token(int(i))
            if tok is None:
                continue
            out += tok.encode() if tok in self.special_tokens else _piece_bytes(tok, table)
        return bytes(out)

    def _token_bytes(self) -> Iterator[tuple[int, bytes]]:
        table, specials = _byte_decoder(), set(self.special_tokens)
        for tok, i in self.tk.get_vocab(with_added_tokens=False).items():
            if tok not in specials:
                yield i, _piece_bytes(tok, table)


def _piece_bytes(piece: str, table: dict[str, int]) -> bytes:
    """A vocabulary entry's bytes: through the GPT-2 byte alphabet where every character is in it (byte-level BPE),
    else its UTF-8."""
    return bytes(table[c] for c in piece) if all(c in table for c in piece) else piece.encode()


_BYTE_DECODER: dict[str, int] | None = None


def _byte_decoder() -> dict[str, int]:
    global _BYTE_DECODER
    if _BYTE_DECODER is None:
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        bs += list(range(ord("®"), ord("ÿ") + 1))
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        _BYTE_DECODER = {chr(c): b for b, c in zip(bs, cs)}
    return _BYTE_DECODER


class HFTokenizer(_TokenizersBackend):
    """A Hugging Face `tokenizer.json` (e.g. Llama-3.x's), with special ids from tokenizer_config.json."""

    def __init__(self, path: Path) -> None:
        try:
            tk = TK.from_file(str(path))
        except Exception as e:
            raise ValueError(f"{path}: not a Hugging Face tokenizer.json ({e})") from None
        specials = {t.content: i for i, t in tk.get_added_tokens_decoder().items() if t.special}
        self._setup(tk, specials)
        cfg_path = path.parent / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}

        def tok_id(name: str, *fallbacks: str) -> int | None:
            v = cfg.get(name)
            if isinstance(v, dict):
                v = v.get("content")
            for cand in [v, *fallbacks]:
                if cand is not None and tk.token_to_id(cand) is not None:
                    return tk.token_to_id(cand)
            return None

        self.bos_id = tok_id("bos_token", "<|begin_of_text|>", "<s>", "<|im_start|>")
        self.eos_id = tok_id("eos_token", "<|end_of_text|>", "</s>", "<|endoftext|>")
        self.pad_id = tok_id("pad_token", "<|finetune_right_pad_id|>")
        template = cfg.get("chat_template") or ""
        if isinstance(template, list):
            template = " ".join(str(t) for t in template)
        llama3 = "<|start_header_id|>" in specials
        self.chat_format = "chatml" if ("<|im_start|>" in template or not llama3) else "llama3"
        stops = ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>"]
        self.stop_ids = {specials[s] for s in stops if s in specials}
        if self.eos_id is not None:
            self.stop_ids.add(self.eos_id)
        self.add_bos = bool(cfg.get("add_bos_token", llama3))
        if self.chat_format == "chatml" and "<|im_start|>" not in specials:
            self.chat_format = "llama3" if llama3 else "chatml"


# llama.cpp pre-tokenizer names whose regex splits every digit on its own before GPT-2's pattern
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}


class GGUFTokenizer(_TokenizersBackend):
    """The byte-level BPE tokenizer embedded in a GGUF file (`tokenizer.ggml.*`)."""

    def __init__(self, path: Path) -> None:
        meta = read_gguf_metadata(path)

        def field(key: str, default: Any = None) -> Any:
            return meta.get(key, default)

        kind = field("tokenizer.ggml.model")
        if kind not in ("gpt2", "llama3") and kind is not None:
            raise ValueError(f"{path}: GGUF tokenizer model {kind!r} is not supported (byte-level BPE only)")
        tokens = field("tokenizer.ggml.tokens")
        merges = field("tokenizer.ggml.merges")
        if tokens is None or merges is None:
            raise ValueError(f"{path}: GGUF file has no embedded BPE tokenizer (tokenizer.ggml.tokens/merges)")
        types = field("tokenizer.ggml.token_type") or [1] * len(tokens)
        vocab = {t: i for i, t in enumerate(tokens)}
        merge_pairs = [tuple(m.split(" ", 1)) for m in merges]
        tk = TK(models.BPE(vocab=vocab, merges=merge_pairs, ignore_merges=False, fuse_unk=False))
        pre = field("tokenizer.ggml.pre", "default")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre in ("llama-bpe", "llama3"):
            split = pre_tokenizers.Split(
                pattern=__import__("tokenizers").Regex(LLAMA3_PAT_STR), behavior="isolated", invert=False
            )
            tk.pre_tokenizer = pre_tokenizers.Sequence(
                [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
            )
        elif pre in _DIGIT_SPLIT_PRE:
            tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            tk.pre_tokenizer = byte_level
        tk.decoder = decoders.ByteLevel()
        # control (3) and user-defined (4) tokens are matched whole
        specials = {}
        added = []
        for i, (t, ty) in enumerate(zip(tokens, types)):
            if ty in (3, 4):
                added.append(AddedToken(t, special=ty == 3, normalized=False))
                if ty == 3:
                    specials[t] = i
        tk.add_special_tokens([a for a in added if a.special])
        tk.add_tokens([a for a in added if not a.special])
        self._setup(tk, specials)
        bos, eos = field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")
        self.bos_id = None if bos is None else int(bos)
        self.eos_id = None if eos is None else int(eos)
        pad = field("tokenizer.ggml.padding_token_id")
        self.pad_id = None if pad is None else int(pad)
        self.add_bos = bool(field("tokenizer.ggml.add_bos_token", True))
        template = field("tokenizer.chat_template") or ""
        self.chat_format = "chatml" if "<|im_start|>" in template else "llama3"
        self.stop_ids = set()
        for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"):
            if t in specials:
                self.stop_ids.add(specials[t])
        if self.eos_id is not None:
            self.stop_ids.add(self.eos_id)
        eot = field("tokenizer.ggml.eot_token_id")
        if eot is not None:
            self.stop_ids.add(int(eot))
