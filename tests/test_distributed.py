"""The loop on two processes (torchrun, gloo DDP on CPU): ranks stay identical, the result matches
one process over the same global batch, a killed run resumes exactly, a mis-launch is refused.

The stream is two regions of documents that are each exactly one window long, so that rank r of 2
(documents r, r+2, ...) with batch 4 trains on the same windows per step as one process with
batch 8, and every window has the same number of loss tokens (so the mean of the two ranks' mean
losses is the one-process mean).
"""

import json
import os
import random
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from herllm.atomic import list_checkpoints
from herllm.config import build_config
from herllm.errors import UserError
from herllm.parallel.launch import check_world_size, fsdp_reshard
from herllm.run.learner import Learner
from herllm.strategies import strategy_overrides

SEQ = 32
# Tolerance of "two processes match one": float reduction order (a batch of 4 per rank vs 8,
# then DDP's mean of two means vs one mean) gives ~1e-7 relative differences per step, which
# Adam grows to the measured max |diff| of the adapter weights: 1.9e-6 on the first adapter
# (56 steps), 1.2e-4 to 4.5e-4 on the one grown at the shift (24 steps from a fresh Adam, whose first
# steps move near-zero-gradient elements by about the learning rate whatever their sign);
# see docs/scaling.md. A wrong average or an unsynchronised adapter is off by 1e-2 or more.
# The grown adapter re-warms here (train.rewarm_steps=20): at the full rate of 0.01 from its first
# step, those sign-sensitive steps move elements by up to the rate and the two runs differ by
# 6.1e-3, too close to a real fault to tell apart. With the re-warm: 4.5e-4 (2026-12-07).
MATCH_ATOL = 1e-3

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)


def exact_docs(tok, words: list[str], n: int, rng: random.Random) -> list[str]:
    """n documents of exactly SEQ tokens each ([bos] text [eos])."""
    docs = []
    while len(docs) < n:
        text = ""
        while len(tok(text, add_special_tokens=False)["input_ids"]) + 2 < SEQ:
            text += (" " if text else "") + rng.choice(words)
        if len(tok(text, add_special_tokens=False)["input_ids"]) + 2 == SEQ:
            docs.append(text)
    return docs


@pytest.fixture(scope="module")
def stream(tmp_path_factory, tiny_model_dir) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    root = tmp_path_factory.mktemp("dist")
    rng = random.Random(0)
    regions = {"1-words.txt": "river lamp ledger valley keeper window rain stone".split(),
               "2-code.txt": "def return class self push items append add".split()}  # fmt: skip
    src = root / "src"
    src.mkdir()
    for name, words in regions.items():
        (src / name).write_text("\n\x1e\n".join(exact_docs(tok, words, 160, rng)))
    (root / "heldout.txt").write_text("\n\x1e\n".join(exact_docs(tok, sum(regions.values(), []), 48, rng)))  # fmt: skip
    return root


def options(root: Path, batch: int) -> list[str]:
    """The protection-enabled strategy (her) with select=all, replay and general replay 1/4 each
    (so that the per-rank batch of 4 and the single batch of 8 both round to whole rows) and
    small cadences."""
    return [f"train.batch_size={batch}", f"select.score_batch_size={batch}", "select.policy=all",
            "replay.ratio=0.25", "replay.general_ratio=0.25", f"replay.general_sources=[{root / 'src' / '1-words.txt'}]",
            "replay.general_windows=64", f"stream.seq_len={SEQ}", "shift.warmup=50",
            "protect.reptile_every=20", "checkpoint.every_steps=10", "eval.every_steps=25",
            f"eval.files=[{root / 'heldout.txt'}]", "train.lr=0.01", "train.rewarm_steps=20"]  # fmt: skip


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "herllm.cli", "adapt", "--quiet", *args]  # fmt: skip


