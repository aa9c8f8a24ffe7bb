"""`parallel.tower=fsdp` through the recipe: the frozen tower sharded with FSDP2 (mm_llama/engine/shard.py), the
adapters on our engine. N ranks x batch B/N with the tower sharded == 1 rank x batch B unsharded, for image, video
and speech, on 2 and 4 processes; each rank holds 1/N of the tower; a 2-"machine" hybrid run (two launchers on
127.0.0.1) shards within a machine and replicates across."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from recipes.train import main
from tests.integration.test_train import BIN, ENV, ROOT, TRAIN, _port, train

RESIDENT = re.compile(r"tower weights ([\d.]+) MB of ([\d.]+) MB on this rank \(([\d.]+); mesh (\w+) \(([\d, ]+)\)\)")


def _resident(stderr: str) -> tuple[float, str, str]:
    m = RESIDENT.search(stderr)
    assert m, stderr[-2000:]
    return float(m.group(3)), m.group(4), m.group(5)


_REFERENCE: dict[str, tuple] = {}


def reference(modality: str, tmp_path, accum: int = 1) -> tuple[list[float], Path]:
    """1 process, 4 samples per step (`accum` micro-batches), the tower unsharded: 3 steps (losses, run folder;
    computed once per modality and accumulation)."""
    if (modality, accum) not in _REFERENCE:
        cfg = f"recipes/configs/debug_{modality}.yaml"
        run = tmp_path / f"one{accum}"
        batch = [f"data.batch_size={4 // accum}", f"optim.grad_accum={accum}", "ckpt_every=2", "data.split=interleave"]
        losses, _ = train("--config", cfg, f"run_dir={run}", "steps=3", *batch)
        _REFERENCE[modality, accum] = losses, run
    return _REFERENCE[modality, accum]


@pytest.mark.parametrize(
    "modality,ranks",
    [
        ("image", (2,)),
        ("video", (2,)),
        ("speech", (2,)),
        pytest.param("image", (4,), marks=pytest.mark.slow),
        pytest.param("video", (4,), marks=pytest.mark.slow),
        pytest.param("speech", (4,), marks=pytest.mark.slow),
    ],
)
def test_sharded_tower_equals_one_unsharded_process(tmp_path, modality, ranks):
    # long: one set of sharded runs checked against the unsharded reference, then resumed on 2 ranks and elastically
    """2 and 4 ranks with the tower sharded == 1 rank unsharded, same global batch, the adapters' blocks sharded too
    (`parallel.adapters=fsdp`: FSDP2 reduce-scatters their gradients, our engine the rest); the 4-rank runs also
    recompute tower layers and adapter blocks in backward (activation checkpointing over FSDP2 units), as the video
    2-rank run does. `make test` runs each modality at 2 ranks; `make test-slow` adds 4 ranks. Image, 2 ranks:
    2 accumulated micro-batches of 1 (no_sync reaches FSDP2's units), then stopped at step 2 and resumed from its
    checkpoint (the optimizer state saved with torch.distributed.checkpoint): the same losses bitwise, and the same
    checkpoint resumed on 1 process, and the 1-process reference's checkpoint resumed on 2 sharded ranks (elastic
    resume with parallel.adapters=fsdp), within fp32 rounding."""
    cfg = f"recipes/configs/debug_{modality}.yaml"
    one, one_dir = reference(modality, tmp_path)
    image2 = ["data.batch_size=1", "optim.grad_accum=2", "parallel.adapters=fsdp", "ckpt_every=2"]
    runs = {
        2: {
            "image": image2,
            "video": ["data.batch_size=2", "parallel.adapters=fsdp", "activation_checkpointing=true"],
        }.get(modality, ["data.batch_size=2", "parallel.adapters=fsdp"]),
        4: ["data.batch_size=1", "activation_checkpointing=true", "parallel.adapters=fsdp"],
    }
    losses = {}
    for n in ranks:
        extra = runs[n]
        args = ["--config", cfg, "steps=3", "data.split=interleave", "parallel.tower=fsdp", *extra]
        losses[n], r = train(*args, f"run_dir={tmp_path / f'fsdp{n}'}", launcher=_torchrun(n))
        # accumulated micro-batches sum the gradients in another order: compared with 1 process accumulating alike
        want = reference(modality, tmp_path, accum=2)[0] if "optim.grad_accum=2" in extra else one
        assert losses[n] == pytest.approx(want, rel=1e-5), (n, losses[n], want)
        fraction, layout, shape = _resident(r.stderr)
        assert fraction == pytest.approx(1 / n, rel=0.02) and layout == "flat" and shape == f"{n},"
    if modality != "image":
        return
    # checkpoints stay adapter-only (no tower weight, no DTensor) and match the unsharded run's trained weights

    for n in ranks:  # sharded blocks gathered whole into the file
        ref = load_file((reference(modality, tmp_path, accum=2)[1] if n == 2 else one_dir) / "adapter.safetensors")
        got = load_file(tmp_path / f"fsdp{n}" / "adapter.safetensors")
        assert ref.keys() == got.keys() and not any(k.startswith("tower.") for k in got)
        for k in ref:
            assert torch.allclose(got[k], ref[k], rtol=1e-4, atol=1e-6), (n, k)
    if 2 not in ranks:
        return
    # stopped at step 2 and resumed: each rank saved its optimizer shard; the uninterrupted run's losses, bitwise
    args = ["--config", cfg, "steps=3", "data.split=interleave", "parallel.tower=fsdp", *image2]
    first, _ = train(*args, f"run_dir={tmp_path / 'cut'}", "stop_after=2", launcher=_torchrun(2))
    ckpt = tmp_path / "cut" / "checkpoints" / "step_00000002"
    files = sorted(p.name for p in ckpt.iterdir())  # torch.distributed.checkpoint: metadata + each rank's shards
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= set(files) and "train_state.pt" in files
    elastic = tmp_path / "elastic"  # the same checkpoint on 1 process: the shards read back whole
    (elastic / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "cut" / "config.yaml", elastic)
    shutil.copytree(ckpt, elastic / "checkpoints" / ckpt.name)
    resumed, r = train(*args, f"run_dir={tmp_path / 'cut'}", launcher=_torchrun(2))
    assert "resume: from" in r.stderr and resumed == losses[2] and first == losses[2][:2]
    one_rank, r = train(*args, f"run_dir={elastic}", "data.batch_size=2")  # the global batch kept: 1 x 2 x 2
    assert f"resume: from {elastic}" in r.stderr and one_rank == pytest.approx(losses[2], rel=1e-5)
    # and 1 -> 2: the one-process reference's step-2 checkpoint (whole optimizer state) on 2 ranks, sharded
    ref_losses, ref_run = reference(modality, tmp_path, accum=2)
    grown = tmp_path / "grown"
    (grown / "checkpoints").mkdir(parents=True)
    shutil.copy(ref_run / "config.yaml", grown)
    shutil.copytree(ref_run / "checkpoints" / "step_00000002", grown / "checkpoints" / "step_00000002")
    two_ranks, r = train(*args, f"run_dir={grown}", "ckpt_every=2", launcher=_torchrun(2))
    assert "resume: from" in r.stderr and two_ranks == pytest.approx(ref_losses, rel=1e-5)


def _torchrun(n: int) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", str(n), "--master_port", str(_port())]


def test_two_machines_on_localhost_hybrid_mesh(tmp_path):
    """Two launchers (2 'machines' x 2 processes) on 127.0.0.1 with the shipped accelerate file's layout: the tower
    sharded within each machine (1/2 per rank), replicated across machines; same losses as 1 process x batch 4."""
    cfg = "recipes/configs/debug_image.yaml"
    one, _ = reference("image", tmp_path)
    port = _port()
    procs = []
    for machine_rank in (0, 1):
        cmd = [
            str(BIN / "accelerate"),
            "launch",
            "--config_file",
            "recipes/launch/accelerate_multinode.yaml",
            "--num_machines",
            "2",
            "--machine_rank",
            str(machine_rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            str(port),
            "--num_processes",
            "4",
            TRAIN,
            "--config",
            cfg,
            f"run_dir={tmp_path / 'two'}",
            "steps=3",
            "data.batch_size=1",
            "data.split=interleave",
            "parallel.tower=fsdp",
            "parallel.mesh=hybrid",
        ]
        procs.append(
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
        )
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    losses = [float(x) for x in re.findall(r"LOSSES \[([^\]]*)\]", outs[0][0])[-1].split(",")]
    assert losses == pytest.approx(one, rel=1e-5)
    fraction, layout, shape = _resident(outs[0][1])
    assert fraction == pytest.approx(0.5, rel=0.02) and layout == "hybrid" and shape == "2, 2"


def test_bad_parallel_values_name_the_key(tmp_path, capsys):
    assert main(["--config", "recipes/configs/debug_image.yaml", "parallel.tower=zero3"]) == 2
    assert "parallel.tower" in capsys.readouterr().err
    assert main(["--config", "recipes/configs/debug_image.yaml", f"run_dir={tmp_path}", "parallel.adapters=fsdp"]) == 2
    assert "parallel.adapters=fsdp needs parallel.tower=fsdp" in capsys.readouterr().err
    assert main(["--config", "recipes/configs/debug_image.yaml", "parallel.tower=fsdp", "engine=torch"]) == 2
    assert "needs engine=ours" in capsys.readouterr().err
    assert not (tmp_path / "config.yaml").exists()  # stopped before the run wrote anything


def test_tower_read_shard_by_shard_equals_the_tower_read_whole(tmp_path):
    """`parallel.tower=fsdp` with a tower from files: each rank builds it on the meta device and reads only the rows
    it keeps (an HF folder in several safetensors shards, q/k rows in HF's rotary order); the losses equal one process
    that read it whole."""
    shape = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2)
    cfg = transformers.LlamaConfig(vocab_size=49152, num_hidden_layers=3, tie_word_embeddings=False, **shape)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf", safe_serialization=True, max_shard_size="4MB")
    args = [
        "--config",
        "recipes/configs/debug_speech.yaml",
        "steps=2",
        "data.split=interleave",
        f"tower.path={tmp_path / 'hf'}",
    ]
    whole, _ = train(*args, f"run_dir={tmp_path / 'whole'}", "data.batch_size=2")
    rows, r = train(
        *args, f"run_dir={tmp_path / 'rows'}", "data.batch_size=1", "parallel.tower=fsdp", launcher=_torchrun(2)
    )
    assert "tower read shard by shard" in r.stderr and "MB on this rank" in r.stderr
    assert rows == pytest.approx(whole, rel=1e-5)
