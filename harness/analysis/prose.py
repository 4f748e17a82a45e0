"""The analysis' rules and methods in words: every sentence the report states as a rule.

    from harness.analysis.prose import method_sentence
    method_sentence(confidence=0.95, method="bca", resamples=2000, unit="patient", seed=0)

Pure functions of the evaluation settings; the numbers they describe come from the other
modules of harness.analysis. Kept apart so a reviewer can read every rule in one place.
"""

from __future__ import annotations

from harness.stats import DROPPED_SHARE_SHOWN, MIN_SEEDS, verdict_rule_text

# What resampling each unit does, and what it does not handle: the method sentence must be true
# for the unit in force (an image bootstrap does NOT handle one patient's correlated images).
_UNIT_WORDS = {
    "patient": ("patients", "whole patients are drawn, since one patient's images are "
                "correlated"),
    "study": ("studies", "whole studies are drawn, since a study's views are correlated; "
              "studies of one patient are still treated as independent, so intervals are "
              "somewhat too narrow when patients have several studies"),
    "image": ("images", "single images are drawn as if independent; images of one study or "
              "patient are correlated and this correlation is NOT handled, so the intervals are "
              "too narrow when patients have several images (set evaluation.bootstrap.unit: "
              "patient for honest ones)"),
}


def unit_plural(unit: str) -> str:
    """'patients', 'studies' or 'images'."""
    return _UNIT_WORDS[unit][0]


def method_sentence(
    *, confidence: float, method: str, resamples: int, unit: str, seed: int
) -> str:
    """How every interval in the report was computed, in one paragraph true for `unit`."""
    plural, how = _UNIT_WORDS[unit]
    name = "BCa" if method == "bca" else method
    return (
        f"Intervals are {confidence:.0%} {name} bootstrap intervals from {resamples:,} "
        f"resamples of the test set's {plural} ({how}; bootstrap seed {seed}). A model's "
        "value is the mean over its training seeds, scored on the same resampled test set. "
        "Its verdict against the paper uses a wider prediction interval that adds the spread "
        "across training seeds and the paper's own test-set size (the verdict rule below). "
        f"Where more than {DROPPED_SHARE_SHOWN:.0%} of resamples leave a metric undefined "
        "(precision with no predicted positive), the share dropped is shown beside the "
        "interval, which then holds only for test sets where the metric is defined."
    )


def distinguishable_rule(confidence: float, unit: str, init: str = "per_backend") -> str:
    """The rule that calls two backends distinguishable, in words."""
    test = ("McNemar's test on the thresholded predictions of the same images" if unit == "image"
            else f"McNemar's test adjusted for clusters of {unit_plural(unit)} (Obuchowski "
            "1998: each cluster's discordant images form one piece of evidence)")
    return (
        f"Two backends are called distinguishable on a metric when the {confidence:.0%} "
        "paired-bootstrap interval of their difference (same resampled test units for both) "
        f"excludes 0, on the same side, for every seed pair; otherwise they are not "
        f"distinguishable at the {confidence:.0%} level. {test} is shown beside it as a second "
        "view. "
        + ("Every framework starts seed s from the same initial weights (runtime.init: "
           "shared, ported from the model's first backend), so a seed pair is paired for real."
           if init == "shared" else
           "Seeds do not carry across frameworks (each draws its own initial weights), so "
           "pairs are matched by seed index only for bookkeeping (runtime.init: shared pairs "
           "them for real).")
    )


def verdict_rule(confidence: float) -> str:
    """The verdict rule against the paper (harness.stats.verdict_rule_text)."""
    return verdict_rule_text(confidence, MIN_SEEDS)


DEGENERATE_RULE = (
    "A run is degenerate when it predicts one class for every test image; a model is flagged "
    "when all its runs are degenerate, or when its AUROC interval contains 0.5 (no better than "
    "chance) while the paper's own interval for this model's accuracy lies above 50%."
)
