"""The weight average (``train.ema_decay``) against a hand computation; test_resume checks that a run deploys it
and resumes it exactly."""

from __future__ import annotations

import torch
from torch import nn

from vlmdistill.ema import StudentEMA


def _tiny() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 1, bias=False), nn.BatchNorm1d(1))


def test_ema_update_matches_hand_computation() -> None:
    student = _tiny()
    with torch.no_grad():
        student[0].weight.fill_(1.0)
    ema = StudentEMA(student, decay=0.2)
    # decays min(0.2, (1+n)/(10+n)) for n = 0, 1, 2: 0.1, 2/11, then capped at 0.2
    expected, avg = [], 1.0
    for value, decay in ((3.0, 0.1), (5.0, 2 / 11), (-1.0, 0.2)):
        with torch.no_grad():
            student[0].weight.fill_(value)
            student[1].running_mean.fill_(value * 10)
        ema.update(student)
        avg = decay * avg + (1 - decay) * value
        expected.append(avg)
        assert torch.allclose(ema.model[0].weight, torch.full((1, 2), avg)), (value, avg)
        assert float(ema.model[1].running_mean) == value * 10  # buffers are copied, not averaged
    assert expected == [0.1 * 1 + 0.9 * 3, 2 / 11 * 2.8 + 9 / 11 * 5, 0.2 * expected[1] + 0.8 * -1.0]
    assert ema.updates == 3
    assert not any(p.requires_grad for p in ema.model.parameters())
