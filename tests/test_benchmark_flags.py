"""The benchmarks' count flags refuse a count below 1 while parsing: exit 2, naming the flag."""

import argparse
import sys

import pytest

from moe.benchmarks import flags, gpu_check, op_profile, train_speed


def test_positive_int_takes_counts_and_refuses_the_rest():
    assert flags.positive_int("1") == 1 and flags.positive_int("20") == 20
    for text, words in (("0", "must be at least 1, got 0"), ("-3", "must be at least 1, got -3"),
                        ("2.5", "expected an integer, got '2.5'")):
        with pytest.raises(argparse.ArgumentTypeError, match=words):
            flags.positive_int(text)


def _train_speed_parse(argv):
    sys.argv = ["train_speed", *argv]
    train_speed.main()


@pytest.mark.parametrize("parse, flag", [
    (gpu_check.parse_args, "--steps"),
    (op_profile.parse_args, "--steps"),
    (_train_speed_parse, "--startup_runs"),  # refused before any child process starts
])
def test_every_count_flag_refuses_zero(parse, flag, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # restored after _train_speed_parse
    with pytest.raises(SystemExit) as exit_info:
        parse([flag, "0"])
    assert exit_info.value.code == 2
    assert f"argument {flag}: must be at least 1, got 0" in capsys.readouterr().err
