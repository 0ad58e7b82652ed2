"""Contract tests for the persistent replay buffer, driven by one table of policy cases."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from herllm.memory.replay import BufferItem, BufferRow, ReplayBuffer

# One row per policy: every contract test below runs for each.
CASES = {
    "reservoir": {"policy": "reservoir"},
    "priority": {"policy": "priority", "alpha": 1.0},
}
policy_case = pytest.mark.parametrize("case", list(CASES), ids=list(CASES))


def _items(start: int, n: int, length: int = 16) -> list[BufferItem]:
    """Deterministic items: item i has doc 'd{i}', offset i and tokens i..i+length."""
    return [
        BufferItem(f"d{i}", i, np.arange(i, i + length), np.arange(length) % 3 != 0)
        for i in range(start, start + n)
    ]


def _scores(start: int, n: int) -> list[float]:
    return [float(1 + (i * 7) % 13) for i in range(start, start + n)]


def _buf(path: Path, case: str, capacity: int = 20, seed: int = 0) -> ReplayBuffer:
    return ReplayBuffer(path, capacity, seed=seed, **CASES[case])


def _ids(rows: list[BufferRow]) -> list[int]:
    return [r.row_id for r in rows]


def _script(buf: ReplayBuffer, start_batch: int, n_batches: int) -> list[list[int]]:
    """A fixed sequence of add/sample/update_scores ops; returns the sampled row ids."""
    out = []
    for b in range(start_batch, start_batch + n_batches):
        buf.add(_items(8 * b, 8), _scores(8 * b, 8), step=b)
        rows = buf.sample(5)
        buf.update_scores(_ids(rows), [float(b % 5)] * len(rows))
        out.append(_ids(rows))
    return out


@policy_case
def test_capacity_never_exceeded(tmp_path: Path, case: str) -> None:
    buf = _buf(tmp_path / "b.sqlite", case, capacity=20)
    for b in range(10):
        buf.add(_items(8 * b, 8), _scores(8 * b, 8), step=b)
        assert len(buf) <= 20
        assert len(buf.sample(100)) == len(buf)
    c = buf.counters()
    assert len(buf) == 20 and c["offered"] == 80
    assert c["added"] - c["evicted"] == 20 and c["added"] < 80


@policy_case
def test_persistence_across_reopen(tmp_path: Path, case: str) -> None:
    path = tmp_path / "b.sqlite"
    buf = _buf(path, case)
    empty_bytes = buf.size_bytes
    buf.add(_items(0, 12), _scores(0, 12), step=3)
    buf.commit(np.int64(3))  # numpy integers are accepted as steps
    assert buf.size_bytes > empty_bytes
    before = buf.counters()
    buf.close()
    again = ReplayBuffer.open(path)
    assert again.committed_step == 3 and len(again) == 12 and again.counters() == before
    assert (again.capacity, again.policy) == (20, CASES[case]["policy"])
    rows = {r.row_id: r for r in again.sample(12)}
    assert sorted(rows) == list(range(12))
    assert rows[5].doc_id == "d5" and rows[5].offset == 5 and rows[5].step_first_seen == 3
    np.testing.assert_array_equal(rows[5].input_ids, np.arange(5, 21, dtype=np.int32))
    assert rows[5].input_ids.dtype == np.int32 and rows[5].last_score == _scores(5, 1)[0]


@policy_case
def test_uncommitted_rows_roll_back_on_close(tmp_path: Path, case: str) -> None:
    path = tmp_path / "b.sqlite"
    buf = _buf(path, case)
    buf.add(_items(0, 4), _scores(0, 4), step=0)
    buf.commit(0)
    buf.add(_items(4, 4), _scores(4, 4), step=1)
    buf.sample(2)
    buf.close()  # no commit: a crash
    again = _buf(path, case)
    assert len(again) == 4 and again.committed_step == 0
    assert all(r.times_replayed == 1 for r in again.sample(4))  # the lost sample left no trace


@policy_case
def test_uncommitted_rows_roll_back_after_kill(tmp_path: Path, case: str) -> None:
    path = tmp_path / "b.sqlite"
    buf = _buf(path, case)
    buf.add(_items(0, 4), _scores(0, 4), step=0)
    buf.commit(7)
    buf.close()
    kw = CASES[case]
    code = (
        "import os, numpy as np\n"
        "from herllm.memory.replay import BufferItem, ReplayBuffer\n"
        f"b = ReplayBuffer({str(path)!r}, 20, seed=0, **{kw!r})\n"
        "b.add([BufferItem('x', 0, np.arange(4))] * 5, [1.0] * 5, step=8)\n"
        "b.sample(3)\n"
        "os._exit(0)\n"  # dies holding the open transaction, no cleanup
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    again = _buf(path, case)
    assert len(again) == 4 and again.committed_step == 7 and again.counters()["offered"] == 4


@policy_case
def test_crash_and_resume_gives_identical_samples(tmp_path: Path, case: str) -> None:
    clean = _buf(tmp_path / "clean.sqlite", case, seed=3)
    expected = _script(clean, 0, 4)
    clean.commit(4)
    expected += _script(clean, 4, 4)

    crashy = _buf(tmp_path / "crash.sqlite", case, seed=3)
    got = _script(crashy, 0, 4)
    crashy.commit(4)
    lost = _script(crashy, 4, 3)  # work after the checkpoint, then crash
    crashy.close()
    resumed = ReplayBuffer.open(tmp_path / "crash.sqlite")
    assert resumed.committed_step == 4
    got += _script(resumed, 4, 4)  # redo from the checkpoint
    assert got == expected
    assert lost == expected[4:7]
    assert resumed.counters() == clean.counters()


@policy_case
def test_sample_is_deterministic_given_seed(tmp_path: Path, case: str) -> None:
    runs = [
        _script(_buf(tmp_path / f"{s}-{i}.sqlite", case, seed=s), 0, 5)
        for i, s in enumerate([1, 1, 2])
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@policy_case
def test_times_replayed_increments(tmp_path: Path, case: str) -> None:
    buf = _buf(tmp_path / "b.sqlite", case)
    buf.add(_items(0, 3), _scores(0, 3), step=0)
    assert [r.times_replayed for r in buf.sample(3)] == [1, 1, 1]
    assert [r.times_replayed for r in buf.sample(3)] == [2, 2, 2]
    assert buf.counters()["sampled"] == 6


@policy_case
def test_loss_mask_round_trips(tmp_path: Path, case: str) -> None:
    path = tmp_path / "b.sqlite"
    buf = _buf(path, case)
    mask = np.array(
        [True, False, False, True, True, False, True, False, True]
    )  # not a byte multiple
    buf.add(
        [BufferItem("m", 0, np.arange(9), mask), BufferItem("n", 0, np.arange(9))],
        [1.0, 1.0],
        step=0,
    )
    buf.commit(0)
    buf.close()
    rows = {r.doc_id: r for r in ReplayBuffer.open(path).sample(2)}
    np.testing.assert_array_equal(rows["m"].loss_mask, mask)
    assert rows["m"].loss_mask.dtype == bool and rows["n"].loss_mask is None


@policy_case
def test_empty_and_oversized_sample(tmp_path: Path, case: str) -> None:
    buf = _buf(tmp_path / "b.sqlite", case)
    assert buf.sample(4) == [] and len(buf) == 0
    buf.add(_items(0, 3), _scores(0, 3), step=0)
    assert sorted(_ids(buf.sample(10))) == [0, 1, 2]


@policy_case
def test_readonly_sees_only_committed_and_never_writes(tmp_path: Path, case: str) -> None:
    path = tmp_path / "b.sqlite"
    writer = _buf(path, case)
    writer.add(_items(0, 4), _scores(0, 4), step=0)
    writer.commit(0)
    writer.add(_items(4, 4), _scores(4, 4), step=1)  # not committed yet
    reader = ReplayBuffer.open(path, readonly=True, seed=11)
    assert len(reader) == 4 and sorted(_ids(reader.sample(10))) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="read-only"):
        reader.add(_items(9, 1), [1.0], step=0)
    writer.commit(1)
    reader.refresh()
    assert len(reader) == 8 and reader.committed_step == 1
    writer.close()
    reader.close()
    # The reader's draws left no trace; a reader also opens a file no writer holds.
    assert all(r.times_replayed == 0 for r in ReplayBuffer.open(path, readonly=True).sample(8))


@policy_case
def test_second_writer_and_bad_arguments_are_clear_errors(tmp_path: Path, case: str) -> None:
    path = tmp_path / "b.sqlite"
    buf = _buf(path, case)
    with pytest.raises(ValueError, match="open for writing elsewhere"):
        _buf(path, case)
    with pytest.raises(ValueError, match="1 items but 2 scores"):
        buf.add(_items(0, 1), [1.0, 2.0], step=0)
    with pytest.raises(ValueError, match="finite"):
        buf.add(_items(0, 1), [float("nan")], step=0)
    with pytest.raises(ValueError, match="2 row_ids but 1 scores"):
        buf.update_scores([0, 1], [1.0])
    buf.close()
    with pytest.raises(ValueError, match="capacity=30 but .* was created with capacity=20"):
        ReplayBuffer(path, 30, **CASES[case])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"capacity": 0}, "capacity must be a positive int"),
        (
            {"capacity": 4, "policy": "fifo"},
            r"unknown policy 'fifo'; use one of \('reservoir', 'priority'\)",
        ),
        ({"capacity": 4, "alpha": -1.0}, "alpha must be"),
    ],
)
def test_constructor_rejects_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ReplayBuffer(tmp_path / "b.sqlite", **kwargs)
    assert not (tmp_path / "b.sqlite").exists()


def test_not_a_buffer_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("this is not a database, just some text that is long enough " * 20)
    with pytest.raises(ValueError, match="cannot open .*notes.txt.* as a SQLite replay buffer"):
        ReplayBuffer(bad, 4)
    with pytest.raises(ValueError, match="not a replay buffer"):
        ReplayBuffer.open(bad)
    with pytest.raises(ValueError, match="no buffer file"):
        ReplayBuffer.open(tmp_path / "missing.sqlite")


def test_reservoir_keeps_a_uniform_sample_of_the_stream(tmp_path: Path) -> None:
    """Stored stream positions are uniform over the whole stream (FIFO would keep only the tail)."""
    n, cap, bins = 4000, 200, 8
    buf = ReplayBuffer(tmp_path / "r.sqlite", cap, "reservoir", seed=1234)
    for b in range(0, n, 100):
        buf.add(_items(b, 100, length=2), [0.0] * 100, step=b)
    kept = np.array([r.offset for r in buf.sample(cap)])
    counts = np.bincount(kept * bins // n, minlength=bins)
    expected = cap / bins
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 24.3, counts  # chi-square, 7 dof, p = 0.001
    assert abs(kept.mean() - n / 2) < 0.1 * n
    # Algorithm R admits about cap * (1 + ln(n / cap)) items.
    assert abs(buf.counters()["added"] - cap * (1 + np.log(n / cap))) < 0.1 * cap * (
        1 + np.log(n / cap)
    )


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_priority_sampling_frequency_follows_scores(tmp_path: Path, alpha: float) -> None:
    buf = ReplayBuffer(tmp_path / "p.sqlite", 4, "priority", seed=5, alpha=alpha)
    scores = np.array([1.0, 2.0, 3.0, 4.0])
    buf.add(_items(0, 4, length=2), scores.tolist(), step=0)
    draws = 4000
    counts = np.bincount([buf.sample(1)[0].row_id for _ in range(draws)], minlength=4)
    expected = scores**alpha / (scores**alpha).sum()
    np.testing.assert_allclose(counts / draws, expected, atol=0.03)


def test_priority_k_draws_are_distinct_and_favour_high_scores(tmp_path: Path) -> None:
    buf = ReplayBuffer(tmp_path / "p.sqlite", 64, "priority", seed=2)
    scores = [100.0 if i < 8 else 0.01 for i in range(64)]
    buf.add(_items(0, 64, length=2), scores, step=0)
    for _ in range(20):
        ids = _ids(buf.sample(8))
        assert len(set(ids)) == 8
        assert sum(i < 8 for i in ids) >= 6  # 8 rows hold ~99.9% of the mass


def test_update_scores_changes_priority_sampling(tmp_path: Path) -> None:
    path = tmp_path / "p.sqlite"
    buf = ReplayBuffer(path, 10, "priority", seed=0)
    buf.add(_items(0, 10, length=2), [1.0] * 10, step=0)
    buf.update_scores([7], [1000.0])
    assert sum(buf.sample(1)[0].row_id == 7 for _ in range(200)) > 190
    buf.update_scores([7, 3], [0.0, 1000.0])
    assert sum(buf.sample(1)[0].row_id == 3 for _ in range(200)) > 190
    assert buf.counters()["score_updates"] == 3
    buf.commit(1)
    buf.close()
    # The sum-tree is rebuilt from stored scores on open.
    again = ReplayBuffer.open(path)
    assert sum(again.sample(1)[0].row_id == 3 for _ in range(200)) > 190


def test_priority_evicts_lowest_score_when_full(tmp_path: Path) -> None:
    buf = ReplayBuffer(tmp_path / "p.sqlite", 4, "priority", seed=0)
    buf.add(_items(0, 4, length=2), [5.0, 0.5, 3.0, 4.0], step=0)
    offered = 4
    while not buf.add(_items(offered, 1, length=2), [9.0], step=1):  # admitted w.p. 4/offered
        offered += 1
    kept = sorted(r.offset for r in buf.sample(4))
    assert kept == [0, 2, 3, offered]  # offset 1 had the lowest score
    assert buf.counters()["evicted"] == 1 and buf.counters()["offered"] == offered + 1


def test_priority_sampling_and_eviction_across_index_blocks(tmp_path: Path) -> None:
    """Capacity 300 spans several index blocks; mass and the minimum sit in different ones."""
    buf = ReplayBuffer(tmp_path / "p.sqlite", 300, "priority", seed=9)
    scores = np.full(300, 0.0)
    scores[[10, 70, 150, 290]] = [1.0, 2.0, 3.0, 4.0]
    scores[scores == 0] = 0.5e-9  # ~zero mass, all above the minimum below
    scores[222] = 0.0
    buf.add(_items(0, 300, length=2), scores.tolist(), step=0)
    draws = 4000
    counts = np.bincount([buf.sample(1)[0].row_id for _ in range(draws)], minlength=300)
    np.testing.assert_allclose(counts[[10, 70, 150, 290]] / draws, [0.1, 0.2, 0.3, 0.4], atol=0.03)
    assert counts.sum() == draws
    offered = 300
    while not buf.add(_items(offered, 1, length=2), [9.0], step=1):  # until one is admitted
        offered += 1
    kept = {r.offset for r in buf.sample(300)}
    assert 222 not in kept and offered in kept and len(kept) == 300


def test_priority_sample_with_mass_on_one_row_stays_distinct(tmp_path: Path) -> None:
    path = tmp_path / "p.sqlite"
    buf = ReplayBuffer(path, 100, "priority", seed=4, alpha=2.0)
    buf.add(_items(0, 100, length=2), [1e6] + [1.0] * 99, step=0)
    for _ in range(5):
        ids = _ids(buf.sample(10))
        assert len(set(ids)) == 10 and 0 in ids
    # The temporary zeroing of chosen rows is undone: row 0 still dominates single draws.
    assert all(buf.sample(1)[0].row_id == 0 for _ in range(20))
