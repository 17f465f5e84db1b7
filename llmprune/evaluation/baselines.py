"""What a zero-shot accuracy must beat, and when its noise hides a difference.

* Majority-class baseline: the accuracy of always answering the most frequent gold label of the documents that
  were scored (BoolQ's "yes", RTE's most frequent class; for multiple-choice tasks the most frequent gold index).
* Chance: the expected accuracy of a uniform guess, the mean over documents of 1 / number of choices.
* Standard error: lm-eval's ``acc_stderr``, sqrt(p (1 - p) / (n - 1)). Two accuracies measured on n examples each
  differ significantly (95 %, independent samples) only when they are more than about 1.96 * sqrt(2) = 2.8
  standard errors apart.

Rules (:func:`notes`): a task cut short by ``--limit`` is *noisy* when its standard error exceeds
:data:`NOISY_STDERR` (2 percentage points: differences under ~5.6 points are then noise) or fewer than
:data:`MIN_EXAMPLES` documents were scored (an accuracy of 0/4 has a standard error of 0, which says nothing); an
accuracy no more than one standard error above the majority baseline is *no better than always answering the
majority class*."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

#: Standard error (a fraction) above which a task's accuracy, cut short by --limit, is too noisy to compare.
NOISY_STDERR = 0.02
#: Fewer scored documents than this make a task cut short by --limit noisy whatever its standard error.
MIN_EXAMPLES = 100
#: Two independent accuracies are different at 95 % when more than this many standard errors apart.
SIGNIFICANT_GAP = 2.8


def majority_share(labels: Sequence) -> float | None:
    """Share of the most frequent label in `labels` (None when there are none)."""
    if not labels:
        return None
    return Counter(labels).most_common(1)[0][1] / len(labels)


def chance_rate(num_choices: Sequence[int]) -> float | None:
    """Expected accuracy of a uniform guess: the mean of 1 / k over documents with k choices."""
    if not num_choices:
        return None
    return sum(1.0 / k for k in num_choices) / len(num_choices)


def _stderr(entry: Mapping) -> float | None:
    """lm-eval's standard error of the entry's headline metric ("acc" unless "metric" says otherwise)."""
    return entry.get(f"{entry.get('metric') or 'acc'}_stderr")


def is_noisy(entry: Mapping) -> bool:
    """A task cut short (n below the documents available) whose standard error exceeds NOISY_STDERR or
    that has fewer than MIN_EXAMPLES scored documents."""
    se, n, avail = _stderr(entry), entry.get("n"), entry.get("n_available")
    if not n:
        return False  # nothing scored: no number to compare
    if avail is not None and n >= avail:
        return False  # the whole task: nothing a larger --limit could add
    return n < MIN_EXAMPLES or (se is not None and se > NOISY_STDERR)


def no_better_than_majority(entry: Mapping) -> bool:
    """Accuracy at most one standard error above the majority-class baseline."""
    acc, maj = entry.get(entry.get("metric") or "acc"), entry.get("majority_baseline")
    if acc is None or maj is None:
        return False
    return acc <= maj + (_stderr(entry) or 0.0)


def notes(results: Sequence[tuple[str, str | None, Mapping]]) -> list[str]:
    """At most two warning lines for `results` = [(task, model or None, entry)], `entry` being a task's result
    (zero_shot["tasks"][name]): the noisy ones (:func:`is_noisy`) and those no better than the majority class
    (:func:`no_better_than_majority`)."""
    noisy, at_majority = [], []
    for task, model, e in results:
        metric = e.get("metric") or "acc"
        acc, se, n, avail = e.get(metric), _stderr(e), e.get("n"), e.get("n_available")
        if acc is None:
            continue
        who = f"{model}, " if model else ""
        if is_noisy(e):
            noisy.append(f"{task} ({who}n={n}{f' of {avail}' if avail is not None else ''}"
                         f"{f', ± {100 * se:.1f}' if se is not None else ''})")
        if no_better_than_majority(e):
            at_majority.append(f"{task} ({who}{metric} {100 * acc:.1f}, majority {100 * e['majority_baseline']:.1f})")
    out = []
    if noisy:
        out.append(f"too noisy to compare models, use a larger --limit or none (fewer than {MIN_EXAMPLES} examples "
                   f"or a standard error above {100 * NOISY_STDERR:g} points; two accuracies differ only when more "
                   f"than ~{SIGNIFICANT_GAP:g} standard errors apart): " + ", ".join(noisy))
    if at_majority:
        out.append("no better than always answering the majority class (accuracy at most one standard error "
                   "above it, on the same examples): " + ", ".join(at_majority))
    return out


__all__ = ["NOISY_STDERR", "MIN_EXAMPLES", "SIGNIFICANT_GAP", "majority_share", "chance_rate", "is_noisy",
           "no_better_than_majority", "notes"]
