"""The state registry: components register once, and checkpoints, snapshots, rollback and the
rank digest read it; old checkpoints load or are refused in one line."""

import pytest
import torch

from herllm.atomic import list_checkpoints
from herllm.cli import main
from herllm.errors import UserError
from herllm.run.stateful import FORMAT, Field, StateRegistry


class Box:
    def __init__(self, v=0):
        self.v = v

    def state_dict(self):
        return {"v": self.v}

    def load_state_dict(self, state):
        self.v = state["v"]


def test_round_trip_in_registration_order_with_flags():
    order = []

    class Logged(Box):
        def load_state_dict(self, state):
            order.append(state["v"])
            super().load_state_dict(state)

    a, b, holder = Logged(1), Logged(2), Box(3)
    r = StateRegistry()
    r.register("a", a, snapshot=True)
    r.register("b", b, per_rank=True, digest=True)
    r.register("n", Field(holder, "v"))
    r.register("absent", None)
    state = r.state_dict()
    assert state == {"a": {"v": 1}, "b": {"v": 2}, "n": 3, "absent": None}
    assert r.names(snapshot=True) == ["a"] and r.names(per_rank=True) == ["b"]
    assert r.names(digest=True) == ["b"]
    a.v, b.v, holder.v = 10, 20, 30
    r.load_state_dict(state)
    assert (a.v, b.v, holder.v) == (1, 2, 3) and order == [1, 2]


def test_names_are_registered_once_and_format_and_ranks_are_reserved():
    r = StateRegistry()
    r.register("a", Box())
    for name in ("a", "format", "ranks"):
        with pytest.raises(ValueError, match="registered twice"):
            r.register(name, Box())


def test_a_missing_required_component_is_one_line_an_optional_one_keeps_its_state():
    r = StateRegistry()
    r.register("a", Box(1))
    r.register("late", Box(5), required=False)
    r.load_state_dict({"a": {"v": 2}})  # an older checkpoint without `late`
    assert r.entries["late"].component.v == 5 and r.entries["a"].component.v == 2
    with pytest.raises(UserError, match="has no 'a' state .*older herllm") as e:
        r.load_state_dict({"late": {"v": 1}}, where="checkpoint X")
    assert "\n" not in str(e.value) and "checkpoint X" in str(e.value)


def test_a_newer_format_is_refused_and_a_saved_none_is_not_loaded():
    r = StateRegistry()
    box = Box(7)
    r.register("a", box)
    with pytest.raises(UserError, match="newer herllm"):
        r.load_state_dict({"format": FORMAT + 1, "a": {"v": 1}})
    r.load_state_dict({"a": None})  # the saving run had no such component
    assert box.v == 7


def _adapt(tmp_path, tiny_model_dir, *extra):
    src = tmp_path / "notes.txt"
    src.write_text("\n\x1e\n".join(f"note {i}: the river carries the lamp" * 6 for i in range(12)))
    return main(["adapt", str(src), "--model", str(tiny_model_dir), "--run-dir",
                 str(tmp_path / "run"), "--seq-len", "32", "--batch-size", "4", "--quiet",
                 "--strategy", "replay", *extra])  # fmt: skip


def test_a_checkpoint_without_format_loads_one_missing_a_component_is_refused(
    tmp_path, tiny_model_dir, capsys
):
    assert _adapt(tmp_path, tiny_model_dir, "--max-steps", "3") == 0
    run = tmp_path / "run"
    _, ckpt = list_checkpoints(run / "checkpoints")[-1]
    state = torch.load(ckpt / "trainer.pt", weights_only=False)
    assert state["format"] == FORMAT and set(state) >= {"bank", "optimizer", "rng", "ledger"}
    del state["format"]  # as written before the registry (round 1)
    torch.save(state, ckpt / "trainer.pt")
    assert main(["adapt", "--resume", str(run), "--max-steps", "5", "--quiet"]) == 0
    _, ckpt = list_checkpoints(run / "checkpoints")[-1]
    state = torch.load(ckpt / "trainer.pt", weights_only=False)
    assert state["step"] == 5
    del state["ledger"]
    torch.save(state, ckpt / "trainer.pt")
    capsys.readouterr()
    assert main(["adapt", "--resume", str(run), "--max-steps", "7", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no 'ledger' state" in err and len(err.splitlines()) == 1
