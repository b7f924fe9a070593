"""bench.py's timing harness: the interleaved order, the paired ratio and its spread, and what a case's step does."""
import numpy as np
import pytest
import torch

from bench import Case, interleaved_seconds, paired_ratio, time_group
from model import build_model


def test_interleaved_rounds_reverse_the_order_every_round():
    calls = []
    steps = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    times = interleaved_seconds(steps, torch.device("cpu"), rounds=4)
    assert "".join(calls) == "abccbaabccba"
    assert {name: len(t) for name, t in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(t >= 0 for ts in times.values() for t in ts)


def test_paired_ratio_is_the_median_of_per_round_ratios_and_half_their_interquartile_range():
    rng = np.random.default_rng(0)
    denominator = rng.uniform(0.5, 2.0, 31)
    ratios = rng.uniform(1.0, 3.0, 31)
    median, spread = paired_ratio(list(denominator * ratios), list(denominator))
    q1, q3 = np.percentile(ratios, [25, 75], method="weibull")  # Python's statistics.quantiles' default method
    assert median == pytest.approx(np.median(ratios))
    assert spread == pytest.approx((q3 - q1) / 2)
    # a ratio of medians would differ: rounds are paired, a slow round slows both of its steps alike
    assert median != pytest.approx(np.median(denominator * ratios) / np.median(denominator))


def weights_of(case: Case) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in case.net.parameters()]).clone()


@pytest.mark.parametrize("train", [True, False])
def test_a_train_case_steps_the_optimizer_and_an_inference_case_changes_nothing(train):
    torch.manual_seed(0)
    case = Case(build_model("fcn32", 19, pretrained=False), 1, (64, 64), torch.device("cpu"), amp=False, train=train)
    before = weights_of(case)
    case()
    assert not torch.equal(weights_of(case), before) if train else torch.equal(weights_of(case), before)


def test_a_timed_group_names_each_case_and_reports_its_median_step():
    specs = [("fcn32", "infer", lambda: build_model("fcn32", 19, pretrained=False), 2, (32, 64), False, False)]
    rows, times = time_group(specs, torch.device("cpu"), warmup=1, rounds=3)
    assert list(times) == ["fcn32 infer 2x32x64"] and len(times["fcn32 infer 2x32x64"]) == 3
    row, = rows
    assert row["ms"] == pytest.approx(1000 * np.median(times["fcn32 infer 2x32x64"]))
    assert row["img_per_s"] == pytest.approx(2000 / row["ms"]) and row["peak_mb"] > 0
