"""The DDP engine under real launchers: accelerate (one and two 'machines' on 127.0.0.1), torchrun, and a
rank that dies (the survivor must fail with a clear error, not hang)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ddp_helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ["-m", "tests.integration.ddp_train_script"]  # run from the repository root
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MM_LLAMA_PG_TIMEOUT": "60"}


def results(stdout: str) -> list[dict]:
    # ranks share one stdout under torchrun: lines may interleave, so match the objects themselves
    return [json.loads(m) for m in re.findall(r"RESULT (\{[^{}]*\})", stdout)]


def check_consistent(res, world):
    assert sorted(r["rank"] for r in res) == list(range(world))
    assert all(r["world"] == world for r in res)
    assert len({round(r["checksum"], 9) for r in res}) == 1  # replicas identical after training


@pytest.mark.slow  # make test: the recipe through accelerate launch (test_demo.py, test_fsdp.py)
def test_accelerate_launch_multi_process_cpu():
    cmd = [
        str(BIN / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        str(free_port()),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        *SCRIPT,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    check_consistent(results(r.stdout), 2)


@pytest.mark.slow  # make test: two accelerate launchers on 127.0.0.1 in test_fsdp.py
def test_accelerate_two_machines_on_localhost():
    port = free_port()
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
            *SCRIPT,
        ]
        procs.append(
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
        )
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    check_consistent(results(outs[0][0]) + results(outs[1][0]), 2)


def test_torchrun_two_processes():
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), *SCRIPT, "--steps", "3"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    check_consistent(results(r.stdout), 2)


def test_dead_rank_surfaces_as_error_not_hang():
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {
            **ENV,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "MM_LLAMA_PG_TIMEOUT": "30",
        }
        cmd = [sys.executable, *SCRIPT, "--steps", "50", "--die-rank", "1", "--die-step", "2"]
        procs.append(
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        )
    # no hang: the survivor fails within its collective timeout (30 s), far inside communicate's bound
    out0, err0 = procs[0].communicate(timeout=240)
    procs[1].communicate(timeout=60)
    assert procs[1].returncode == -9
    assert procs[0].returncode != 0
    assert "RESULT" not in out0
    assert "DistributedDataParallel" in err0 or "Connection" in err0 or "peer" in err0, err0[-3000:]
