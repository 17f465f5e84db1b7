"""Majority-class baseline, chance, the noise rule and the zero-shot details table, on hand-made results."""

import math

import pytest

from llmprune.evaluation.baselines import (MIN_EXAMPLES, NOISY_STDERR, chance_rate, is_noisy, majority_share,
                                           no_better_than_majority, notes)
from llmprune.evaluation.harness import results_markdown, zero_shot_details
from llmprune.reporting import results_table


def _entry(acc, n, *, majority=None, chance=None, available=3270):
    se = math.sqrt(acc * (1 - acc) / (n - 1))  # lm-eval's acc_stderr
    return {"acc": acc, "acc_stderr": se, "n": n, "n_available": available, "metric": "acc",
            "majority_baseline": majority, "chance": chance}


def test_majority_share_and_chance_by_hand():
    assert majority_share([1, 1, 0, 1, 0]) == pytest.approx(3 / 5)
    assert majority_share([2, 0, 1, 3, 2, 2, 0, 1]) == pytest.approx(3 / 8)
    assert majority_share([]) is None
    assert chance_rate([2, 2, 2]) == pytest.approx(0.5)
    assert chance_rate([4, 4, 3, 5]) == pytest.approx((1 / 4 + 1 / 4 + 1 / 3 + 1 / 5) / 4)
    assert chance_rate([]) is None


def test_noise_rule():
    # BoolQ, first 50: acc 78 % -> stderr sqrt(.78 * .22 / 49) = 5.9 points: noisy.
    small = _entry(0.78, 50)
    assert small["acc_stderr"] == pytest.approx(0.0592, abs=1e-4) and is_noisy(small)
    # 2,000 examples at 50 %: stderr 1.1 points, not noisy; 400 at 50 %: 2.5 points, noisy.
    assert not is_noisy(_entry(0.5, 2000))
    assert is_noisy(_entry(0.5, 400)) and _entry(0.5, 400)["acc_stderr"] > NOISY_STDERR
    # fewer than MIN_EXAMPLES is noisy even with a zero standard error (0 of 8 right)
    assert is_noisy({**_entry(0.5, 8), "acc": 0.0, "acc_stderr": 0.0}) and 8 < MIN_EXAMPLES
    # the whole task (RTE: 277 examples, stderr 3 points) is not "cut by --limit": no warning
    assert not is_noisy(_entry(0.55, 277, available=277))


def test_no_better_than_majority_within_one_stderr():
    assert no_better_than_majority(_entry(0.78, 50, majority=0.78))
    assert no_better_than_majority(_entry(0.60, 50, majority=0.78))  # below it
    assert no_better_than_majority(_entry(0.83, 50, majority=0.78))  # 5 points above, stderr 5.4: within one
    assert not no_better_than_majority(_entry(0.83, 3000, majority=0.78))  # stderr 0.7 points
    assert not no_better_than_majority(_entry(0.40, 50))  # no classes (LAMBADA): no baseline


def test_notes_name_the_tasks():
    lines = notes([("boolq", None, _entry(0.78, 50, majority=0.78)), ("piqa", None, _entry(0.7, 1838, available=1838))])
    assert len(lines) == 2
    assert lines[0].startswith("too noisy") and "boolq (n=50 of 3270, ± 5.9)" in lines[0] and "piqa" not in lines[0]
    assert "majority class" in lines[1] and "boolq (acc 78.0, majority 78.0)" in lines[1]
    assert notes([("piqa", None, _entry(0.7, 1838, majority=0.5, available=1838))]) == []


def _result(**tasks):
    return {"zero_shot": {"tasks": tasks}, "perplexity": {"wikitext2": {"ppl": 20.0}}}


def test_details_table_shows_baseline_chance_and_stderr():
    dense = _result(boolq=_entry(0.42, 50, majority=0.78, chance=0.5),
                    lambada=_entry(0.30, 50, available=5153))
    wanda = _result(boolq=_entry(0.78, 50, majority=0.78, chance=0.5),
                    lambada=_entry(0.20, 50, available=5153))
    text = zero_shot_details([("Dense", dense), ("Wanda", wanda)])
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table == [
        "| Task | n | Majority | Chance | Dense | Wanda |",
        "| :--- | ---: | ---: | ---: | ---: | ---: |",
        "| BoolQ | 50 | 78.0 | 50.0 | 42.0 ± 7.1 | 78.0 ± 5.9 |",
        "| LAMBADA | 50 | - | - | 30.0 ± 6.5 | 20.0 ± 5.7 |",
    ]
    warnings = [line for line in text.splitlines() if line.startswith("- ")]
    assert len(warnings) == 2
    assert warnings[0].startswith("- Too noisy") and "BoolQ (Dense, n=50 of 3270" in warnings[0]
    assert "LAMBADA (Wanda, n=50 of 5153" in warnings[0]
    assert "BoolQ (Wanda, acc 78.0, majority 78.0)" in warnings[1] and "LAMBADA" not in warnings[1]


def test_details_without_warnings_for_large_n_and_wanda_table_unchanged():
    big = _result(boolq=_entry(0.80, 3270, majority=0.622, chance=0.5, available=3270),
                  piqa=_entry(0.70, 1838, majority=0.505, chance=0.5, available=1838))
    text = results_markdown([("Dense", big)])
    # the Wanda-paper table comes first, exactly as before
    assert text.startswith(results_table([("Dense", {"BoolQ": 80.0, "PIQA": 70.0})], ["BoolQ", "PIQA"], mean=True))
    assert "| BoolQ | 3270 | 62.2 | 50.0 | 80.0 ± 0.7 |" in text
    assert "| PIQA | 1838 | 50.5 | 50.0 | 70.0 ± 1.1 |" in text
    assert "noisy" not in text.lower() and "majority class (" not in text
