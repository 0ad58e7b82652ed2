"""One writer per run directory: a second learner, or a command writing checkpoints, is refused
with one line while a learner holds the run; a killed holder frees it at once."""

from __future__ import annotations

import pytest

from herllm.config import build_config
from herllm.errors import UserError
from herllm.run.learner import Learner
from herllm.run.lock import LOCK_FILE, RunLock
from herllm.run.rollback import rollback


def _cfg(tiny_model_dir, text_corpus, run):
    return build_config(None, [f"model.name_or_path={tiny_model_dir}", f"run_dir={run}",
                               f"stream.sources=[{text_corpus}]", "stream.seq_len=16",
                               "train.max_steps=2", "eval.files=[]"])  # fmt: skip


def test_a_second_learner_on_the_same_run_is_refused_until_the_first_closes(
    tiny_model_dir, text_corpus, tmp_path
):
    run = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, text_corpus, run)
    with Learner(cfg, show_progress=False) as first:
        first.run()
        with pytest.raises(UserError, match="earlier Learner of this process that was not closed"):
            Learner(cfg, resume=True, show_progress=False)
        assert first.s.step == 2
    with Learner(cfg, resume=True, show_progress=False) as again:  # free once closed
        assert again.s.step == 2


def test_commands_that_write_checkpoints_wait_for_no_learner(tmp_path, hold_run):
    run = tmp_path / "run"
    with hold_run(run) as pid:
        with pytest.raises(UserError, match=rf"pid {pid}, .*stop the learner first"):
            rollback(run, "unit-0001")
    with pytest.raises(UserError, match="ledger.jsonl does not exist"):  # free: the command runs
        rollback(run, "unit-0001")


def test_a_holder_killed_with_sigkill_frees_the_run_at_once(tmp_path, hold_run):
    with hold_run(tmp_path) as pid:
        with pytest.raises(UserError, match=f"pid {pid}"):
            RunLock(tmp_path, "x").acquire()
    RunLock(tmp_path, "x").acquire().release()  # hold_run ended with SIGKILL
    assert (tmp_path / LOCK_FILE).exists()
