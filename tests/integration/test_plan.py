"""`mm-llama plan`: memory per GPU from the model's own code (adapters/plan.py, recipes/plan.py), checked against a
real step; the shipped large configs' verdicts; training from an HF Mllama (Llama 3.2 Vision) folder."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from mm_llama.adapters.hf_mllama import load_pretrained
from mm_llama.adapters.plan import saved_bytes
from mm_llama.config import load_config
from mm_llama.llama import Transformer
from mm_llama.llama.config import ModelArgs
from recipes.plan import check, main, plan_config, run_dry, to_json
from recipes.train import TrainConfig
from tests import tiny
from tests.integration.test_train import BIN, ENV, ROOT, train

CFG = ROOT / "recipes" / "configs"


def plan(*args, check=True):
    r = subprocess.run(
        [str(BIN / "mm-llama"), "plan", *map(str, args)], capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV
    )
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_plan_matches_a_measured_step_of_the_scaled_down_8b_image_stage():
    """The 8B image stage's layout scaled down (recipes/configs/plan_check_8b_image.yaml): the plan's peak for one
    process within 15% of the peak measured on a real step (the recipe's model, engine, optimizer, first batch),
    with and without activation checkpointing, at micro-batch 8 and 32; the activations alone (the part the plan
    models rather than counts) within 25% at micro-batch 8."""

    for ac, batch in (("true", 8), ("false", 8), ("true", 32)):
        cfg = load_config(
            TrainConfig,
            CFG / "plan_check_8b_image.yaml",
            [f"activation_checkpointing={ac}", f"data.batch_size={batch}"],
        )
        c = check(cfg)
        assert 0.85 <= c["ratio"] <= 1.15, c
        if batch == 8:
            static = sum(v for k, v in c["rows_gb"].items() if not k.startswith("activations"))
            acts = (c["predicted_gb"] - static) / (c["measured_gb"] - static)
            assert 0.75 <= acts <= 1.25, (ac, acts)


def test_meta_count_equals_what_autograd_keeps_on_a_real_layer():
    """The plan's saved-tensor count on the meta device == the same count on real CPU tensors (fused attention)."""

    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=160, vocab_size=100)

    def count(device):
        with torch.device(device):
            tower = Transformer(args).requires_grad_(False)
            x = torch.randn(3, 17, 64, requires_grad=True)
            freqs = tower.rope(torch.arange(17).expand(3, 17))
        layer = tower.layers[0]
        if device == "meta":
            return saved_bytes(lambda: layer(x, freqs), exclude=[*layer.parameters(), freqs])[0]
        seen, skip = {}, {t.untyped_storage().data_ptr() for t in [*layer.parameters(), freqs]}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in skip:
                seen[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x, freqs)
        return sum(seen.values())

    assert count("meta") == count("cpu")


def plan_json(config, gpus, gpu_mem, *overrides, capsys) -> dict:
    """`mm-llama plan ... --json` in this process (the CLI's own entry, recipes/plan.py `main`)."""

    assert main(["--config", str(config), "--gpus", str(gpus), "--gpu-mem", str(gpu_mem), "--json", *overrides]) == 0
    return json.loads(capsys.readouterr().out)


def test_shipped_large_configs_verdicts(capsys):
    """Llama 3.2 90B Vision (shape from its HF config.json) and the 405B image stage, on 8 x 80 GB and 2 x 8 x 80 GB
    (the command line once, the rest in-process)."""

    verdicts = {}
    for name in ("gpu_llama3_2_90b_vision_image", "gpu_llama3_1_405b_image"):
        cfg = load_config(TrainConfig, CFG / f"{name}.yaml")
        for gpus in (8, 16):
            out = to_json(*plan_config(cfg, gpus, 80.0))
            assert {"trainable_params", "layouts", "config", "verdict"} <= out.keys()
            verdicts[name, gpus] = out["verdict"]
    for gpus in (8, 16):  # 90B: ~20B trainable parameters; fits with the tower and the adapters sharded
        v90 = verdicts["gpu_llama3_2_90b_vision_image", gpus]
        assert v90["fits"] and "parallel.adapters=fsdp" in v90["use"], v90
    assert not verdicts["gpu_llama3_1_405b_image", 8]["fits"] and not verdicts["gpu_llama3_1_405b_image", 16]["fits"]
    text = plan("--config", CFG / "gpu_llama3_1_405b_image.yaml", "--gpus", 16, "--gpu-mem", 80).stdout
    assert "verdict: does NOT fit on 16 x 80 GB" in text and "More GPUs" in text
    for row in ("tower weights", "trainable weights", "gradients", "optimizer state", "activations"):
        assert row in text


