"""`fxopt pipeline`: options reach the pipeline, bad input is one error line (exit 2)."""

from __future__ import annotations

import pytest

from fxopt.cli import main


@pytest.mark.parametrize("argv, message", [
    (["pipeline", "no_such_model"], "unknown model 'no_such_model'"),
    (["pipeline", "motionnet", "--latency-ratio", "1.0,1.5"], "latency ratio 1.5 must be a number in (0, 1]"),
    (["pipeline", "motionnet", "--precision", "int4"], "precision 'int4'"),
    (["pipeline", "safety_supervisor", "--finetune-steps", "-1"], "finetune_steps must be >= 0"),
    (["pipeline", "safety_supervisor", "--device", "cuda:9"], "device='cuda:9'"),
])
def test_bad_input_is_one_error_line(argv, message, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unparsable_ratio_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["pipeline", "motionnet", "--latency-ratio", "fast"])
    assert exit_info.value.code == 2
    assert "expected numbers joined by commas" in capsys.readouterr().err


@pytest.mark.slow
def test_motionnet_end_to_end_then_a_rerun_from_the_cache(tmp_path, capsys):
    argv = ["pipeline", "motionnet", "--latency-ratio", "1.0,0.7", "--train-steps", "20", "--finetune-steps", "10",
            "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "r070_xavier_int8:" in first and "category_miou" in first and "nodes: 10 ran, 0 from the cache" in first
    assert main(argv) == 0
    assert "nodes: 0 ran, 10 from the cache" in capsys.readouterr().out
    assert (tmp_path / "run" / "report.html").stat().st_size > 10_000
