"""`parallel.tower=fsdp` through the recipe: the frozen tower sharded with FSDP2 (mm_llama/engine/shard.py), the
adapters on our engine. N ranks x batch B/N with the tower sharded == 1 rank x batch B unsharded, for image, video
and speech, on 2 and 4 processes; each rank holds 1/N of the tower; a 2-"machine" hybrid run (two launchers on
127.0.0.1) shards within a machine and replicates across."""

import re
import subprocess
from pathlib import Path

import pytest
import torch

from tests.integration.test_train import BIN, ENV, ROOT, TRAIN, _port, train

RESIDENT = re.compile(r"tower weights ([\d.]+) MB of ([\d.]+) MB on this rank \(([\d.]+); mesh (\w+) \(([\d, ]+)\)\)")


def _resident(stderr: str) -> tuple[float, str, str]:
    m = RESIDENT.search(stderr)
    assert m, stderr[-2000:]
    return float(m.group(3)), m.group(4), m.group(5)


_REFERENCE: dict[str, tuple] = {}


def reference(modality: str, tmp_path) -> tuple[list[float], Path]:
    """1 process, batch 4, the tower unsharded: 3 steps (losses, run folder; computed once per modality)."""
    if modality not in _REFERENCE:
        cfg = f"recipes/configs/debug_{modality}.yaml"
        losses, _ = train("--config", cfg, f"run_dir={tmp_path / 'one'}", "steps=3", "data.batch_size=4")
        _REFERENCE[modality] = losses, tmp_path / "one"
    return _REFERENCE[modality]


@pytest.mark.parametrize("modality", ["image", "video", "speech"])
def test_sharded_tower_equals_one_unsharded_process(tmp_path, modality):
    """2 and 4 ranks with the tower sharded == 1 rank unsharded, same global batch. The 4-rank run also shards the
    adapters' blocks (`parallel.adapters=fsdp`: FSDP2 reduce-scatters their gradients, our engine the rest) and
    recomputes the tower layers in backward (activation checkpointing over FSDP2 units)."""
    cfg = f"recipes/configs/debug_{modality}.yaml"
    one, one_dir = reference(modality, tmp_path)
    for n, extra in ((2, []), (4, ["activation_checkpointing=true", "parallel.adapters=fsdp"])):
        launcher = [str(BIN / "torchrun"), "--nproc_per_node", str(n), "--master_port", str(_port())]
        sharded, r = train("--config", cfg, f"run_dir={tmp_path / f'fsdp{n}'}", "steps=3", f"data.batch_size={4 // n}",
                           "data.split=interleave", "parallel.tower=fsdp", *extra, launcher=launcher)  # fmt: skip
        assert sharded == pytest.approx(one, rel=1e-5), (n, sharded, one)
        fraction, layout, shape = _resident(r.stderr)
        assert fraction == pytest.approx(1 / n, rel=0.02) and layout == "flat" and shape == f"{n},"
    if modality != "image":
        return
    # checkpoints stay adapter-only (no tower weight, no DTensor) and match the unsharded run's trained weights
    from safetensors.torch import load_file

    ref = load_file(one_dir / "adapter.safetensors")
    for n in (2, 4):  # 4: its sharded blocks gathered whole into the file
        got = load_file(tmp_path / f"fsdp{n}" / "adapter.safetensors")
        assert ref.keys() == got.keys() and not any(k.startswith("tower.") for k in got)
        for k in ref:
            assert torch.allclose(got[k], ref[k], rtol=1e-4, atol=1e-6), (n, k)


def test_sharded_adapters_resume_exactly(tmp_path):
    """`parallel.adapters=fsdp`: each rank saves its optimizer shard; a run stopped at step 2 and resumed gives the
    uninterrupted run's losses bitwise; gradient accumulation (no_sync reaches FSDP2's units too) matches."""
    base = ["--config", "recipes/configs/debug_image.yaml", "steps=4", "ckpt_every=2", "parallel.tower=fsdp",
            "parallel.adapters=fsdp", "data.batch_size=1", "optim.grad_accum=2"]  # fmt: skip

    def launcher():
        return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_port())]

    full, _ = train(*base, f"run_dir={tmp_path / 'full'}", launcher=launcher())
    first, _ = train(*base, f"run_dir={tmp_path / 'cut'}", "stop_after=2", launcher=launcher())
    files = sorted(p.name for p in (tmp_path / "cut" / "checkpoints" / "step_00000002").iterdir())
    assert "optimizer_rank0.pt" in files and "optimizer_rank1.pt" in files
    resumed, r = train(*base, f"run_dir={tmp_path / 'cut'}", launcher=launcher())
    assert "resume: from" in r.stderr and resumed == full and first == full[:2]


def test_two_machines_on_localhost_hybrid_mesh(tmp_path):
    """Two launchers (2 'machines' x 2 processes) on 127.0.0.1 with the shipped accelerate file's layout: the tower
    sharded within each machine (1/2 per rank), replicated across machines; same losses as 1 process x batch 4."""
    cfg = "recipes/configs/debug_image.yaml"
    one, _ = reference("image", tmp_path)
    port = _port()
    procs = []
    for machine_rank in (0, 1):
        cmd = [str(BIN / "accelerate"), "launch", "--config_file", "recipes/launch/accelerate_multinode.yaml",
               "--num_machines", "2", "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(port), "--num_processes", "4", TRAIN, "--config", cfg,
               f"run_dir={tmp_path / 'two'}", "steps=3", "data.batch_size=1", "data.split=interleave",
               "parallel.tower=fsdp", "parallel.mesh=hybrid"]  # fmt: skip
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                      env=ENV))  # fmt: skip
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    losses = [float(x) for x in re.findall(r"LOSSES \[([^\]]*)\]", outs[0][0])[-1].split(",")]
    assert losses == pytest.approx(one, rel=1e-5)
    fraction, layout, shape = _resident(outs[0][1])
    assert fraction == pytest.approx(0.5, rel=0.02) and layout == "hybrid" and shape == "2, 2"


def test_bad_parallel_values_name_the_key(tmp_path, capsys):
    from recipes.train import main

    assert main(["--config", "recipes/configs/debug_image.yaml", "parallel.tower=zero3"]) == 2
    assert "parallel.tower" in capsys.readouterr().err
    assert main(["--config", "recipes/configs/debug_image.yaml", f"run_dir={tmp_path}", "parallel.adapters=fsdp"]) == 2
    assert "parallel.adapters=fsdp needs parallel.tower=fsdp" in capsys.readouterr().err
    assert not (tmp_path / "config.yaml").exists()  # stopped before the run wrote anything
