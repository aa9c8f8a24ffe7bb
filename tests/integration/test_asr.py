"""ASR path end to end on real parts: Whisper tiny.en (CTranslate2) + speech adapter + SmolLM2 tower."""

from pathlib import Path

import soundfile as sf
import torch

from mm_llama.adapters.asr import transcribe
from mm_llama.adapters.composed import ComposedModel
from mm_llama.adapters.files import load_composed, save_part
from mm_llama.adapters.generation import Collate
from mm_llama.adapters.modality import AnswerOptions
from mm_llama.adapters.samples import plain_requests
from mm_llama.adapters.speech import ADAPTER_PRESETS
from mm_llama.adapters.speech_part import build_speech_part
from mm_llama.adapters.whisper import load_whisper_encoder
from mm_llama.assets import asset_path
from mm_llama.cli import main
from mm_llama.data.audio import decode_audio
from mm_llama.data.shards import iter_samples, open_url
from mm_llama.text import collapse_loop, normalize_text, wer_cer, wer_cer_by

SHARDS = Path(__file__).resolve().parents[1] / "assets" / "shards" / "audio"


def test_collapse_loop_keeps_one_copy_of_a_runaway_phrase():
    loop = "Ninety five shirts walk down the lazy side of the lazy side of the lazy side of the lazy"
    assert collapse_loop(loop) == "Ninety five shirts walk down the lazy side of"
    assert collapse_loop("The coat to the left the left the left the left the") == "The coat to the left"
    assert collapse_loop("The Little Shady Shady Shady Shady") == "The Little Shady"
    # what a sentence may hold: two copies, a repeat with words between, a loop not at the end
    for text in ["walks down thirty nine steps steps", "climbs up and then up", "ha ha ha is what he said", "", "a"]:
        assert collapse_loop(text) == text
    assert collapse_loop("go go go", min_copies=4) == "go go go" and collapse_loop("go go go") == "go"


def test_normalisation_and_error_rates():
    assert normalize_text("Hello, World! It's 42 o'clock.") == "hello world it's forty two o'clock"
    r = wer_cer(["the cat sat", "Twenty-one dogs"], ["The cat sat.", "21 dogs"])
    assert r["wer"] == 0.0 and r["cer"] == 0.0
    assert wer_cer(["a b c d"], ["a x c"])["wer"] == 0.5
    by = wer_cer_by(["a b", "c d", "e f"], ["a b", "c x", "e"], ["v2", "v1", "v2"])
    assert list(by) == ["v1", "v2"]
    assert by["v1"]["wer"] == 0.5 and by["v1"]["n"] == 1
    assert by["v2"] == wer_cer(["a b", "e f"], ["a b", "e"])


def clip():
    url = str(SHARDS / "shard-000000.tar")
    s = next(iter(iter_samples(open_url(url), url)))

    return decode_audio(s["flac"], "tone", "flac")


def whisper_model(smollm) -> ComposedModel:
    enc = load_whisper_encoder(asset_path("whisper_tiny_en_ct2"))
    torch.manual_seed(0)
    return ComposedModel(smollm, speech=build_speech_part(smollm, enc, ADAPTER_PRESETS["debug"], freeze_encoder=True))


def test_transcribe_whisper_encoder_real_tower_consistent(smollm, smollm_tok, tmp_path):
    model = whisper_model(smollm)
    assert not any(p.requires_grad for p in model.speech.encoder.parameters())
    wave = clip()
    (text,) = transcribe(model, smollm_tok, [wave], max_new_tokens=6)
    (raw,) = transcribe(model, smollm_tok, [wave], max_new_tokens=6, one_line=False)
    # the same greedy decode with full forwards and no cache; a transcript ends at a token that begins a new line
    item = plain_requests(model, smollm_tok, "speech", [wave], "clip", AnswerOptions())[0]
    inputs = Collate(["speech"]).inputs([item])
    seq, line_ends = list(item["input_ids"]), None
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(torch.tensor([seq]), **inputs).logits[0, -1].argmax())
            if nxt in smollm_tok.stop_ids:
                break
            if line_ends is None and nxt in smollm_tok.ids_starting_with(b"\n"):
                line_ends = len(seq)
            seq.append(nxt)
    n = len(item["input_ids"])
    assert raw == smollm_tok.decode(seq[n:]).strip()
    assert text == smollm_tok.decode(seq[n:line_ends]).strip().split("\n")[0].strip()
    # the untrained adapter runs on past its line (".\n\nThe original ..."): the rule is exercised, not vacuous
    assert "\n" in raw and "\n" not in text
    save_part(model, "speech", tmp_path / "speech.safetensors")
    back = load_composed(smollm, [tmp_path / "speech.safetensors"])
    assert transcribe(back, smollm_tok, [wave], max_new_tokens=6) == [text]


def test_asr_cli(tmp_path, smollm_path, smollm, capsys):
    """`mm-llama asr` on a stereo file: one `PATH: TEXT` line and the real-time factor."""
    save_part(whisper_model(smollm), "speech", tmp_path / "speech.safetensors")
    sf.write(tmp_path / "clip.wav", torch.stack([clip(), clip()], 1).numpy(), 16000)  # stereo
    args = ["asr", "--model", str(smollm_path), "--adapter", str(tmp_path / "speech.safetensors")]
    code = main([*args, str(tmp_path / "clip.wav"), "--max-new-tokens", "4"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith(str(tmp_path / "clip.wav") + ":") and "real-time factor" in err