@pytest.mark.parametrize("modality", ["image", "video", "speech"])
def test_plan_runs_for_every_modality(modality, capsys):
    out = plan_json(CFG / f"debug_{modality}.yaml", 2, 16, capsys=capsys)
    assert out["verdict"]["fits"] and out["config"]["total_gb"] > 0


def test_plan_bad_inputs_are_named_errors(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "nope.yaml"), "--gpus", "8", "--gpu-mem", "80"]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse checks the range (mm_llama/options.py) and exits 2
        main(["--config", str(CFG / "debug_image.yaml"), "--gpus", "0", "--gpu-mem", "80"])
    assert e.value.code == 2 and "--gpus" in capsys.readouterr().err
    assert (
        main(["--config", str(CFG / "debug_image.yaml"), "--gpus", "8", "--gpu-mem", "80", "tower.path=/no/such"]) == 2
    )
    assert "tower.preset" in capsys.readouterr().err
    # a hybrid mesh needs whole machines: the plan offers (and takes) only layouts the trainer accepts
    args = ["--config", str(CFG / "debug_image.yaml"), "--gpus", "16", "--gpus-per-machine", "6", "--gpu-mem", "80"]
    assert main([*args, "parallel.mesh=hybrid"]) == 2 and "machines of 6" in capsys.readouterr().err
    assert main(args) == 0 and "hybrid" not in capsys.readouterr().out


def _tiny_mllama(folder):
    """A tiny random HF Mllama folder with SmolLM2's vocabulary (so the committed image shards and tokenizer train
    on it): 3 self-attention layers, one cross-attention layer at flat index 2, gates at 0.5."""
    tiny.hf_mllama(folder, cross_layers=(2,), n_text_layers=4, vocab=49152, gate=0.5)


def test_training_starts_from_an_hf_mllama_folder(tmp_path, capsys):
    """tower.path and model.image.release: the folder's text model (frozen) and its released image adapter (trained):
    with lr 0 the saved adapter is the release's, with lr > 0 the loss falls; the plan reads the same folder."""
    folder = tmp_path / "mllama"
    _tiny_mllama(folder)
    base = [
        "--config",
        "recipes/configs/debug_image.yaml",
        f"tower.path={folder}",
        f"model.image.release={folder}",
        "steps=3",
    ]
    _, _ = train(*base, f"run_dir={tmp_path / 'lr0'}", "optim.lr=0", "steps=1")

    saved = load_file(tmp_path / "lr0" / "adapter.safetensors")
    release = load_pretrained(folder)
    assert float(saved["cross_attention_layers.0.gate_attn"]) == pytest.approx(0.5)
    w = release.image.cross_attention_layers[0].feed_forward.w1.weight
    assert torch.equal(saved["cross_attention_layers.0.feed_forward.w1.weight"], w)
    losses, _ = train(*base, f"run_dir={tmp_path / 'lr'}", "optim.lr=3e-3")
    assert len(losses) == 3 and losses[-1] < losses[0]
    out = plan_json(
        CFG / "debug_image.yaml", 1, 16, f"tower.path={folder}", f"model.image.release={folder}", capsys=capsys
    )
    n = sum(p.numel() for n_, p in release.named_parameters() if not n_.startswith("tower."))
    assert out["trainable_params"] == n


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))


def test_dry_run_finds_tensors_off_the_device_and_in_stray_dtypes(capsys):
    """`plan --dry-run`: the config's model on fake CUDA tensors, one training forward; clean configs pass (exit 0),
    and deliberately misplaced tensors (a CPU tensor added inside a tower layer, a float64 one) are reported with
    the line that made them (exit 1)."""
    assert main(["--config", str(CFG / "debug_image.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "on fake cuda (bfloat16 tower" in out and "problems: 0" in out

    def misplace(model):
        def hook(_module, _args, out):
            return out + torch.ones(out.shape[-1])  # made on the CPU inside the step

        def wrong_dtype(_module, _args, out):
            return out + torch.zeros(out.shape, dtype=torch.float64, device=out.device).to(out.dtype)

        model.tower.layers[0].register_forward_hook(hook)
        model.tower.layers[1].register_forward_hook(wrong_dtype)

    args = SimpleNamespace(config=str(CFG / "debug_speech.yaml"), overrides=["dtype=float32"], json=True)
    assert run_dry(args, inject=misplace) == 1
    report = json.loads(capsys.readouterr().out)
    here = Path(__file__).name
    assert report["dtype"] == "float32" and len(report["problems"]) == 2, report["problems"]
    cpu, f64 = sorted(report["problems"], key=lambda p: "float64" in p)
    assert "aten.add.Tensor" in cpu and "on cpu" in cpu and f"{here}:" in cpu and "(hook)" in cpu
    assert "float64" in f64 and "(wrong_dtype)" in f64