def accelerate_launch(*engine: str):
    """`accelerate launch ENGINE --num_processes 2 -m herllm.cli adapt ...` (on this CPU machine
    `--multi_gpu` only picks Accelerate's multi-process launcher; herllm then runs gloo DDP)."""

    def argv(*args: str) -> list[str]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return [sys.executable, "-m", "accelerate.commands.launch", *engine, "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(port), "-m", "herllm.cli", "adapt", "--quiet", *args]  # fmt: skip

    return argv


def adapt_argv(root: Path, model: Path, run: Path, launch=torchrun) -> list[str]:
    sets = [x for o in options(root, 4) for x in ("--set", o)]
    return launch(str(root / "src"), "--model", str(model), "--run-dir", str(run),
                  "--strategy", "her", *sets)  # fmt: skip


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def final(run: Path) -> dict:
    step, ckpt = list_checkpoints(run / "checkpoints")[-1]
    trainer = torch.load(ckpt / "trainer.pt", weights_only=False)
    with sqlite3.connect(run / "replay.sqlite") as db:
        rows = sorted(db.execute("SELECT doc_id, offset, times_replayed, last_score FROM rows"))
    return {
        "step": step,
        "weights": {  # every adapter's tensors, keyed by adapter folder and tensor name
            f"{f.parent.name}/{k}": v
            for f in sorted((ckpt / "adapters").glob("*/adapter_model.safetensors"))
            for k, v in load_file(str(f)).items()
        },
        "trainer": trainer,
        "rows": rows,
        "cursor": json.loads((ckpt / "cursor.json").read_text()),
    }


def grow_stop_resume(root: Path, model: Path, run: Path, launch, resume=None) -> dict:
    """The `her` run of `adapt_argv` launched by `launch`, stopped at step 60 (after the shift
    grew an adapter at step 56), resumed to the end by `resume` (default: the same launcher)."""
    argv = adapt_argv(root, model, run, launch) + ["--max-steps", "60"]
    subprocess.run(argv, env=env(), check=True, timeout=300)
    assert final(run)["trainer"]["bank"]["current"] == "a001"
    subprocess.run((resume or launch)("--resume", str(run), "--max-steps", "0"), env=env(),
                   check=True, timeout=300)  # fmt: skip
    return final(run)


def assert_ends_as(got: dict, ref: dict) -> None:
    """`got` ended where the uninterrupted run `ref` did, with its counters and weights."""
    assert got["step"] == ref["step"] and got["cursor"] == ref["cursor"]
    counters = ref["trainer"]["counters"]
    assert {k: got["trainer"]["counters"][k] for k in COUNTERS} == {
        k: counters[k] for k in COUNTERS
    }
    assert max_diff(got["weights"], ref["weights"]) < 1e-6


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and its workers (torchrun starts each worker in its own session, so
    killing the launcher's process group would leave them running)."""
    launcher = psutil.Process(proc.pid)
    workers = launcher.children(recursive=True)
    for p in [launcher, *workers]:
        p.kill()
    proc.wait()
    psutil.wait_procs(workers, timeout=30)
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


COUNTERS = ("windows_read", "tokens_streamed", "tokens_trained", "selected", "replayed",
            "general_replayed", "shifts", "consolidations", "reptile_steps")  # fmt: skip


def test_world_size_mismatch_is_a_user_error():
    check_world_size(2, {"WORLD_SIZE": "2"})
    check_world_size(1, {})
    check_world_size(4, {"OMPI_COMM_WORLD_SIZE": "4"})  # mpirun, as Accelerate reads it
    with pytest.raises(UserError, match=r"started 2 processes .* joined 1.*nproc_per_node 2"):
        check_world_size(1, {"WORLD_SIZE": "2"})


def test_deepspeed_config_is_read_checked_and_completed(tmp_path):
    from accelerate.utils import DistributedType

    from herllm.parallel.zero import requested, zero_config

    for off in ("", "0", "off"):  # nobody asked (or a resume turns it off): DDP
        assert requested(DistributedType.MULTI_CPU, off) is None
    assert requested(DistributedType.MULTI_GPU, "2")[0] == {"zero_optimization": {"stage": 2}}
    # `accelerate launch --use_deepspeed` on a CPU machine: Accelerate itself reports multi-CPU,
    # so its variables are read (and win over train.deepspeed)
    launched = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1",
                "ACCELERATE_GRADIENT_CLIPPING": "0.5"}  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        for k, v in launched.items():
            mp.setenv(k, v)
        user, where = requested(DistributedType.MULTI_CPU, "2")
    assert user["zero_optimization"]["stage"] == 1 and "Accelerate" in where
    cfg = zero_config(user, where, batch_size=4, grad_clip=1.0)
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 1
    assert cfg["gradient_clipping"] == 0.5  # the launcher's value wins over train.grad_clip
    assert "train_batch_size" not in cfg and cfg["zero_allow_untested_optimizer"]
    assert zero_config({"zero_optimization": {"stage": 2}}, "x", 4, 1.0)["gradient_clipping"] == 1.0
    # a JSON file given as train.deepspeed
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}))
    cfg = zero_config(*requested(DistributedType.MULTI_CPU, str(path)), 8, 1.0)
    assert cfg["zero_optimization"] == {"stage": 2}  # "auto" left to DeepSpeed's default
    refused = {
        "stage 3.*FSDP": {"zero_optimization": {"stage": 3}},
        "stage 0.*DDP": {"zero_optimization": {"stage": 0}},
        "bf16.*fp32": {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}},
        "offload_optimizer to cpu": {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
        "optimizer parameters \\['lr'\\].*builds its own": {"zero_optimization": {"stage": 1}, "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "eps": "auto"}}},
        "optimizer type SGD": {"zero_optimization": {"stage": 1}, "optimizer": {"type": "SGD"}},
        "scheduler type WarmupDecayLR": {"zero_optimization": {"stage": 1}, "scheduler": {"type": "WarmupDecayLR", "params": {}}},
        "gradient_accumulation_steps=4": {"zero_optimization": {"stage": 1}, "gradient_accumulation_steps": 4},
    }  # fmt: skip
    for match, user in refused.items():
        with pytest.raises(UserError, match=match) as err:
            zero_config(user, "in the Accelerate DeepSpeed config", 4, 1.0)
        assert "\n" not in str(err.value)
    # Accelerate's usual DeepSpeed config file: every value it leaves to the script is "auto"
    hf = {"fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"},
          "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
          "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"}},
          "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none", "nvme_path": None},
                                "overlap_comm": True, "reduce_bucket_size": "auto"},
          "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
          "train_micro_batch_size_per_gpu": "auto"}  # fmt: skip
    cfg = zero_config(hf, "in the Accelerate DeepSpeed config", 4, 1.0)
    assert "optimizer" not in cfg and "scheduler" not in cfg  # herllm's AdamW and warm-up
    assert cfg["zero_optimization"]["overlap_comm"] is True and cfg["gradient_clipping"] == 1.0
    for bad in ("4", str(tmp_path / "missing.json")):
        with pytest.raises(UserError, match="neither a ZeRO stage"):
            requested(DistributedType.MULTI_CPU, bad)
    path.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        requested(DistributedType.MULTI_CPU, str(path))


