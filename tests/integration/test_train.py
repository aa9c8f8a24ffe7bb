"""recipes/train.py through its real entry point on the debug configs and the committed shards."""

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from safetensors.torch import load_file

from recipes.evaluate import main as evaluate_main
from recipes.train import main as train_main
from tests.ddp_helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
TRAIN = str(ROOT / "recipes" / "train.py")
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MM_LLAMA_PG_TIMEOUT": "120"}
# recorded on this project's CPU machines (fp32); tolerance covers BLAS differences between CPUs. Since training
# tiles images as inference does (the debug encoder takes up to 4 tiles); with the old one-tile resize the same run
# gives [11.114079, 10.932398, 10.822516, 10.960124, 10.820136, 10.837853], the previous golden values.
GOLDEN_IMAGE = [11.114079, 10.932533, 10.822812, 10.964510, 10.831417, 10.857991]


def _in_process(argv: list[str], main=None) -> SimpleNamespace:
    """A recipe's `main(argv)` (default: the training recipe's) run here, as its command would, from the root."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = (main or train_main)(argv)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


FAULTS = ["-m", "tests.fault_train"]  # the recipe with faults injected through the trainer's callbacks


def train(*args, launcher=None, check=True, script=None):
    """The recipe's entry point with these arguments -> (the LOSSES it printed, the run's returncode/stdout/stderr).
    One process (no launcher, no fault script): `recipes.train.main` in this process, which is what the command runs
    (saves a Python + torch start per run); otherwise the command under the launcher."""
    if launcher is None and script is None:
        r = _in_process(list(args))
    else:
        cmd = (launcher or [sys.executable]) + (script or [TRAIN]) + list(args)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=ENV)
    if check:
        assert r.returncode == 0, r.stderr[-4000:]
    m = re.findall(r"LOSSES (\[[^\]]*\])", r.stdout)
    return (json.loads(m[-1]) if m else None), r


def test_image_debug_golden_losses(tmp_path):
    losses, _ = train("--config", "recipes/configs/debug_image.yaml", f"run_dir={tmp_path}")
    assert losses == pytest.approx(GOLDEN_IMAGE, abs=1e-3)
    cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())  # the resolved config is saved in the run
    assert cfg["model"]["modality"] == "image" and cfg["steps"] == 6
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 7)) and all("tokens_per_s" in r for r in recs)


@pytest.mark.slow  # make test: resumed runs repeat the uninterrupted one bitwise in test_fsdp.py and tests/faults/
def test_resume_gives_the_same_loss_curve(tmp_path):
    full, _ = train("--config", "recipes/configs/debug_image.yaml", f"run_dir={tmp_path / 'a'}")
    first, _ = train("--config", "recipes/configs/debug_image.yaml", f"run_dir={tmp_path / 'b'}", "stop_after=3")
    assert len(first) == 3
    resumed, _ = train("--config", "recipes/configs/debug_image.yaml", f"run_dir={tmp_path / 'b'}")
    assert resumed == full  # bitwise on CPU
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]


def test_speech_debug_loss_falls(tmp_path):
    losses, _ = train("--config", "recipes/configs/debug_speech.yaml", f"run_dir={tmp_path}")
    assert len(losses) == 6 and losses[-1] < losses[0]


@pytest.mark.slow  # make test: test_fsdp.py launches the recipe with torchrun (2 and 4 ranks, rank 1's files)
def test_two_processes_torchrun(tmp_path):
    launcher = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_port())]
    losses, r = train(
        "--config", "recipes/configs/debug_image.yaml", f"run_dir={tmp_path}", "steps=3", launcher=launcher
    )
    assert len(losses) == 3
    assert (tmp_path / "checkpoints" / "step_00000003" / "data_rank1.json").is_file()


def test_config_errors_name_the_key(tmp_path):
    _, r = train("--config", "recipes/configs/debug_image.yaml", "optim.lrr=1", check=False)
    assert r.returncode == 2 and "unknown config key optim.lrr" in r.stderr
    _, r = train("--config", "recipes/configs/debug_image.yaml", "steps=many", check=False)
    assert r.returncode == 2 and "steps: expected int" in r.stderr


def _port():
    return free_port()


@pytest.mark.slow  # make test: test_fsdp.py's two accelerate launchers on 127.0.0.1 (the hybrid mesh)
def test_accelerate_two_launchers_on_localhost(tmp_path):
    port = _port()
    procs = []
    for machine_rank in (0, 1):
        cmd = [
            str(BIN / "accelerate"),
            "launch",
            "--multi_gpu",
            "--num_machines",
            "2",
            "--machine_rank",
            str(machine_rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            str(port),
            "--num_processes",
            "2",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            TRAIN,
            "--config",
            "recipes/configs/debug_speech.yaml",
            f"run_dir={tmp_path}",
            "steps=2",
        ]
        procs.append(
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
        )
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "LOSSES" in outs[0][0]


def test_engine_torch_runs(tmp_path):
    losses, _ = train("--config", "recipes/configs/debug_speech.yaml", f"run_dir={tmp_path}", "steps=2", "engine=torch")
    assert len(losses) == 2


def test_nonfinite_losses_skipped_then_stop(tmp_path):
    losses, r = train(
        "--config", "recipes/configs/debug_image.yaml", f"run_dir={tmp_path / 'a'}", "--nan-steps", "2", script=FAULTS
    )
    assert len(losses) == 6 and "non-finite loss, step skipped" in r.stderr
    _, r = train(
        "--config",
        "recipes/configs/debug_image.yaml",
        f"run_dir={tmp_path / 'b'}",
        "optim.max_nonfinite=2",
        "--nan-steps",
        "1,2,3,4",
        check=False,
        script=FAULTS,
    )
    assert r.returncode != 0 and "non-finite losses" in r.stderr and "stopping" in r.stderr


def test_killed_rank_makes_the_other_exit_with_an_error(tmp_path):
    """No hang: the surviving rank exits with an error (bounded by the communicate timeouts, not wall-clock)."""
    port = _port()
    procs = []
    for rank in (0, 1):
        env = {
            **ENV,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "MM_LLAMA_PG_TIMEOUT": "60",
        }
        cmd = [
            sys.executable,
            *FAULTS,
            "--config",
            "recipes/configs/debug_speech.yaml",
            f"run_dir={tmp_path}",
            "steps=20",
            "--kill-rank",
            "1",
            "--kill-step",
            "3",
        ]
        procs.append(
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        )
    out0, err0 = procs[0].communicate(timeout=300)
    procs[1].communicate(timeout=60)
    assert procs[1].returncode == -9 and procs[0].returncode != 0
    assert "LOSSES" not in out0 and ("peer" in err0 or "Connection" in err0 or "DistributedDataParallel" in err0)


def test_profile_and_tensorboard_outputs(tmp_path):
    train("--config", "recipes/configs/debug_image.yaml", f"run_dir={tmp_path}", "--profile", "steps=5")
    assert list((tmp_path / "profile").glob("*.json")) and list((tmp_path / "tensorboard").iterdir())
    assert "Self CPU" in (tmp_path / "profile/ops.txt").read_text()  # the ops by their own time
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("mfu", "flops", "data_wait_fraction", "peak_mem_mb", "bad_samples", "grad_norm", "lr"):
        assert key in rec
    assert rec["flops"] > 0 and 0 < rec["mfu"] < 1  # FLOPs executed over a measured CPU peak


@pytest.mark.parametrize("modality", ["image", "video", "speech"])
def test_evaluate_after_training(tmp_path, modality):
    """Each modality is answered and scored by its own plug-in (video used to fall into the speech branch)."""
    cfg = f"recipes/configs/debug_{modality}.yaml"
    # video trains on a bf16 tower: evaluation reads it on the same bf16 tower (the training config's dtype)
    dtype = ["dtype=bfloat16"] if modality == "video" else []
    train("--config", cfg, f"run_dir={tmp_path}", "steps=2", "ckpt_every=2", *dtype)
    shards = {"image": "image", "video": "video", "speech": "audio"}[modality]
    ckpt = str(tmp_path / "checkpoints" / "step_00000002")
    argv = ["--config", cfg, "--checkpoint", ckpt, "--data", f"tests/assets/shards/{shards}/index.json"]
    r = _in_process([*argv, f"run_dir={tmp_path}", "--max-new-tokens", "3", *dtype], main=evaluate_main)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(re.findall(r"EVAL (\{.*\})", r.stdout)[-1])
    assert res["tower_dtype"] == ("bfloat16" if dtype else "float32")
    assert ({"wer", "cer"} <= set(res)) if modality == "speech" else ({"bleu", "cider", "exact_match"} <= set(res))
    assert res["n"] == {"image": 6, "video": 3, "speech": 5}[modality]
    # another modality's checkpoint is an error naming it, not a silent no-op
    if modality == "image":
        bad = [
            "--config",
            "recipes/configs/debug_speech.yaml",
            "--checkpoint",
            ckpt,
            "--data",
            "tests/assets/shards/audio/index.json",
            f"run_dir={tmp_path}",
        ]
        r = _in_process(bad, main=evaluate_main)
        assert r.returncode == 2 and "step_00000002" in r.stderr and "weights the model does not have" in r.stderr


def test_video_stage_trains_only_video_parts(tmp_path):
    losses, _ = train("--config", "recipes/configs/debug_video.yaml", f"run_dir={tmp_path}")
    assert len(losses) == 4

    keys = load_file(tmp_path / "checkpoints" / "step_00000004" / "adapter.safetensors").keys()
    assert keys and all(k.startswith(("video.aggregator.", "video.video_cross_attention_layers.")) for k in keys)


@pytest.mark.slow  # make test: 2 ranks x 2 == 1 rank x 4 on the global stream (test_elastic.py)
def test_two_processes_on_the_same_stream_equal_one(tmp_path):
    """data.split=none: every rank reads the same stream, so 2 ranks x batch 2 == 1 rank x batch 2."""
    cfg = "recipes/configs/debug_speech.yaml"
    launcher = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_port())]
    same, _ = train("--config", cfg, f"run_dir={tmp_path / 'same'}", "steps=3", "data.split=none", launcher=launcher)
    ref, _ = train("--config", cfg, f"run_dir={tmp_path / 'ref'}", "steps=3")
    assert same == pytest.approx(ref, rel=1e-6)


def test_activation_checkpointing_same_losses(tmp_path):
    losses, _ = train(
        "--config",
        "recipes/configs/debug_image.yaml",
        f"run_dir={tmp_path}",
        "steps=3",
        "activation_checkpointing=true",
    )
    assert losses == pytest.approx(GOLDEN_IMAGE[:3], abs=1e-3)


def test_speech_ctc_phase_then_token_loss_from_it(tmp_path):
    """The demo's two speech phases through the recipe: objective=aux trains only the CTC loss (the tower skipped,
    token rows unused: 2 processes with find_unused_parameters), then init_adapter= starts the token-loss run from
    that adapter; a file of another modality or layout is a config error naming the key."""
    base = ["--config", "recipes/configs/debug_speech.yaml", "model.speech.ctc_weight=1.0", "steps=4"]
    launcher = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_port())]
    ctc, _ = train(*base, f"run_dir={tmp_path / 'ctc'}", "objective=aux", launcher=launcher)
    assert len(ctc) == 4 and all(x > 0 for x in ctc) and ctc[-1] < ctc[0]
    first = tmp_path / "ctc/adapter.safetensors"
    lm, _ = train(*base, f"run_dir={tmp_path / 'lm'}", f"init_adapter={first}")
    fresh, _ = train(*base, f"run_dir={tmp_path / 'fresh'}")
    assert len(lm) == 4 and lm[0] != fresh[0]  # the token-loss run started from the CTC-phase adapter
    _, r = train(*base[:2], f"run_dir={tmp_path / 'bad'}", f"init_adapter={first}", check=False)
    assert r.returncode != 0 and "init_adapter" in r.stderr and "Traceback" not in r.stderr
    _, r = train(*base, f"run_dir={tmp_path / 'bad2'}", "objective=sideways", check=False)
    assert r.returncode != 0 and "objective" in r.stderr and "Traceback" not in r.stderr
