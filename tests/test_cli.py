"""Every user mistake is one clear line on stderr and exit code 2; skip mode counts instead."""

import json
import subprocess
import sys

import pytest

from herllm.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def tiny_args(tiny_model_dir, run_dir):
    return ["--model", str(tiny_model_dir), "--run-dir", str(run_dir), "--seq-len", "32",
            "--batch-size", "4", "--quiet"]  # fmt: skip


def write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("setup", "pattern"),
    [
        (lambda p: [str(p / "nope.txt")], "nope.txt does not exist"),
        (lambda p: [str(write(p / "b.txt", b"ab\x00cd"))], "looks binary"),
        (lambda p: [str(write(p / "l.txt", b"caf\xe9 ok"))], "is not valid UTF-8 (byte offset 3)"),
        (
            lambda p: [str(write(p / "m.jsonl", b'{"text": "a"}\n{broken\n'))],
            "m.jsonl:2: not valid JSON",
        ),
        (lambda p: [str(write(p / "e.txt", b"  \n\n"))], "the stream is empty"),
        (lambda p: [str(p / "d.txt"), "--train.nosuch", "1"], "unrecognized arguments"),
        (
            lambda p: [str(p / "d.txt"), "--set", "train.nosuch=1"],
            "unknown config key 'train.nosuch'",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, tiny_model_dir, capsys, setup, pattern):
    write(tmp_path / "d.txt", b"some fine text " * 50)
    argv = setup(tmp_path)
    with_model = ["adapt", *argv, *tiny_args(tiny_model_dir, tmp_path / "run")]
    try:
        code, _out, err = run_cli(capsys, *with_model)
    except SystemExit as exc:  # argparse errors exit 2 by themselves
        code, err = exc.code, capsys.readouterr().err
    assert code == 2
    assert pattern in err
    assert "Traceback" not in err
    assert len([line for line in err.strip().splitlines() if "error" in line]) == 1


@pytest.mark.parametrize(
    ("model", "pattern"),
    [
        ("{tmp}/empty_dir", "has no config.json"),
        ("{tmp}/missing_dir/", "does not exist"),
        ("nobody-here/no-such-model-xyz", "could not fetch model 'nobody-here/no-such-model-xyz'"),
    ],
)
def test_bad_model_is_one_line_exit_2(tmp_path, capsys, model, pattern, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "d.txt").write_text("text " * 40)
    code, _out, err = run_cli(capsys, "adapt", str(tmp_path / "d.txt"), "--model", model.format(tmp=tmp_path),
                              "--run-dir", str(tmp_path / "run"), "--quiet")  # fmt: skip
    assert code == 2, err
    assert pattern in err and "Traceback" not in err


def test_skip_mode_counts_and_reports(tmp_path, tiny_model_dir, capsys):
    src = tmp_path / "src"
    src.mkdir()
    write(src / "good.txt", ("useful text for the model. " * 30).encode())
    write(src / "bin.txt", b"\x00\x01\x02")
    write(src / "lines.jsonl", b'{"text": "fine line of text"}\nbroken\n')
    code, out, err = run_cli(capsys, "adapt", str(src), "--include", "*", "--on-bad-input", "skip",
                             *tiny_args(tiny_model_dir, tmp_path / "run"))  # fmt: skip
    assert code == 0, err
    assert "bad_inputs_skipped" in out and "│ 2" in out.split("bad_inputs_skipped")[1][:40]


def test_run_dir_inside_a_source_dir_is_refused(tmp_path, tiny_model_dir, capsys):
    write(tmp_path / "good.txt", b"text " * 40)
    code, _out, err = run_cli(
        capsys, "adapt", str(tmp_path), *tiny_args(tiny_model_dir, tmp_path / "run")
    )
    assert code == 2 and "is inside stream source" in err


def test_subprocess_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "herllm.cli", "adapt", str(tmp_path / "missing.txt"), "--quiet"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("herllm: error:") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_adapt_writes_run_dir_and_resume_continues(tmp_path, tiny_model_dir, capsys):
    write(
        tmp_path / "d.txt",
        ("\n\x1e\n".join(f"record {i}: " + "alpha beta gamma " * 12 for i in range(30))).encode(),
    )
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "adapt", str(tmp_path / "d.txt"), *tiny_args(tiny_model_dir, run),
                             "--max-steps", "3", "--eval", str(tmp_path / "d.txt"))  # fmt: skip
    assert code == 0, err
    assert (run / "config.yaml").is_file() and (run / "replay.sqlite").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 3]
    report = (run / "report" / "report.md").read_text()
    assert "## Held-out loss" in report and (run / "report" / "heldout.png").stat().st_size > 1000
    code, out, err = run_cli(capsys, "adapt", "--resume", str(run), "--max-steps", "5", "--quiet")
    assert code == 0, err
    from herllm.atomic import list_checkpoints

    assert [s for s, _ in list_checkpoints(run / "checkpoints")][-1] == 5
    code, _out, err = run_cli(
        capsys, "adapt", str(tmp_path / "d.txt"), *tiny_args(tiny_model_dir, run)
    )
    assert code == 2 and "already holds a run" in err


@pytest.mark.parametrize("command", ["adapt", "pretrain", "demo"])
def test_help_renders_every_generated_flag(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--" in out and "usage: herllm" in out
    if command == "adapt":
        assert "--train.lr" in out and "Peak learning rate" in out


def test_unreachable_hub_fails_fast_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    (tmp_path / "d.txt").write_text("text " * 40)
    code, _out, err = run_cli(capsys, "adapt", str(tmp_path / "d.txt"), "--model", "someorg/some-model",
                              "--run-dir", str(tmp_path / "run"), "--quiet")  # fmt: skip
    assert code == 2
    assert "127.0.0.1 is not reachable (no network)" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["bench", "pretrain", "generate", "ledger"])
def test_single_process_commands_refuse_a_multi_process_launch(
    command, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc_per_node 2 sets it
    argv = {"bench": ["bench", "--out", str(tmp_path / "b")], "pretrain": ["pretrain"],
            "generate": ["generate", "--run", str(tmp_path), "hello"], "ledger": ["ledger", str(tmp_path)]}[command]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"herllm: error: herllm {command} runs in one process, but the launcher started 2 "
        "(WORLD_SIZE=2); run it without torchrun or accelerate launch (only `herllm adapt` "
        "runs on several processes)"
    )
    assert not (tmp_path / "b").exists()
    monkeypatch.setenv("WORLD_SIZE", "1")  # a one-process launch is fine: the command runs
    assert main(["ledger", str(tmp_path / "nothing")]) == 2  # (and fails on its own terms)
    assert "runs in one process" not in capsys.readouterr().err