def test_accelerate_fsdp_options_are_read_or_refused():
    from accelerate.utils import FullyShardedDataParallelPlugin as Plugin

    assert fsdp_reshard(None, default=False) is False  # torchrun + train.fsdp: herllm's option
    assert fsdp_reshard(Plugin(fsdp_version=2), default=False) is True  # FSDP2's default
    assert fsdp_reshard(Plugin(fsdp_version=2, reshard_after_forward=False), True) is False
    shard_grad_op = Plugin(fsdp_version=1, sharding_strategy="SHARD_GRAD_OP")  # FSDP1's spelling
    no_shard = Plugin(fsdp_version=1, sharding_strategy="NO_SHARD")
    assert fsdp_reshard(shard_grad_op, default=True) is False
    refused = {
        "NO_SHARD.*plain DDP": no_shard,
        "CPU offload": Plugin(fsdp_version=2, cpu_offload=True),
        "mixed precision.*fp32": Plugin(fsdp_version=2, mixed_precision_policy="bf16"),
        "activation checkpointing": Plugin(fsdp_version=2, activation_checkpointing=True),
    }
    for match, plugin in refused.items():
        with pytest.raises(UserError, match=match) as err:
            fsdp_reshard(plugin, default=True)
        assert "\n" not in str(err.value)


