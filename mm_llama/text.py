"""Text as ASR scoring reads it: numbers spelled out, normalisation before WER/CER (shared by the corpora, which
spell numbers as the voices read them, and the scorers)."""

from __future__ import annotations

import re
import unicodedata

import jiwer

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split()
)
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10 - 2] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        return _ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + number_words(n % 100))
    if n < 1_000_000:
        return number_words(n // 1000) + " thousand" + ("" if n % 1000 == 0 else " " + number_words(n % 1000))
    return " ".join(_ONES[int(d)] for d in str(n))


def normalize_text(text: str) -> str:
    """Lower case, digits spelled out, punctuation dropped (apostrophes inside words kept), spaces collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"\d+", lambda m: " " + number_words(int(m.group())) + " ", text)
    text = re.sub(r"[^\w\s']|_", " ", text)
    text = re.sub(r"(?<!\w)'|'(?!\w)", " ", text)
    return " ".join(text.split())


def first_line(text: str) -> str:
    """A transcript: the decoded text up to its first line break (a token such as ".\\n" can end it mid-token)."""
    return text.strip().split("\n", 1)[0].strip()


def collapse_loop(text: str, min_copies: int = 3) -> str:
    """A transcript that ends in a runaway loop (a phrase of one or more words repeated `min_copies` or more times
    back to back, the last copy possibly cut short by the token limit) keeps one copy of the phrase: "walk down the
    side of the side of the side of the" -> "walk down the side of". The shortest looping phrase wins; text
    without such a tail is returned as it is (two copies, "steps steps", are left alone)."""
    words = text.split()
    n = len(words)
    for size in range(1, n // min_copies + 1):
        start = n - size  # the periodic tail words[start:] with period `size`, grown backwards
        while start > 0 and words[start - 1] == words[start - 1 + size]:
            start -= 1
        if n - start >= min_copies * size:
            return " ".join(words[: start + size])
    return text


def wer_cer(references: list[str], hypotheses: list[str]) -> dict:
    """Word and character error rates (jiwer) over normalised texts."""
    refs = [normalize_text(r) or "<empty>" for r in references]
    hyps = [normalize_text(h) for h in hypotheses]
    return {"wer": float(jiwer.wer(refs, hyps)), "cer": float(jiwer.cer(refs, hyps)), "n": len(refs)}


def wer_cer_by(references: list[str], hypotheses: list[str], groups: list[str]) -> dict[str, dict]:
    """`wer_cer` per group (e.g. per voice), groups in sorted order."""
    return {
        g: wer_cer([r for r, x in zip(references, groups) if x == g], [h for h, x in zip(hypotheses, groups) if x == g])
        for g in sorted(set(groups))
    }
