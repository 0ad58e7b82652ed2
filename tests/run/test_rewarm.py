"""The rate after what trains changes: `train.rewarm_steps`, kept through a checkpoint."""

import torch

from herllm.config import TrainConfig
from herllm.parallel.engine import Engine, make_optimizer


def lr(engine) -> float:
    return engine.optimizer.param_groups[0]["lr"]


def test_a_rebuild_trains_at_the_full_rate_unless_asked_to_rewarm():
    model = torch.nn.Linear(4, 4)
    start = Engine(TrainConfig(lr=0.01, warmup_steps=10), model, ranks=None)
    assert abs(lr(start) - 0.001) < 1e-12  # the run's own warm-up: 1/10 of the rate
    start.rebuild()  # default rewarm_steps=0
    assert abs(lr(start) - 0.01) < 1e-12
    rewarm = Engine(TrainConfig(lr=0.01, warmup_steps=10, rewarm_steps=4), model, ranks=None)
    rewarm.rebuild()
    assert abs(lr(rewarm) - 0.0025) < 1e-12


def test_the_warm_up_length_is_restored_with_the_scheduler():
    params = [torch.nn.Parameter(torch.zeros(2))]
    train = TrainConfig(lr=0.01, warmup_steps=20)
    opt, sched = make_optimizer(train, params, warmup=4)
    opt.step()
    sched.step()  # step 1 of 4: 2/4 of the rate
    state = sched.state_dict()
    opt2, sched2 = make_optimizer(train, params)  # what a resume builds first: 20 steps
    sched2.load_state_dict(state)
    assert sched2.lr_lambdas[0].steps == 4
    opt2.step()
    sched2.step()
    assert abs(opt2.param_groups[0]["lr"] - 0.0075) < 1e-12  # step 2 of 4, not of 20