def test_mixed_precision_and_two_engines_are_refused(monkeypatch):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from herllm.config import TrainConfig
    from herllm.parallel.ranks import Ranks

    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(var, raising=False)
    acc = SimpleNamespace(num_processes=2, process_index=0, device=torch.device("cpu"), state=SimpleNamespace(),
                          distributed_type=DistributedType.MULTI_CPU, mixed_precision="fp16")  # fmt: skip
    for engine, train in (
        ("FSDP", TrainConfig(fsdp=True)),
        ("DeepSpeed", TrainConfig(deepspeed="2")),
    ):
        with pytest.raises(
            UserError,
            match=f"mixed precision fp16 is not supported with {engine}.*--mixed_precision no",
        ):
            Ranks(acc, train)
    ranks = Ranks(acc, TrainConfig())  # DDP leaves mixed precision to Accelerate
    assert not ranks.sharded and ranks.zero is None
    acc.mixed_precision = "no"
    with pytest.raises(UserError, match="both FSDP and DeepSpeed.*choose one"):
        Ranks(acc, TrainConfig(fsdp=True, deepspeed="2"))
    assert Ranks(acc, TrainConfig(deepspeed="1")).zero["zero_optimization"]["stage"] == 1
    acc.num_processes = 1  # nothing to partition on one process: a plain run
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert Ranks(acc, TrainConfig(deepspeed="2")).zero is None


POISON = """import sys
import herllm.run.learner
from herllm.cli import main
real, done = herllm.run.learner.Learner.update, []
def update(self, new, replay, general):
    # once, at step 5, rank 1's gradient of one adapter tensor turns NaN (the loss stays finite)
    if self.s.step == 5 and self.s.ranks.rank == 1 and not done:
        done.append(1)
        hook = self.s.trainable[0].register_hook(lambda g: g * float("nan"))
        try:
            return real(self, new, replay, general)
        finally:
            hook.remove()
    return real(self, new, replay, general)
herllm.run.learner.Learner.update = update
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@needs_gloo
def test_deepspeed_zero1_with_si_and_a_nonfinite_gradient_matches_ddp(
    stream, tiny_model_dir, tmp_path
):
    """SI reads each step's whole gradient, which ZeRO partitions away, and the fall-back after a
    non-finite gradient writes the weights, which DeepSpeed's fp32 master copy would overwrite:
    under ZeRO-1 both give DDP's result (`her` with SI instead of MAS, growing one adapter)."""
    script = tmp_path / "poison.py"
    script.write_text(POISON)
    sets = [x for o in [*options(stream, 4), "protect.regularizers=[si]"] for x in ("--set", o)]
    runs = {}
    for name, extra in (("ddp", []), ("zero1", ["--set", "train.deepspeed=1"])):
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(script), "adapt", "--quiet", str(stream / "src"), "--model", str(tiny_model_dir),
                "--run-dir", str(tmp_path / name), "--strategy", "her", *sets, *extra]  # fmt: skip
        subprocess.run(argv, env=env(), check=True, timeout=300)
        runs[name] = final(tmp_path / name)
    ddp, zero1 = runs["ddp"], runs["zero1"]
    for run in (ddp, zero1):
        c = run["trainer"]["counters"]
        assert c["nonfinite_skipped"] == 1 and c["shifts"] == 1 and c["reptile_steps"] > 0
    assert [r["zero"]["stage"] for r in zero1["trainer"]["ranks"]] == [1, 1]
    assert {k: zero1["trainer"]["counters"][k] for k in COUNTERS} == {
        k: ddp["trainer"]["counters"][k] for k in COUNTERS
    }
    diff = max_diff(zero1["weights"], ddp["weights"])
    si = [r["trainer"]["protection"]["regs"]["si"] for r in (zero1, ddp)]
    gap = max(max_diff(si[0][k], si[1][k]) for k in ("importance", "omega"))
    print(f"ZeRO-1 vs DDP with SI: weights {diff:.3g}, SI importance and omega {gap:.3g}")
    assert si[0]["importance"] and si[0]["omega"]  # SI consolidated once, then kept integrating
    # Without the NaN the two runs are bit-equal. With it, one later step clips a gradient norm
    # of 3.37, which DeepSpeed sums from the ranks' partitions (3.3748085) and torch from whole
    # tensors (3.3748088): the runs part by ~1e-7 before the growth (7e-8 at step 30), and the
    # grown adapter's fresh Adam amplifies that (3.5e-6 at the end), hence MATCH_ATOL here.
    assert diff < MATCH_ATOL and gap < 1e-5


