"""The main job offline (`make demo`): real data -> shards -> 2-process DDP training of image, video and speech
adapters on the frozen SmolLM2-135M tower -> held-out evaluation -> runs/demo/report.md.

    python -m recipes.demo                       # every stage; stages whose outputs exist are skipped
    python -m recipes.demo --stages image,report # only these (still skipped when done; --force redoes them)
    python -m recipes.demo --config recipes/configs/demo/tiny.yaml run_dir=/tmp/d   # the reduced test version
    python -m recipes.demo.seeds                 # every stage per seed (0 1 2), figures' mean/min/max (make demo-seeds)

Stages (outputs under run_dir):
  corpora    Fashion-MNIST composites (train split / test split), moving-item clips (scenes.py), spoken-language
             sentences (corpora.spoken_sentences) + open-vocabulary fortune sentences read by espeak-ng voices + the
             piper voice (test: unseen sentences AND unseen voices)                 -> shards/*/index.json
  encoder    the demo ViT pretrained as a plain per-position classifier on training composites (the paper starts
             from a pretrained image encoder); its test accuracy is the classifier baseline -> encoder/
  image      image adapter (projection + gated cross-attention; the encoder frozen) -> image/adapter.safetensors
  video      aggregator + video cross-attention on the frozen image adapter       -> video/adapter.safetensors
  speech_cache   the frozen Whisper tiny.en encoder's outputs, once per training clip -> shards/speech_train_enc/
  speech_ctc     speech adapter, CTC over the tower's token table only (tower skipped) -> speech_ctc/
  speech         the same adapter, token loss through the frozen tower (+ CTC)         -> speech/adapter.safetensors
  conformer_ctc, conformer   the same two phases with a from-scratch Conformer (small)  -> conformer/
             (a comparison, off by default: conformer=true)
  evaluate   captions / transcripts of the held-out sets, scored field by field    -> eval/*.json
  report     report.md, loss curves, caption grid                                  -> report.md, *.png
Training stages run `accelerate launch --multi_gpu --num_processes N -m recipes.train` (our DDP engine, gloo) on
their own training config, recipes/configs/demo/STAGE.yaml (`stages.STAGE=[key=value, ...]` overrides it), in the
precision `dtype` names; `auto` (the default) measures this CPU once per run (bf16 only where its bf16 matmuls beat
fp32 by 1.2x) and keeps the choice in RUN/precision.json.

The package: stages.py (the one stage table and the runner), figures.py (the one figure table: summary.json, the
report's results, the seed table), config.py (DemoConfig, precision, shared helpers), data_stages.py, scenes.py and
corpora.py (the demo's own data), classifier.py (the encoder pretraining), evaluation.py, report.py, seeds.py.
"""

from .config import DemoConfig
from .stages import DONE, STAGE_TABLE, STAGES, main, run_demo

__all__ = ["DONE", "STAGES", "STAGE_TABLE", "DemoConfig", "main", "run_demo"]
