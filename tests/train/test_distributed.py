"""Data-parallel training with real processes (torchrun, gloo, 2 ranks) against one process.

Tolerance: 2 ranks compute the same sums as one process, but cut differently (per-rank partial
gradients added by the all-reduce, or rows of a micro-batch split between ranks), so float addition
happens in another order. In fp64 that leaves differences of a few ulps after 5 AdamW steps; 1e-10 is
far above them and far below any real difference (a dropped micro-batch or a wrong normalisation moves
the weights by 1e-3 or more).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kiln.distributed import World
from kiln.errors import ConfigError
from kiln.train.engine import StepSplit, TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distributed_cases as cases  # noqa: E402

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
TOLERANCE = 1e-10


def torchrun(case_list: list[dict], out: Path, nproc: int = 2) -> dict[int, dict]:
    spec = out / "cases.json"
    spec.write_text(json.dumps(case_list))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KILN_DIST_TIMEOUT": "60"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    done = subprocess.run(
        [*command, str(WORKER), str(spec), str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[:4000]
    return {rank: json.loads((out / f"rank{rank}.json").read_text()) for rank in range(nproc)}


def assert_same_weights(a: dict, b: dict, tolerance: float = TOLERANCE) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=tolerance), f"{name}: {(a[name] - b[name]).abs().max()}"


def assert_moved(a: dict, b: dict) -> None:
    """The comparison above can fail: runs that differ really do end apart."""
    assert max(float((a[n] - b[n]).abs().max()) for n in a) > 1e-4


BY_ACCUMULATION = {"batch_size": 2, "grad_accum": 2}  # each rank runs one whole micro-batch
BY_ROWS = {"batch_size": 4, "grad_accum": 1}  # each rank runs half of every micro-batch's rows


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """Every 2-process run the tests below compare, in one torchrun (it takes a few seconds to start).
    The runs resumed at 2 processes continue ones that one process saved, made first."""
    out = tmp_path_factory.mktemp("ranks")
    for name in ("one_to_3_then_two", "one_to_3_then_two_fsdp"):
        cases.run("windows", out / name, BY_ACCUMULATION | {"max_iters": 3})
    case_list = [
        {"name": "accumulation", "kind": "windows", "settings": BY_ACCUMULATION},
        {"name": "rows", "kind": "windows", "settings": BY_ROWS},
        {"name": "dropout", "kind": "windows", "settings": BY_ACCUMULATION | {"dropout": 0.2}},
        {"name": "sft", "kind": "examples", "settings": BY_ROWS},
        {"name": "two_to_3", "kind": "windows", "settings": BY_ACCUMULATION | {"max_iters": 3}},
        {"name": "two_to_6", "kind": "windows", "settings": BY_ACCUMULATION | {"max_iters": 6}},
        {
            "name": "one_to_3_then_two",
            "kind": "windows",
            "settings": BY_ACCUMULATION | {"max_iters": 6},
            "resume": True,
        },
        {"name": "fsdp", "kind": "windows", "settings": BY_ACCUMULATION | {"parallel": "fsdp"}},
        {
            "name": "one_to_3_then_two_fsdp",
            "kind": "windows",
            "settings": BY_ACCUMULATION | {"max_iters": 6, "parallel": "fsdp"},
            "resume": True,
        },
    ]
    return out, torchrun(case_list, out)


@pytest.mark.parametrize("split", ["accumulation", "rows"])
def test_two_ranks_give_one_process_s_weights_for_the_combined_batch(two_rank_runs, tmp_path, split):
    out, reports = two_rank_runs
    one = cases.run("windows", tmp_path / "one", BY_ACCUMULATION if split == "accumulation" else BY_ROWS)
    assert_same_weights(cases.saved_weights(out / split / "last"), one["weights"])
    assert reports[0][split]["losses"] == pytest.approx(one["losses"], rel=1e-12)
    assert_moved(one["weights"], cases.tiny_model().state_dict() | {})


def test_dropout_masks_follow_the_micro_batch_so_two_ranks_still_match(two_rank_runs, tmp_path):
    out, _ = two_rank_runs
    one = cases.run("windows", tmp_path / "one", BY_ACCUMULATION | {"dropout": 0.2})
    assert_same_weights(cases.saved_weights(out / "dropout" / "last"), one["weights"])
    no_dropout = cases.run("windows", tmp_path / "plain", BY_ACCUMULATION)
    assert_moved(one["weights"], no_dropout["weights"])


def test_ranks_read_disjoint_rows_that_together_are_what_one_process_reads(two_rank_runs, tmp_path):
    _, reports = two_rank_runs
    for split, settings in (("accumulation", BY_ACCUMULATION), ("rows", BY_ROWS)):
        seen = []
        cases.run("windows", tmp_path / split, settings, seen=seen)
        rank0, rank1 = reports[0][split]["seen"], reports[1][split]["seen"]
        # Per step: one process's rows = rank 0's then rank 1's (both splits keep the global order).
        per_rank = len(rank0) // 5
        for step in range(5):
            mine = [r for batch in rank0[step * per_rank : (step + 1) * per_rank] for r in batch]
            theirs = [r for batch in rank1[step * per_rank : (step + 1) * per_rank] for r in batch]
            ones = [r for batch in seen[step * len(seen) // 5 : (step + 1) * len(seen) // 5] for r in batch]
            assert sorted(mine + theirs) == sorted(ones) and len(mine) == len(theirs) == len(ones) // 2
            if split == "rows":
                assert not set(mine) & set(theirs)  # random windows could repeat only by chance


def test_masked_fine_tuning_under_two_ranks_gives_one_process_s_loss(two_rank_runs, tmp_path):
    out, reports = two_rank_runs
    one = cases.run("examples", tmp_path / "one", BY_ROWS)
    # Ranks hold different numbers of answer tokens: only a global normalisation makes these equal.
    assert reports[0]["sft"]["losses"] == pytest.approx(one["losses"], rel=1e-12)
    assert_same_weights(cases.saved_weights(out / "sft" / "last"), one["weights"])


def test_a_checkpoint_saved_by_two_processes_resumes_in_one_and_the_reverse(two_rank_runs, tmp_path):
    out, reports = two_rank_runs
    straight = cases.saved_weights(out / "two_to_6" / "last")
    shutil.copytree(out / "two_to_3", tmp_path / "resumed")
    resumed = cases.run("windows", tmp_path / "resumed", BY_ACCUMULATION | {"max_iters": 6}, resume=True)
    assert_same_weights(resumed["weights"], straight)
    assert resumed["losses"] == pytest.approx(reports[0]["two_to_6"]["losses"][3:], rel=1e-12)
    assert_same_weights(cases.saved_weights(out / "one_to_3_then_two" / "last"), straight)
    assert_moved(straight, cases.saved_weights(out / "two_to_3" / "last"))


def test_fsdp_trains_as_ddp_does_and_its_checkpoints_are_the_same_format(two_rank_runs, tmp_path):
    out, reports = two_rank_runs
    assert_same_weights(cases.saved_weights(out / "fsdp" / "last"), cases.saved_weights(out / "accumulation" / "last"))
    assert reports[0]["fsdp"]["losses"] == pytest.approx(reports[0]["accumulation"]["losses"], rel=1e-12)
    # Its last/ (gathered weights, optimizer state by name) resumes in one process, and one process's
    # checkpoint resumes under FSDP, both landing where the plain 6-step run does.
    shutil.copytree(out / "fsdp", tmp_path / "fsdp")
    resumed = cases.run("windows", tmp_path / "fsdp", BY_ACCUMULATION | {"max_iters": 6}, resume=True)
    straight = cases.saved_weights(out / "two_to_6" / "last")
    assert_same_weights(resumed["weights"], straight)
    assert_same_weights(cases.saved_weights(out / "one_to_3_then_two_fsdp" / "last"), straight)


def test_accumulating_two_micro_batches_of_two_equals_one_batch_of_four(tmp_path):
    accumulated = cases.run("windows", tmp_path / "a", {"batch_size": 2, "grad_accum": 2})
    whole = cases.run("windows", tmp_path / "b", {"batch_size": 4, "grad_accum": 1})
    assert_same_weights(accumulated["weights"], whole["weights"])
    assert accumulated["losses"] == pytest.approx(whole["losses"], rel=1e-12)


def test_the_split_of_a_step_over_ranks():
    rows = np.arange(8)
    by_accumulation = [StepSplit.plan(TrainConfig(batch_size=2, grad_accum=4), World(r, r, 2, 2)) for r in (0, 1)]
    assert [[list(r) for _, r in s.micro_rows(rows)] for s in by_accumulation] == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    by_rows = [StepSplit.plan(TrainConfig(batch_size=2, grad_accum=3), World(r, r, 2, 2)) for r in (0, 1)]
    assert [[list(r) for _, r in s.micro_rows(rows[:6])] for s in by_rows] == [[[0], [2], [4]], [[1], [3], [5]]]
    # The last, short step of an epoch: a rank with nothing left still takes part (with zero weight).
    assert [[list(r) for _, r in s.micro_rows(rows[:3])] for s in by_rows] == [[[0], [1], [2]], [[], [], []]]
    with pytest.raises(ConfigError, match="grad_accum 1 x batch_size 3 cannot be split over 2 processes"):
        StepSplit.plan(TrainConfig(batch_size=3), World(0, 0, 2, 2))