MISLAUNCH = """import sys
import herllm.run.build
from herllm.cli import main
real = herllm.run.build.Accelerator
# The mis-launch: an Accelerator not told it runs on CPU gives each torchrun worker a world of 1.
herllm.run.build.Accelerator = lambda **kw: real(**{**kw, "cpu": False})
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@needs_gloo
def test_mislaunched_run_stops_with_a_clear_error(stream, tiny_model_dir, tmp_path):
    script = tmp_path / "mislaunch.py"
    script.write_text(MISLAUNCH)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(script), "adapt", "--quiet", str(stream / "src"), "--model", str(tiny_model_dir),
            "--run-dir", str(tmp_path / "run")]  # fmt: skip
    out = subprocess.run(argv, env=env(), capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    errors = [x for x in out.stderr.splitlines() if x.startswith("herllm: error:")]
    assert errors  # the first rank to fail prints it; torchrun then stops the other
    assert "launcher started 2 processes (WORLD_SIZE=2) but Accelerate joined 1" in errors[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
@needs_gloo
def test_two_processes_match_one_and_resume_exactly(stream, tiny_model_dir, tmp_path):
    # Two processes, uninterrupted.
    two = tmp_path / "two"
    subprocess.run(adapt_argv(stream, tiny_model_dir, two), env=env(), check=True, timeout=300)
    ref = final(two)
    t = ref["trainer"]
    assert t["counters"]["shifts"] == 1 and t["counters"]["consolidations"] == 1
    assert t["counters"]["reptile_steps"] > 0
    # The shift grew an adapter on both ranks at the same step (a new DDP wrapper), and it trained.
    assert t["bank"]["current"] == "a001" and set(t["bank"]["adapters"]) == {"default", "a001"}
    assert any(k.startswith("a001/") and "lora_B" in k and float(v.abs().max()) > 0
               for k, v in ref["weights"].items())  # fmt: skip
    # Identical trainable weights and protection state on both ranks, at every checkpoint.
    digests = [r["digest"] for r in t["ranks"]]
    assert len(digests) == 2 and digests[0] == digests[1]
    # Each rank read its own documents: their parities (2 ranks) never mix.
    assert ref["cursor"]["world"] == 2 and len(ref["cursor"]["positions"]) == 2
    assert t["counters"]["windows_read"] == 320 == len(ref["rows"])  # every window, once

    # One process over the same global batch (8 = 2 x 4).
    cfg = build_config(None, [*strategy_overrides("her"), "strategy=her",
                              f"model.name_or_path={tiny_model_dir}", f"run_dir={tmp_path / 'one'}",
                              f"stream.sources=[{stream / 'src'}]", *options(stream, 8)])  # fmt: skip
    with Learner(cfg, show_progress=False) as one:
        summary = one.run()
    single = final(tmp_path / "one")
    assert single["step"] == ref["step"]
    for k in COUNTERS:
        assert single["trainer"]["counters"][k] == t["counters"][k], k
    assert [r[:2] for r in single["rows"]] == [r[:2] for r in ref["rows"]]
    diff = max_diff(single["weights"], ref["weights"])
    print(f"max |weight diff| one vs two processes: {diff:.3g}")
    assert diff < MATCH_ATOL
    evals = [[json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (two, tmp_path / "one")]  # fmt: skip
    assert [e["step"] for e in evals[0]] == [e["step"] for e in evals[1]] == [0, 25, 50, 75, 80]
    gaps = [abs(a["eval_nll"]["heldout.txt"] - b["eval_nll"]["heldout.txt"]) for a, b in zip(*evals, strict=True)]  # fmt: skip
    print(f"max |held-out NLL diff| one vs two processes: {max(gaps):.3g}")
    assert max(gaps) < 1e-4  # held-out loss, two ranks evaluating half of it each
    assert evals[1][-1]["eval_nll"] == summary.eval_last

    # Kill a two-process run after its first checkpoint, resume it under two processes.
    killed = tmp_path / "killed"
    proc = subprocess.Popen(adapt_argv(stream, tiny_model_dir, killed), env=env())
    deadline = time.time() + 240
    while not list_checkpoints(killed / "checkpoints") and time.time() < deadline:
        assert proc.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.05)
    time.sleep(0.5)  # somewhere past the first checkpoint
    kill_all(proc)
    first = list_checkpoints(killed / "checkpoints")[-1][0]
    assert 0 < first < ref["step"]
    subprocess.run(torchrun("--resume", str(killed)), env=env(), check=True, timeout=300)
    got = final(killed)
    assert_ends_as(got, ref)
    assert [r[:3] for r in got["rows"]] == [r[:3] for r in ref["rows"]]

    # Launched by `accelerate launch --multi_gpu` (the same DDP run), stopped after the shift
    # grew an adapter (step 56), resumed by torchrun: the bank, both adapters and a DDP wrapper
    # over the new one come back; the run ends as the uninterrupted one did.
    ddp = accelerate_launch("--multi_gpu")
    got = grow_stop_resume(stream, tiny_model_dir, tmp_path / "paused", ddp, torchrun)
    assert_ends_as(got, ref)

    # The same run under `accelerate launch --use_fsdp`: herllm shards the frozen base with FSDP2
    # (the adapters whole on each rank, their gradients averaged like DDP's); stopped after the
    # growth and resumed the same way. Each rank holds half of the base, and the result is the
    # DDP run's (the same sums in the same order: bit-equal here, checked within 1e-6).
    fsdp = accelerate_launch("--use_fsdp", "--fsdp_version", "2")
    got = grow_stop_resume(stream, tiny_model_dir, tmp_path / "fsdp", fsdp)
    shares = [r["sharded"] for r in got["trainer"]["ranks"]]
    assert shares[0]["base_params"] == shares[1]["base_params"] > 0
    assert sum(r["local_params"] for r in shares) == shares[0]["base_params"]
    assert max(r["local_params"] for r in shares) <= 0.55 * shares[0]["base_params"]
    assert all(r["sharded"] is None for r in t["ranks"])  # the DDP run held the whole base
    assert_ends_as(got, ref)

    # The same run under `accelerate launch --use_deepspeed --zero_stage 2`: a DeepSpeed engine
    # holds the adapters' optimizer state partitioned over the ranks (a new engine when the
    # adapter grew); stopped after the growth and resumed the same way. Each rank holds half of
    # the Adam state; gathered into the checkpoint it is AdamW's, and the result is DDP's.
    ds = accelerate_launch("--use_deepspeed", "--zero_stage", "2")
    got = grow_stop_resume(stream, tiny_model_dir, tmp_path / "zero2", ds)
    parts = [r["zero"] for r in got["trainer"]["ranks"]]
    assert [p["stage"] for p in parts] == [2, 2] and parts[0]["trainable_params"] > 0
    assert max(p["local_params"] for p in parts) <= 0.55 * parts[0]["trainable_params"]
    assert all(r["zero"] is None for r in t["ranks"])  # the DDP run's optimizer was whole
    assert_ends_as(got, ref)
    adam, ddp_adam = got["trainer"]["optimizer"], t["optimizer"]
    assert adam["state"].keys() == ddp_adam["state"].keys() and adam["state"]
    for i, st in adam["state"].items():
        assert float(st["step"]) == float(ddp_adam["state"][i]["step"])
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(st[k], ddp_adam["state"][i][k], atol=1e-6, rtol=0), (i, k)

    # A single-process checkpoint resumed under two processes (batch 8 -> 2 x 4): the rest of
    # the stream is sharded from its position, and the result is the one-process run's.
    grown = tmp_path / "grown"
    cfg = build_config(None, [*strategy_overrides("her"), "strategy=her",
                              f"model.name_or_path={tiny_model_dir}", f"run_dir={grown}",
                              f"stream.sources=[{stream / 'src'}]", *options(stream, 8),
                              "train.max_steps=30"])  # fmt: skip
    with Learner(cfg, show_progress=False) as part:
        part.run()
    more = ["--batch-size", "4", "--set", "select.score_batch_size=4", "--max-steps", "0"]
    subprocess.run(torchrun("--resume", str(grown), *more), env=env(), check=True, timeout=300)
    g = final(grown)
    assert g["cursor"]["world"] == 2 and g["cursor"]["base"] == 120  # 30 steps x 4 new windows
    assert {k: g["trainer"]["counters"][k] for k in COUNTERS} == {
        k: single["trainer"]["counters"][k] for k in COUNTERS
    }
    assert [r[:2] for r in g["rows"]] == [r[:2] for r in single["rows"]]
    diff = max_diff(g["weights"], single["weights"])
    print(f"max |weight diff| one process vs one resumed under two: {diff:.3g}")
    assert diff < MATCH_ATOL

    # A two-process checkpoint (step 60, after the growth) resumed under one process with the
    # same global batch: the two positions are re-dealt, and the rest of the stream is learned
    # once. The order of windows differs from both uninterrupted runs, so weights are not compared.
    shrunk = tmp_path / "shrunk"
    argv = adapt_argv(stream, tiny_model_dir, shrunk) + ["--max-steps", "60"]
    subprocess.run(argv, env=env(), check=True, timeout=300)
    cfg = build_config(str(shrunk / "config.yaml"), [f"run_dir={shrunk}", "train.max_steps=0",
                       "train.batch_size=8", "select.score_batch_size=8"])  # fmt: skip
    with Learner(cfg, resume=True, show_progress=False) as one:
        one.run()
    got = final(shrunk)
    assert got["cursor"]["world"] == 1 and got["cursor"]["base"] > 0
    assert got["step"] == ref["step"]
    for k in ("windows_read", "tokens_streamed", "tokens_trained", "selected"):
        assert got["trainer"]["counters"][k] == t["counters"][k], k
    assert [r[:2] for r in got["rows"]] == [r[:2] for r in ref["rows"]]  # every window, once


@pytest.mark.slow
@needs_gloo
def test_fsdp_keeps_forward_passes_in_step(stream, tiny_model_dir, tmp_path):
    """her's own defaults (uncertainty selection: the ranks need new windows at different times,
    so a rank often scores while the other has nothing to score) and a held-out file of 5
    batches (3 on one rank, 2 on the other): with a sharded base every forward is a collective,
    so the idle rank runs placeholder passes. The run must finish and equal the DDP run."""
    common = [str(stream / "src"), "--model", str(tiny_model_dir), "--strategy", "her",
              "--batch-size", "4", "--seq-len", str(SEQ), "--set", "select.score_batch_size=4",
              "--set", "shift.warmup=50", "--set", f"eval.files=[{stream / 'heldout.txt'}]",
              "--set", "eval.max_windows=40", "--set", "eval.every_steps=5"]  # fmt: skip
    runs = {}
    keep = ["--set", "train.fsdp=true", "--set", "train.fsdp_reshard_after_forward=false"]
    for name, extra in (("ddp", []), ("fsdp", ["--set", "train.fsdp=true"]), ("keep", keep)):
        runs[name] = tmp_path / name
        argv = torchrun(*common, "--run-dir", str(runs[name]), *extra)
        subprocess.run(argv, env=env(), check=True, timeout=300)
    ddp = final(runs["ddp"])
    # "keep": the gathered weights stay until the backward (reshard_after_forward=false); rank 0
    # saving alone must not put the ranks' gathers out of step (at every checkpoint and shift)
    for name in ("fsdp", "keep"):
        got = final(runs[name])
        assert got["trainer"]["ranks"][0]["sharded"] is not None
        assert got["trainer"]["counters"]["skipped_by_selection"] > 0  # ranks' needs differed
        assert got["trainer"]["counters"]["shifts"] > 0
        assert got["step"] == ddp["step"] and got["rows"] == ddp["rows"]
        assert max_diff(got["weights"], ddp["weights"]) < 1e-6
        evals = [(r / "metrics.jsonl").read_text().splitlines() for r in (runs["ddp"], runs[name])]
        assert len(evals[0]) == len(evals[1]) > 2
        for a, b in zip(*evals, strict=True):
            assert json.loads(a)["eval_nll"] == pytest.approx(json.loads(b)["eval_nll"], abs=1e-6)


@pytest.mark.slow
@needs_gloo
def test_unequal_shards_are_learned_to_the_end(stream, tiny_model_dir, tmp_path):
    """One long document puts far more windows in one rank's shard. The run goes on until every
    rank's shard is learned (the idle rank steps on a zero-weight placeholder), under DDP and
    FSDP: every window of the stream is read and trained, as on one process."""
    src = tmp_path / "src"
    src.mkdir()
    docs = (stream / "src" / "1-words.txt").read_text().split("\n\x1e\n")[:40]
    long_doc = " ".join(docs[:30])  # ~30 windows in one document, read by rank 0
    (src / "a.txt").write_text("\n\x1e\n".join([long_doc, *docs[30:]]))
    sets = [x for o in options(stream, 4) for x in ("--set", o)]
    got = {}
    for name, extra in (("ddp", []), ("fsdp", ["--set", "train.fsdp=true"])):
        run = tmp_path / name
        argv = torchrun(str(src), "--model", str(tiny_model_dir), "--run-dir", str(run),
                        "--strategy", "her", *sets, *extra)  # fmt: skip
        subprocess.run(argv, env=env(), check=True, timeout=300)
        got[name] = final(run)
    cfg = build_config(None, [*strategy_overrides("her"), "strategy=her",
                              f"model.name_or_path={tiny_model_dir}", f"run_dir={tmp_path / 'one'}",
                              f"stream.sources=[{src}]", *options(stream, 8)])  # fmt: skip
    with Learner(cfg, show_progress=False) as one:
        one.run()
    single = final(tmp_path / "one")
    for name, g in got.items():
        c, c1 = g["trainer"]["counters"], single["trainer"]["counters"]
        # every token of the stream read once (each rank packs its own documents into windows,
        # so window boundaries differ from one process's), every window kept once
        assert c["tokens_streamed"] == c1["tokens_streamed"], name
        assert len(g["rows"]) == len({r[:2] for r in g["rows"]}) == c["windows_read"], name
        # and trained: the run ended with no rank holding untrained windows
        assert c["selected"] == c["windows_read"], name
        assert all(r["pending"] == [] and r["stream_done"] for r in g["trainer"]["ranks"]), name
        assert g["step"] > single["step"], name  # the long shard took more (smaller) steps


@pytest.mark.slow
@needs_gloo
def test_step_scores_on_two_processes_match_one(stream, tiny_model_dir, tmp_path):
    """`select.scores=step`: each rank scores its own windows in its training step, and every
    rank's scores are gathered after it, so detection, the ledger and the buffer see the whole
    stream in its order, as on one process; with `replay.mode=replace` the windows a rank leaves
    out are scored by a pass. Two processes end where one does."""
    step = ["select.scores=step", "shift.reps=model", "replay.mode=replace"]
    two = tmp_path / "two"
    sets = [x for o in [*options(stream, 4), *step] for x in ("--set", o)]
    argv = torchrun(str(stream / "src"), "--model", str(tiny_model_dir), "--run-dir", str(two),
                    "--strategy", "her", *sets)  # fmt: skip
    subprocess.run(argv, env=env(), check=True, timeout=300)
    ref = final(two)
    c = ref["trainer"]["counters"]
    assert c["shifts"] == 1 and c["replaced_by_replay"] > 0 and c["tokens_scored"] > 0
    assert c["windows_read"] == c["selected"] == 320 == len(ref["rows"])  # every window, once
    cfg = build_config(None, [*strategy_overrides("her"), "strategy=her",
                              f"model.name_or_path={tiny_model_dir}", f"run_dir={tmp_path / 'one'}",
                              f"stream.sources=[{stream / 'src'}]", *options(stream, 8), *step])  # fmt: skip
    with Learner(cfg, show_progress=False) as one:
        one.run()
    single = final(tmp_path / "one")
    assert single["step"] == ref["step"]
    for k in (*COUNTERS, "replaced_by_replay"):
        assert single["trainer"]["counters"][k] == c[k], k
    assert [r[:2] for r in single["rows"]] == [r[:2] for r in ref["rows"]]
    assert max_diff(single["weights"], ref["weights"]) < MATCH_ATOL
