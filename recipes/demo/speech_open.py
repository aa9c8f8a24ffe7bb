"""`make demo-speech-open`: an open-vocabulary speech adapter on the frozen Whisper tiny.en encoder and the frozen
SmolLM2-135M tower, trained on CPU from synthetic speech of open text and scored on four held-out sets.

    python -m recipes.demo.speech_open                  # every stage (finished ones are skipped; --force redoes)
    python -m recipes.demo.speech_open --stages evaluate --force
    mm-llama asr --model asset:smollm2_gguf --adapter runs/demo-speech-open/speech/adapter.safetensors FILE.wav

Settings: recipes/configs/demo/speech_open.yaml (DemoConfig values; key=value overrides it). The stages are the main
demo's speech stages on other corpora:
  corpora       fortune sentences (Debian `fortunes`) mixed with the spoken-language domain, read by espeak-ng voices
                and piper, 60% of the clips augmented (speed, telephone band, room, noise, level); held out: fortune
                and domain sentences read by unseen espeak-ng voices, the domain read by flite (an engine used in no
                training set), real human speech (Debian `pocketsphinx-testdata`)
  speech_cache  the frozen encoder's outputs, once per training clip
  speech_ctc    CTC over the tower's token table (the tower skipped)
  speech        the token loss through the frozen tower (+ CTC), from the CTC adapter -> speech/adapter.safetensors
  speech_lego   the ablation (speech_ablation=true): the same, but the tower reads each row's CTC posterior over its
                token table weighting its own token embeddings (LegoSLM)          -> speech_lego/adapter.safetensors
  evaluate      transcripts of each held-out set, and the CTC best-path readout of the adapter's rows alone
                -> eval/summary.json
Contract: RUN/speech/adapter.safetensors; RUN/eval/summary.json holds fractions under open.wer (fortunes),
domain.wer and real.wer (real human speech), and unseen.wer (flite), ctc_open.wer, ctc_domain.wer (the CTC
best-path readout alone), lego_*.wer (the ablation).
"""

from __future__ import annotations

import sys
from functools import partial

from .config import STAGE_CONFIGS
from .data_stages import stage_corpora, stage_speech_cache
from .evaluation import eval_ctc_readout, eval_speech, stage_evaluate
from .stages import Stage, main, training

CONFIG = STAGE_CONFIGS / "speech_open.yaml"

# summary section -> (the model, its modality, the scorer), as evaluation.EVALS
EVALS = {
    "open": ("main", "speech", partial(eval_speech, shards="speech_open_test")),
    "domain": ("main", "speech", eval_speech),
    "unseen": ("main", "speech", partial(eval_speech, shards="speech_unseen_test")),
    "real": ("main", "speech", partial(eval_speech, shards="speech_real_test")),
    "ctc_open": ("main", "speech", partial(eval_ctc_readout, shards="speech_open_test")),
    "ctc_domain": ("main", "speech", eval_ctc_readout),
    # the ablation (speech_ablation=true): the same CTC phase, then the tower reading CTC posteriors (LegoSLM)
    "lego_open": ("lego", "speech", partial(eval_speech, shards="speech_open_test")),
    "lego_domain": ("lego", "speech", eval_speech),
    "lego_unseen": ("lego", "speech", partial(eval_speech, shards="speech_unseen_test")),
    "lego_real": ("lego", "speech", partial(eval_speech, shards="speech_real_test")),
}

TABLE = [
    Stage("corpora", stage_corpora, "shards/corpora.json"),
    Stage("speech_cache", stage_speech_cache, "shards/speech_train_enc/index.json"),
    training("speech_ctc", "speech_train_enc"),
    training("speech", "speech_train_enc", {"init_adapter": "speech_ctc/adapter.safetensors"}),
    training("speech_lego", "speech_train_enc", {"init_adapter": "speech_ctc/adapter.safetensors"}, "speech_ablation"),
    Stage("evaluate", partial(stage_evaluate, evals=EVALS), "eval/summary.json"),
]

if __name__ == "__main__":
    sys.exit(main(prog="python -m recipes.demo.speech_open", doc=__doc__, table=TABLE, config=str(CONFIG)))
