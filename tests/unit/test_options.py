"""Every numeric option of every command is checked before any work starts: a bad value exits 2 with one line
naming the option and its range (mm_llama/options.py holds the one table of ranges)."""

import pytest

from mm_llama.cli import main
from mm_llama.options import RANGES

SAMPLING = [("--max-new-tokens", "-3"), ("--max-new-tokens", "0"), ("--temperature", "-1"), ("--temperature", "nan")]
SAMPLING += [("--top-p", "0"), ("--top-p", "1.5"), ("--seed", "-1"), ("--max-new-tokens", "many")]
CASES = [
    *[(["caption"], o, v) for o, v in [*SAMPLING, ("--frames", "0")]],
    *[(["asr"], o, v) for o, v in SAMPLING],
    *[(["ask"], o, v) for o, v in [*SAMPLING, ("--frames", "0")]],
    *[(["chat"], o, v) for o, v in SAMPLING],
    *[(["generate"], o, v) for o, v in [*SAMPLING, ("--top-k", "-1")]],
    (["demo"], "--max-new-tokens", "0"),
    *[(["serve"], o, v) for o, v in [("--timeout", "-1"), ("--timeout", "0"), ("--workers", "0")]],
    *[(["serve"], o, v) for o, v in [("--max-upload-mb", "0"), ("--port", "70000"), ("--frames", "0")]],
    *[(["plan"], o, v) for o, v in [("--gpus", "0"), ("--gpu-mem", "0"), ("--seq-len", "-5"), ("--seq-len", "0")]],
    *[(["shards", "write", "x.jsonl", "--out", "o"], o, v) for o, v in [("--maxcount", "0"), ("--maxsize-mb", "0")]],
    (["shards", "verify", "x.tar"], "--video-frames", "0"),
    (["data", "preview", "--config", "c.yaml"], "--n", "0"),
]


@pytest.mark.parametrize(("command", "option", "value"), CASES, ids=lambda x: " ".join(x) if isinstance(x, list) else x)
def test_bad_values_exit_2_naming_the_option(command, option, value, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, option, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert option in err[0] and "error:" in err[0] and "Traceback" not in err[0]


def test_ranges_accept_their_edges():
    assert RANGES["top_p"]("1") == 1.0 and RANGES["temperature"]("0") == 0.0 and RANGES["port"]("0") == 0
