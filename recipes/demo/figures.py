"""The one table of the demo's figures: what each is, where it lives in RUN/eval/summary.json ("section.name", a
fraction), its target and which way is better. summary.json, the report's results table, the seed table
(`make demo-seeds`) and the test's checks are generated from it.

Contract figures (their keys are read outside this repository): image.count_and_layout_right, image.items_right,
video.direction_right, video.item_right, speech.wer, speech.distinct_fraction, speech_open.wer, dialogue.image_right,
dialogue.two_images_right, dialogue.video_right, dialogue.spoken_right. A stretch target is
tabulated but does not decide the exit status; a reference row (no target) is what the captioners are compared
with (the plain classifier reads the same frozen encoder: their ceiling).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Figure:
    key: str  # "section.name" in summary.json
    what: str  # the report's words for it
    target: float | None = None
    better: str = "min"  # "min": higher is better (the target is a minimum); "max": lower is better
    stretch: bool = False
    reference: bool = False

    @property
    def section(self) -> str:
        return self.key.split(".", 1)[0]

    def value(self, summary: dict) -> float | None:
        v = summary.get(self.section, {}).get(self.key.split(".", 1)[1])
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    def holds(self, value: float) -> bool:
        return value >= self.target if self.better == "min" else value <= self.target

    def target_text(self) -> str:
        if self.reference:
            return "(reference)"
        if self.target is None:
            return ""
        op = ">=" if self.better == "min" else "<="
        return f"{op} {100 * self.target:.0f}%" + (" (stretch)" if self.stretch else "")


FIGURES = [
    Figure("image.count_right", "image captions: item count right"),
    Figure("image.count_and_layout_right", "image captions: item count and layout right", 0.95),
    Figure("image.items_right", "image captions: items named right in their position", 0.90),
    Figure("image.exact", "image captions: whole caption exact"),
    Figure("classifier.items_right", "plain classifier (the same frozen ViT + a linear head per cell)", reference=True),
    Figure("video.direction_right", "video captions: direction right", 0.95),
    Figure("video.item_right", "video captions: item right", 0.90),
    Figure("video.classifier_item_right", "plain classifier on the same clips (first and last frame)", reference=True),
    Figure("speech.wer", "ASR, spoken-language domain (unseen sentences and voices): WER", 0.10, "max"),
    Figure("speech.cer", "ASR, spoken-language domain: CER", better="max"),
    Figure("speech.distinct_fraction", "ASR: distinct transcripts / distinct references", 0.95),
    Figure(
        "speech_unseen.wer",
        "ASR, domain test sentences read by flite (an engine used in no training): WER",
        0.25,
        "max",
    ),
    Figure(
        "speech_real.wer", "ASR, real human speech (10 pocketsphinx test utterances, off the domain): WER", better="max"
    ),
    Figure("speech_joined.wer", "ASR, two held-out sentences in one clip of at most 8 s: WER", better="max"),
    Figure("speech_open.wer", "ASR, open vocabulary (held-out fortune sentences): WER", 0.60, "max", stretch=True),
    Figure("dialogue.image_right", "dialogue: questions about a picture answered right", 0.90),
    Figure("dialogue.two_images_right", "dialogue: questions about two pictures answered right", 0.90),
    Figure("dialogue.video_right", "dialogue: questions about a clip answered right", 0.90),
    Figure("dialogue.spoken_right", "dialogue: spoken questions about a picture answered right", 0.85),
    Figure("conformer.wer", "ASR, domain, from-scratch Conformer + adapter (conformer=true): WER", better="max"),
]
TARGETS = [f for f in FIGURES if f.target is not None]
CONTRACT = [f.key for f in TARGETS]


def flat(section: dict) -> dict:
    """A section's scalar figures (what summary.json keeps; per-sample rows stay in eval/SECTION.json)."""
    return {k: v for k, v in section.items() if not isinstance(v, (list, dict))}


def passed(summary: dict) -> bool:
    """Every non-stretch target holds (figures the run did not produce are not counted)."""
    return all(f.holds(v) for f in TARGETS if not f.stretch and (v := f.value(summary)) is not None)


def tabulate(summaries: dict[int, dict]) -> dict:
    """{seed: summary} -> {figure key: {values, mean, min, max, target, worst, holds}} over the figures with a target
    or a reference role that some seed produced (worst/holds None for references)."""
    out = {}
    for f in FIGURES:
        if f.target is None and not f.reference:
            continue
        values = {s: v for s, summ in summaries.items() if (v := f.value(summ)) is not None}
        if not values:
            continue
        vs = list(values.values())
        row = {
            "values": values,
            "mean": statistics.fmean(vs),
            "min": min(vs),
            "max": max(vs),
            "target": f.target,
            "worst": None,
            "holds": None,
        }
        if f.target is not None:
            worst = min(vs) if f.better == "min" else max(vs)
            row.update(worst=worst, holds=f.holds(worst))
        out[f.key] = row
    return out


def seed_markdown(table: dict) -> str:
    by_key = {f.key: f for f in FIGURES}
    seeds = sorted({s for row in table.values() for s in row["values"]})
    head = "| figure | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | min | max | target | worst holds |"
    lines = [head, "|---|" + "---:|" * (len(seeds) + 4) + "---|"]
    for key, row in table.items():
        f = by_key[key]
        cells = [f"{100 * row['values'][s]:.1f}%" if s in row["values"] else "-" for s in seeds]
        stats = " | ".join(f"{100 * row[k]:.1f}%" for k in ("mean", "min", "max"))
        verdict = "" if row["holds"] is None else ("yes" if row["holds"] else "NO") + (" (stretch)" * f.stretch)
        lines.append(f"| {key} | {' | '.join(cells)} | {stats} | {f.target_text()} | {verdict}".rstrip() + " |")
    return "\n".join(lines) + "\n"
