"""The markdown report, its figures and metrics.csv of a results folder.

    python -m harness report results/demo        # rewrites report.md, metrics.csv, figures/*.png

The report opens with a summary (one sentence per model, the split's leakage, failed and
degenerate runs), then the figures, then the tables; long tables are folded in <details>.
`render_report(analysis, figures)` and `render_metrics_csv(analysis)` are pure: text out, no
file, no clock (every date in the report comes from the runs). `write_report(results_dir)` is
the edge: load_bundle -> analyze -> figures -> render, each file written atomically.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from harness.analysis.prose import unit_plural
from harness.analyze import (
    Analysis,
    BackendComparison,
    ClaimCell,
    ClaimRow,
    DataInfo,
    ResourceStat,
    analyze,
    load_bundle,
)
from harness.monitor import fmt_measure, not_measured
from harness.report_figures import FigureFile, write_figures
from harness.results import write_text_atomic
from harness.spec import ParamCounts
from harness.stats import MIN_SEEDS, Interval

# Rates shown as percentages; AUROC and kappa are not proportions, they are shown as numbers.
PERCENT_METRICS = frozenset({"accuracy", "recall", "precision", "specificity", "f1"})
BACKEND_TITLES = {
    "keras": "Keras",
    "torch": "PyTorch",
    "reference": "reference (numpy)",
    "keras-torch": "Keras on torch",
    "keras-jax": "Keras on JAX",
}
DATASET_TITLES = {"mura-v1.1": "MURA v1.1", "synthetic": "generated images in MURA's layout",
                  "folder": "images in class folders", "csv": "images listed in a csv table"}
UNDEFINED = "undefined"


# ---------------------------------------------------------------------------------------------
# Formatting


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def fmt_value(metric: str, value: float | None) -> str:
    """75.09% for rates, 0.812 for AUROC and kappa; 'undefined' for NaN."""
    if not _finite(value):
        return UNDEFINED
    value = float(value)  # type: ignore[arg-type]  # _finite: not None
    return f"{100 * value:.2f}%" if metric in PERCENT_METRICS else f"{value:.3f}"


def _bounds(metric: str, low: float, high: float) -> str:
    if not (_finite(low) and _finite(high)):
        return f"[{UNDEFINED}]"
    if metric in PERCENT_METRICS:
        return f"[{100 * low:.2f}, {100 * high:.2f}]"
    return f"[{low:.3f}, {high:.3f}]"


def fmt_interval(metric: str, iv: Interval | None, point: float | None = None) -> str:
    """'71.32% [68.10, 74.40]' (value, then the interval's bounds), with the share of resamples
    dropped as undefined when it is over 1%: '100.00% [100.00, 100.00] (35% undefined)'."""
    if iv is None:
        return fmt_value(metric, point) if point is not None else "—"
    value = iv.point if point is None else point
    text = f"{fmt_value(metric, value)} {_bounds(metric, iv.low, iv.high)}"
    if iv.dropped_notable and _finite(value):  # an undefined value says so already
        text += f" ({100 * iv.dropped_share:.0f}% of resamples undefined)"
    return text


def fmt_difference(metric: str, diff: float | None) -> str:
    """'+2.30 pp' for rates, '+0.023' otherwise."""
    if not _finite(diff):
        return UNDEFINED
    diff = float(diff)  # type: ignore[arg-type]  # _finite: not None
    return f"{100 * diff:+.2f} pp" if metric in PERCENT_METRICS else f"{diff:+.3f}"


def _pp(diff_pp: float) -> str:
    return f"{diff_pp:+.2f} pp"


def _seconds(s: float | None) -> str:
    if s is None:
        return "—"
    if s >= 3600:
        return f"{s / 3600:.2f} h"
    if s >= 120:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


def _cell(text: object) -> str:
    """A table cell: no pipes, no line breaks."""
    return " ".join(str(text).replace("|", "\\|").split())


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A compact markdown table (no padding: wide cells would pad every row)."""
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |",
             "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _details(summary: str, body: str) -> str:
    """A folded block; GitHub renders the markdown inside when blank lines surround it."""
    return f"<details><summary>{summary}</summary>\n\n{body}\n\n</details>"


def _backend(name: str) -> str:
    return BACKEND_TITLES.get(name, name)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _list(items: Iterable[object]) -> str:
    return ", ".join(str(x) for x in items)


# ---------------------------------------------------------------------------------------------
# Sections


def _title(a: Analysis) -> str:
    spec = a.spec
    dataset = (a.data.dataset if a.data and a.data.dataset else spec.data.dataset)
    dataset_text = DATASET_TITLES.get(dataset, dataset)
    mura_like = dataset == "mura-v1.1" or (
        dataset == "synthetic" and spec.data.synthetic.layout == "mura")
    # body parts are MURA's; a folder or csv dataset has none
    parts = [p.lower() for p in spec.data.body_parts] if mura_like else []
    if dataset == "synthetic" and not mura_like:
        dataset_text = "generated images in class folders"
    source = f" from `{a.source}`" if a.source else ""
    overrides = (f" with overrides {_list(f'`{o}`' for o in a.overrides)}" if a.overrides else "")
    counts = [f"{len(a.runs)} finished", f"{len(a.failed)} failed", f"{len(a.ignored)} ignored"]
    if a.missing:
        counts.append(f"{len(a.missing)} planned but not run yet")
    when = ""
    if a.finished_span:
        first, last = a.finished_span
        when = (f" Runs finished at {first}." if first == last
                else f" Runs finished between {first} and {last}.")
    test_n = a.groups[0].n_test if a.groups else None
    facts = parts + ([f"test set of {test_n:,} images"] if test_n else [])
    about = f" ({', '.join(facts)})" if facts else ""
    lines = [
        f"# {spec.paper.title}: reproduction report",
        "",
        f"Spec `{spec.name}`{source}{overrides}; dataset: {dataset_text}{about}. "
        f"Runs: {', '.join(counts)}; seeds {_list(spec.seeds)}.{when}",
        "",
        a.method_sentence,
        "",
        f"Paper: {spec.paper.authors + ', ' if spec.paper.authors else ''}"
        f"\"{spec.paper.title}\" ({spec.paper.reference}).",
    ]
    if dataset == "synthetic":
        lines += ["", "The data are generated, not MURA: the comparisons with the paper below "
                  "exercise the machinery, they do not test the paper's claims."]
    if a.notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in a.notes]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Summary: the report at a glance


def _and(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _claim_phrase(r: ClaimRow) -> str:
    printed = r.printed_text or fmt_value(r.metric, r.printed)
    if r.level != "image":
        printed += f", {r.level} level"
    ran = [c for c in r.cells if c.mean is not None]
    if not ran:
        return f"{r.metric} (paper {printed}): no finished run"
    values = [f"{_backend(c.backend)} {fmt_value(r.metric, c.mean)}" for c in ran]
    labels = {c.verdict.label for c in ran}
    if labels == {"too few seeds"}:
        return f"{r.metric} {_and(values)} (paper {printed})"
    if len(labels) == 1 and len(ran) > 1:
        both = "both" if len(ran) == 2 else f"all {len(ran)}"
        label = ran[0].verdict.label
        return f"{r.metric} (paper {printed}) {label} in {both} ({', '.join(values)})"
    parts = [f"{c.verdict.label} in {_backend(c.backend)} ({fmt_value(r.metric, c.mean)})"
             for c in ran]
    return f"{r.metric} (paper {printed}) {_and(parts)}"


def _model_sentence(a: Analysis, model: str) -> str:
    m = a.spec.model(model)
    groups = [g for b in m.backends if (g := a.group(model, b)) is not None]
    if not groups:
        return f"**{model}**: no finished run yet."
    seeds = sorted({len(g.seeds) for g in groups})
    seed_text = _plural(seeds[0], "seed") if len(seeds) == 1 else \
        f"{seeds[0]}-{seeds[-1]} seeds"
    claims = [r for r in a.headline if r.model == model and r.status == "printed"]
    few = bool(claims) and all(c.verdict.label == "too few seeds"
                               for r in claims for c in r.cells if c.mean is not None)
    text = f"**{model}** ({seed_text} per framework"
    text += f", too few for a verdict: needs {MIN_SEEDS}): " if few else "): "
    text += "; ".join(_claim_phrase(r) for r in claims) if claims else \
        "the paper prints no value to compare"
    text += "."
    for c in a.comparisons:
        if c.model != model or not c.pairs:
            continue
        ta, tb = _backend(c.backend_a), _backend(c.backend_b)
        if c.distinguishable_on:
            text += (f" {ta} and {tb} are distinguishable on {_and(c.distinguishable_on)} "
                     "(every seed pair's paired interval excludes 0).")
        else:
            text += f" {ta} and {tb} are not distinguishable on any metric."
    flagged = [f"{_backend(g.backend)} is {g.degenerate}" for g in groups if g.degenerate]
    if flagged:
        text += " **" + "; ".join(flagged) + ".**"
    return text


def _leakage_sentence(a: Analysis) -> str:
    d = a.data
    strategy = (d.split.get("strategy") if d else None) or a.spec.data.split.strategy
    leak = d.leakage.get("test") if d else None
    if not leak:
        why = "data.json is corrupt" if "data.json" in dict(a.corrupt) else "no data.json"
        return f"Split by {strategy}; its leakage was not measured ({why})."
    patient, study = leak.get("patient"), leak.get("study")
    if strategy == "image":
        return (f"The split is by image, as in the paper: {_pct(patient)} of the test images "
                f"share a patient with the training images ({_pct(study)} a study), so the test "
                "set is not independent of training and its numbers are optimistic; "
                "`python -m harness compare` sets them beside a patient-grouped split.")
    how = ("The test set is the dataset's own (split official)" if strategy == "official"
           else f"The split is by {strategy}")
    return (f"{how}: {_pct(patient)} of the test images share a patient "
            f"with the training images ({_pct(study)} a study).")


def _runs_sentence(a: Analysis) -> str:
    n_ok = len(a.runs)
    degenerate = [f"{g.model} on {_backend(g.backend)} ({len(g.degenerate_runs)} of "
                  f"{len(g.seeds)} seeds)" for g in a.groups if g.degenerate_runs]
    n_deg = sum(len(g.degenerate_runs) for g in a.groups)
    parts = []
    if a.failed:
        ids = ", ".join(f"`{f.run_id}` ({f.error_type})" for f in a.failed)
        parts.append(f"{_plural(len(a.failed), 'run')} failed: {ids}")
    if degenerate:
        parts.append(f"{_plural(n_deg, 'run')} predict one class for every test image: "
                     + "; ".join(degenerate))
    if a.missing:
        parts.append(f"{len(a.missing)} planned not run yet")
    if not parts:
        return f"All {_plural(n_ok, 'run')} finished; none is degenerate."
    return f"{n_ok} of {n_ok + len(a.failed)} runs finished. " + "; ".join(parts) + "."


def _summary(a: Analysis) -> str:
    out = ["## Summary", ""]
    out += [f"- {_model_sentence(a, m.name)}" for m in a.spec.models]
    out += [f"- {_leakage_sentence(a)}", f"- {_runs_sentence(a)}"]
    return "\n".join(out)


def _figures(figures: Sequence[FigureFile]) -> str:
    if not figures:
        return ""
    out = ["## Figures"]
    for f in figures:
        out += ["", f"### {f.title}", "", f"![{f.title}](figures/{f.name})", "", f.caption]
    return "\n".join(out)


def _paper_cell(row: ClaimRow) -> str:
    if row.status == "printed" and row.printed is not None:
        text = row.printed_text or fmt_value(row.metric, row.printed)
        if row.wilson is not None:
            lo, hi = row.wilson
            text += f" (Wilson {100 * lo:.2f}-{100 * hi:.2f})"
        return text if row.level == "image" else f"{text}, {row.level} level"
    return "not printed" if row.status == "not printed" else "—"


def _verdict_cell(r: ClaimRow, c: ClaimCell, degenerate: str | None) -> str:
    if r.printed is None:
        text = "—"
    elif c.diff_pp is not None and c.verdict.label not in ("not computable",):
        text = f"{c.verdict.label}, {_pp(c.diff_pp)}"
    else:
        text = c.verdict.label
    return f"{text}; **degenerate**" if degenerate and text != "—" else (
        "**degenerate**" if degenerate else text)


def _prediction_bounds(metric: str, c: ClaimCell) -> str:
    pi = c.prediction
    if pi is None:
        return fmt_interval(metric, c.interval, c.mean)
    text = f"{fmt_value(metric, c.mean)} {_bounds(metric, pi.low, pi.high)}"
    if not pi.with_training:
        text += " (test sets only)"
    return text


def _headline(a: Analysis) -> str:
    out = ["## Headline", ""]
    conf = f"{a.spec.evaluation.bootstrap.confidence:.0%}"
    if not a.runs:
        out += ["No run has finished yet: the table shows the paper's values only.", ""]
    out.append(
        ("Our value is the mean over seeds at image level (the paper's level). "
         if all(r.level == "image" for r in a.headline) else
         "Our value is the mean over seeds at the level of the paper's value (image unless marked "
         "study level). ") + "The interval beside "
        f"it is the {conf} prediction interval of the verdict rule: where one run of our recipe "
        "would score on a test set of the paper's size (for metrics the paper does not print, "
        "its own test-set size is taken as ours). The paper's column shows the printed value "
        "with the Wilson interval of its own counts (k/n)."
    )
    for m in a.spec.models:
        rows = [r for r in a.headline if r.model == m.name]
        if not rows:
            continue
        headers = ["metric", "paper"]
        flags = []
        for backend in m.backends:
            g = a.group(m.name, backend)
            seeds = f", {_plural(len(g.seeds), 'seed')}" if g else ""
            headers += [f"{_backend(backend)}{seeds}: mean [{conf} prediction]", "verdict"]
            if g is not None and g.degenerate:
                flags.append(f"**{_backend(backend)} is {g.degenerate}.**")
        body = []
        for r in rows:
            line = [r.metric, _paper_cell(r)]
            for c in r.cells:
                if c.mean is None:
                    line += ["no runs", "—"]
                    continue
                g = a.group(m.name, c.backend)
                line.append(_prediction_bounds(r.metric, c))
                line.append(_verdict_cell(r, c, g.degenerate if g else None))
            body.append(line)
        out += ["", f"### {m.name}", ""]
        if m.description:
            out += [m.description, ""]
        out.append(_table(headers, body))
        if flags:
            out += [""] + flags
        where = list(dict.fromkeys(r.where for r in rows if r.where))
        counts = [f"{r.metric} {r.counts[0]:,}/{r.counts[1]:,}" for r in rows if r.counts]
        if where:
            note = f"Printed in: {'; '.join(where)}."
            if counts:
                note += f" Counts behind the printed values: {', '.join(counts)}."
            out += ["", note]
    out += ["", f"**Verdict rule.** {a.verdict_rule} The pp figure is ours minus printed, in "
            "percentage points."]
    checks = [f"- {r.model} {r.metric}, {_backend(c.backend)}: {c.verdict.label}: "
              f"{c.verdict.rule_text}"
              for r in a.headline if r.printed is not None for c in r.cells if c.mean is not None]
    if checks:
        out += ["", _details("Each verdict's arithmetic, to check by hand", "\n".join(checks))]
    return "\n".join(out)


def _runs(a: Analysis) -> str:
    metrics = a.spec.evaluation.metrics
    unit = a.spec.evaluation.bootstrap.unit
    out = ["## Runs", ""]
    if not a.runs:
        out.append("No finished run of the current spec.")
    else:
        out.append(f"Each run's test-set metrics at image level with {_interval_words(a)} "
                   f"(resampling {unit_plural(unit)}).")
        rows = [
            [r.model, _backend(r.backend), r.seed,
             *(fmt_interval(m, r.intervals["image"][m], r.points["image"][m]) for m in metrics),
             f"{r.epochs} (tested: epoch {r.chosen_epoch})" if r.chosen_epoch else r.epochs,
             _seconds(r.train_s)
             + (f"; **degenerate**: {r.degenerate}" if r.degenerate else "")]
            for r in a.runs
        ]
        table = _table(["model", "backend", "seed", *metrics, "epochs", "train time"], rows)
        out += ["", _details(f"Per run: {_plural(len(a.runs), 'run')}", table)]
        if unit != "image":
            out += ["", _widening(a)]
    if a.missing:
        out += ["", f"Planned but not finished yet: {_list(f'`{m}`' for m in a.missing)}."]
    return "\n".join(out)


def _interval_words(a: Analysis) -> str:
    b = a.spec.evaluation.bootstrap
    return f"{b.confidence:.0%} {'BCa' if b.method == 'bca' else b.method} bootstrap intervals"


def _widening(a: Analysis) -> str:
    unit = a.spec.evaluation.bootstrap.unit
    metrics = a.spec.evaluation.metrics
    rows = []
    for g in a.groups:
        runs = [r for r in a.runs if (r.model, r.backend) == (g.model, g.backend)]
        row: list[object] = [g.model, _backend(g.backend)]
        for m in metrics:
            w_img = [r.image_unit[m].high - r.image_unit[m].low for r in runs]
            w_cl = [r.intervals["image"][m].high - r.intervals["image"][m].low for r in runs]
            if not all(_finite(w) for w in w_img + w_cl):
                row.append(UNDEFINED)
                continue
            mi, mc = sum(w_img) / len(w_img), sum(w_cl) / len(w_cl)
            width = fmt_difference(m, mc).lstrip("+")
            row.append(f"{width} ({mc / mi:.2f}x)" if mi > 0 else width)
        rows.append(row)
    if not rows:
        return ""
    plural = unit_plural(unit)
    text = (f"Images of one {unit} are correlated; resampling whole {plural} accounts for that "
            "and usually widens the intervals. Mean interval width over seeds when resampling "
            f"{plural}, and in brackets its ratio to the width when resampling single images:")
    return text + "\n\n" + _details("Interval widths", _table(["model", "backend", *metrics],
                                                                rows))


def _seeds(a: Analysis) -> str:
    out = ["## Across seeds", ""]
    if not a.groups:
        return "\n".join(out + ["No finished runs."])
    out.append(
        "Spread of each metric over training seeds at image level: mean ± sd (min to max); sd with "
        "ddof 1, undefined for one seed. This is the training variability, kept apart from the "
        "test-set intervals."
    )
    metrics = a.spec.evaluation.metrics
    rows = []
    for g in a.groups:
        row: list[object] = [g.model, _backend(g.backend), len(g.seeds)]
        for m in metrics:
            s = g.seed_summary.get("image", {}).get(m)
            if s is None:
                row.append("—")
                continue
            sd = fmt_difference(m, s.sd).lstrip("+") if _finite(s.sd) else UNDEFINED
            row.append(f"{fmt_value(m, s.mean)} ± {sd} "
                       f"({fmt_value(m, s.min)} to {fmt_value(m, s.max)})")
        rows.append(row)
    out += ["", _table(["model", "backend", "seeds", *metrics], rows)]
    return "\n".join(out)


def _backends_title(a: Analysis) -> str:
    pairs = {(c.backend_a, c.backend_b) for c in a.comparisons}
    return "## Keras vs PyTorch" if pairs == {("keras", "torch")} else "## Across backends"


def _comparison(c: BackendComparison, a: Analysis) -> str:
    conf = f"{a.spec.evaluation.bootstrap.confidence:.0%}"
    ta, tb = _backend(c.backend_a), _backend(c.backend_b)
    out = [f"### {c.model}: {ta} - {tb}", ""]
    if not c.pairs:
        out.append(c.sentence)
        return "\n".join(out)
    headers = ["metric", f"mean difference ({ta} - {tb})"]
    headers += [f"seed {p.seed}: difference [{conf} CI]" for p in c.pairs]
    headers.append("intervals excluding 0")
    rows = []
    for s in c.summaries:
        row: list[object] = [s.metric, fmt_difference(s.metric, s.mean_difference)]
        for p in c.pairs:
            iv = p.differences[s.metric]
            row.append(f"{fmt_difference(s.metric, iv.point)} "
                       f"{_bounds(s.metric, iv.low, iv.high)}")
        row.append(f"{s.n_excluding_zero} of {s.n_pairs}")
        rows.append(row)
    out.append(_table(headers, rows))
    mc_rows = [
        [p.seed, p.mcnemar.b, p.mcnemar.c, p.mcnemar.test
         or ("exact binomial" if p.mcnemar.exact else "chi-square, continuity-corrected"),
         f"{p.mcnemar.p_value:.3g}"]
        for p in c.pairs
    ]
    unit = a.spec.evaluation.bootstrap.unit
    how = ("" if unit == "image" else
           f", adjusted for clusters of {unit_plural(unit)} (Obuchowski 1998)")
    out += ["", f"McNemar's test on the same test images{how} (threshold "
            f"{a.spec.evaluation.threshold:g}):", "",
            _table(["seed", f"{ta} right, {tb} wrong", f"{ta} wrong, {tb} right", "test",
                    "p-value"], mc_rows)]
    out += ["", f"**{_distinguishable_sentence(c, a)}**"]
    if c.note:
        out += ["", f"Note: {c.note}."]
    return "\n".join(out)


def _distinguishable_sentence(c: BackendComparison, a: Analysis) -> str:
    level = f"{a.spec.evaluation.bootstrap.confidence:.0%}"
    ta, tb = _backend(c.backend_a), _backend(c.backend_b)
    if c.distinguishable_on:
        return (f"{ta} and {tb} are distinguishable at the {level} level on "
                f"{_list(c.distinguishable_on)}: every seed pair's interval excludes 0.")
    return (f"{ta} and {tb} are not distinguishable at the {level} level on any metric "
            f"({_plural(len(c.pairs), 'seed pair')}).")


def _across_backends(a: Analysis) -> str:
    if not a.comparisons:
        return ""
    out = [_backends_title(a), ""]
    out.append(
        "Both backends score the same test images, so each seed pair is compared paired: the "
        "difference of each metric on the same bootstrap resamples, and McNemar's test on the "
        "images where exactly one backend is right (with clusters as the bootstrap resamples "
        "them)."
    )
    for c in a.comparisons:
        out += ["", _comparison(c, a)]
    out += ["", f"**Rule.** {a.distinguishable_rule}"]
    return "\n".join(out)


def _study(a: Analysis) -> str:
    if "study" not in a.spec.evaluation.levels:
        return ""
    out = ["## Study level", ""]
    b = a.spec.evaluation.bootstrap
    unit = unit_plural(b.unit) if b.unit != "image" else "studies"
    out.append(
        "MURA labels studies, not images: a study's probability is the mean of its images' "
        f"probabilities, thresholded at {a.spec.evaluation.threshold:g}. Seed means with their "
        f"{b.confidence:.0%} interval (resampling {unit}). The paper prints no study-level "
        "numbers."
    )
    metrics = a.spec.evaluation.metrics
    rows = []
    for g in a.groups:
        if "study" not in g.seed_summary:
            continue
        ivs = g.seed_mean.get("study", {})
        rows.append([g.model, _backend(g.backend), g.n_studies, len(g.seeds),
                     *(fmt_interval(m, ivs.get(m), g.seed_summary["study"][m].mean)
                       for m in metrics)])
    if not rows:
        return "\n".join(out + ["", "No study-level numbers (no finished run)."])
    out += ["", _table(["model", "backend", "studies", "seeds", *metrics], rows)]
    return "\n".join(out)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def _data(a: Analysis) -> str:
    out = ["## Data", ""]
    d: DataInfo | None = a.data
    spec = a.spec
    if d is None:
        why = dict(a.corrupt).get("data.json")
        if why is not None:
            return "\n".join(out + [f"data.json is corrupt ({why}): split sizes unknown; "
                                     "`python -m harness run` writes it again."])
        return "\n".join(out + ["No data.json in the results folder: split sizes unknown."])
    split = d.split
    strategy = split.get("strategy", spec.data.split.strategy)
    facts = [
        f"images resized once to {d.image_size or spec.data.image_size} px "
        f"({d.resize or spec.data.resize})",
        f"split by {strategy}",
        f"test fraction {split.get('test_fraction', spec.data.split.test_fraction)}",
        "stratified" if split.get("stratify", spec.data.split.stratify) else "unstratified",
        f"split seed {split.get('seed', spec.data.split.seed)}",
        f"validation: {split.get('validation_source', spec.data.validation.source)}",
    ]
    dataset = d.dataset or spec.data.dataset
    out.append(f"Dataset: {DATASET_TITLES.get(dataset, dataset)}; {_list(facts)}.")
    if d.data_hash:
        out[-1] += f" Data hash `{d.data_hash[:16]}`."
    if d.parts:
        rows = []
        for p in d.parts:
            pos = "—" if p.positives is None else f"{p.positives:,}"
            if p.positives is not None and p.images:
                pos += f" ({100 * p.positives / p.images:.1f}%)"
            rows.append([p.part, "—" if p.images is None else f"{p.images:,}", pos,
                         "—" if p.studies is None else f"{p.studies:,}",
                         "—" if p.patients is None else f"{p.patients:,}"])
        out += ["", _table(["part", "images", "positives (abnormal)", "studies", "patients"],
                           rows)]
    for part, name in (("test", "test"), ("val", "validation")):
        leak = d.leakage.get(part)
        if not leak:
            continue
        out += ["", f"Leakage into the {name} part: {_pct(leak.get('study'))} of {name} images "
                f"have another image of the same study in train; {_pct(leak.get('patient'))} "
                "share a patient with train."]
    if strategy == "image":
        out += ["", "This split is by image, as in the paper: the views of one study and the "
                "studies of one patient fall on both sides, so the test set is not independent "
                "of training and its accuracy is optimistic. A patient-grouped split "
                "(`--set data.split.strategy=patient`) is the honest variant."]
    elif strategy == "patient":
        out += ["", "The split is grouped by patient: no test patient appears in train."]
    if d.skipped:
        shown = d.skipped[:10]
        more = f" (and {len(d.skipped) - 10} more)" if len(d.skipped) > 10 else ""
        out += ["", f"{_plural(len(d.skipped), 'image')} could not be read and were skipped"
                f"{more}:", ""] + [f"- `{s}`" for s in shown]
    return "\n".join(out)


def _counts_row(label: str, c: ParamCounts | None) -> list[object]:
    if c is None:
        return [label, "—", "—", "—"]
    return [label, f"{c.total:,}", f"{c.trainable:,}", f"{c.non_trainable:,}"]


def _architecture(a: Analysis) -> str:
    out = ["## Architecture check", ""]
    out.append(
        "Parameter counts as printed in the paper, inferred from the spec's layers, and as "
        "built by each backend (counted the Keras way: BatchNorm moving statistics are "
        "non-trainable)."
    )
    for arch in a.architecture:
        rows = [_counts_row("printed (paper)", arch.printed)]
        if arch.inferred_error:
            rows.append(["inferred (spec)", f"error: {arch.inferred_error}", "", ""])
        else:
            rows.append(_counts_row("inferred (spec)", arch.inferred))
        for backend, counts in arch.built.items():
            if not counts:
                rows.append([f"built by {_backend(backend)}", "no finished run", "", ""])
            for c in counts:
                rows.append(_counts_row(f"built by {_backend(backend)}", c))
        out += ["", f"### {arch.model}", "",
                _table(["source", "total", "trainable", "non-trainable"], rows), ""]
        if arch.mismatches:
            out += [f"**MISMATCH**: {m}." for m in arch.mismatches]
        else:
            out.append("All available counts agree.")
    return "\n".join(out)


def _number(x: float) -> str:
    return f"{x:,.1f}" if abs(x) < 10_000 else f"{x:,.0f}"


def _resource_cell(s: ResourceStat) -> str:
    if s.n_measured == 0 or s.median is None:
        return fmt_measure(not_measured(s.reason or "no value"))
    unit = s.unit or ""
    text = _number(s.median) + ("%" if unit == "%" else f" {unit}" if unit else "")
    if s.n_measured > 1 and s.low is not None and s.high is not None and s.low != s.high:
        text += f" ({_number(s.low)} to {_number(s.high)})"
    if s.source:
        text += f" [{s.source}]"
    if s.n_measured < s.n_runs:
        text += f"; {s.n_runs - s.n_measured} of {s.n_runs} runs not measured ({s.reason})"
    return text


def _resources(a: Analysis) -> str:
    out = ["## Resources", ""]
    if not a.resources:
        return "\n".join(out + ["No finished runs."])
    out.append(
        "Median over seeds, with the range (min to max) in brackets when seeds differ. A value "
        "that could not be measured says why; it is never shown as 0."
    )
    quantities = [s.quantity for s in a.resources[0].stats]
    headers = ["", *(f"{r.model} / {_backend(r.backend)}" for r in a.resources)]
    rows = []
    for i, q in enumerate(quantities):
        rows.append([q, *(_resource_cell(r.stats[i]) for r in a.resources)])
    seeds = [f"{r.model} / {_backend(r.backend)}: {_plural(r.stats[0].n_runs, 'run')}"
             for r in a.resources]
    out += ["", _details("Resources per model and backend", _table(headers, rows)), "",
            f"Runs per column: {'; '.join(seeds)}."]
    return "\n".join(out)


def _failed(a: Analysis) -> str:
    if not a.failed:
        return ""
    out = ["## Failed runs", ""]
    out.append(f"{_plural(len(a.failed), 'run')} of the current spec failed; the other runs went "
               "on. Rerun `python -m harness run` to retry them.")
    out += ["", _table(["run", "error", "message"],
                       [[f"`{f.run_id}`", f.error_type, f.message] for f in a.failed])]
    for f in a.failed:
        if f.stderr_tail:
            out += ["", f"Last lines of `{f.run_id}`'s stderr:", "", "```",
                    *f.stderr_tail, "```"]
    return "\n".join(out)


def _ignored(a: Analysis) -> str:
    if not a.ignored:
        return ""
    out = ["## Ignored runs", ""]
    out.append("These result files were not produced by the current spec, data and code (their "
               "run is not planned any more, or its run hash differs); none of their numbers is "
               "used in this report.")
    out += ["", _table(["run", "why ignored"], [[f"`{r.run_id}`", r.reason] for r in a.ignored])]
    return "\n".join(out)


_RELATION = {"gt": "> ", "approx": "about ", "eq": ""}


def _contradictions(a: Analysis) -> str:
    paper = a.spec.paper
    if not paper.contradictions and not paper.not_printed:
        return ""
    out = ["## The paper's internal contradiction", ""]
    for i, c in enumerate(paper.contradictions):
        if len(paper.contradictions) > 1:
            out += [f"### Contradiction {i + 1}", ""]
        out += [f"**Where:** {c.where}", "", f"> {' '.join(c.text.split())}", "",
                f"**Conflicts with:** {c.conflicts_with}"]
        if c.claims:
            backends = list(dict.fromkeys(
                b for m in a.spec.models for b in m.backends
                if any(cl.model == m.name for cl in c.claims)
            ))
            rows = []
            for cl in c.claims:
                stated = f"{_RELATION.get(cl.relation, '')}{fmt_value(cl.metric, cl.value)}"
                row: list[object] = [cl.model, cl.metric, stated]
                for b in backends:
                    g = a.group(cl.model, b)
                    s = g.seed_summary.get("image", {}).get(cl.metric) if g else None
                    row.append(fmt_value(cl.metric, s.mean) if s else "—")
                rows.append(row)
            out += ["", "The conflicting statements, beside our seed means (context only, no "
                    "verdict):", "",
                    _table(["model", "metric", "stated", *(f"ours ({_backend(b)})"
                                                           for b in backends)], rows)]
        out += ["", f"**Resolution:** {' '.join(c.resolution.split())}"]
    if paper.not_printed:
        out += ["", "### Named but not printed", ""]
        for n in paper.not_printed:
            models = _list(n.models) if n.models else "all models"
            note = f": {n.note}" if n.note else ""
            out.append(f"- {n.metric} ({models}), {n.where}{note}.")
    return "\n".join(out)


def _assumptions(a: Analysis) -> str:
    out = ["## Assumptions", ""]
    if not a.spec.assumptions:
        return "\n".join(out + ["The spec records no assumption."])
    out.append("Every value the paper does not state, with the value chosen and why.")
    rows = [[x.what, x.value, f"`{x.field}`" if x.field else "—", x.reason]
            for x in a.spec.assumptions]
    out += ["", _table(["what", "value", "spec field", "reason"], rows)]
    return "\n".join(out)


def _environment(a: Analysis) -> str:
    out = ["## Environment", ""]
    if not a.environment:
        return "\n".join(out + ["No run recorded its environment yet."])
    out.append("Gathered from the runs; values that differ between runs are separated by ` / `.")
    for env in a.environment:
        out += ["", _details(_backend(env.backend),
                             _table(["", "value"], [[k, v] for k, v in env.rows]))]
    return "\n".join(out)


def render_report(analysis: Analysis, figures: Sequence[FigureFile] = (),
                  checks: Sequence[str] = ()) -> str:
    """The whole report as markdown text (pure); `figures` are embedded with relative links;
    `checks` (parity, determinism, initial weights) follow the framework comparison."""
    sections = [
        _title(analysis),
        _summary(analysis),
        _figures(figures),
        _headline(analysis),
        _runs(analysis),
        _seeds(analysis),
        _across_backends(analysis),
        *checks,
        _study(analysis),
        _data(analysis),
        _architecture(analysis),
        _resources(analysis),
        _failed(analysis),
        _ignored(analysis),
        _contradictions(analysis),
        _assumptions(analysis),
        _environment(analysis),
    ]
    return "\n\n".join(s.rstrip() for s in sections if s) + "\n"


# ---------------------------------------------------------------------------------------------
# metrics.csv

CSV_COLUMNS = ("run_id", "model", "backend", "seed", "level", "metric", "value", "low", "high",
               "unit", "method")


def _num(x: float) -> str:
    return repr(float(x)) if math.isfinite(x) else "nan"


def render_metrics_csv(analysis: Analysis) -> str:
    """One row per (run, level, metric, resampling unit), then the seed means (seed 'mean'), then
    the verdicts' prediction intervals (seed 'prediction')."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in analysis.runs:
        for level, ivs in r.intervals.items():
            for metric, iv in ivs.items():
                w.writerow([r.run_id, r.model, r.backend, r.seed, level, metric,
                            _num(r.points[level][metric]), _num(iv.low), _num(iv.high),
                            iv.unit, iv.method])
                if level == "image" and iv.unit != "image":
                    im = r.image_unit[metric]
                    w.writerow([r.run_id, r.model, r.backend, r.seed, level, metric,
                                _num(r.points[level][metric]), _num(im.low), _num(im.high),
                                im.unit, im.method])
    for g in analysis.groups:
        for level, ivs in g.seed_mean.items():
            for metric, iv in ivs.items():
                w.writerow([f"{g.model}__{g.backend}__mean", g.model, g.backend, "mean", level,
                            metric, _num(g.seed_summary[level][metric].mean), _num(iv.low),
                            _num(iv.high), iv.unit, f"{iv.method} (seed mean)"])
    for row in analysis.headline:
        for c in row.cells:
            pi = c.prediction
            if pi is None:
                continue
            w.writerow([f"{row.model}__{c.backend}__prediction", row.model, c.backend,
                         "prediction", row.level, row.metric, _num(pi.mean), _num(pi.low),
                         _num(pi.high),
                         analysis.spec.evaluation.bootstrap.unit,
                         f"prediction interval (verdict: {c.verdict.label})"])
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# The edge: files


def checks_sections(folder: Path) -> list[str]:
    """The sections of the checks written beside the runs: parity.json (`harness parity`),
    determinism.json (`run --check-determinism`), and the initial weights the runs started from."""
    from harness.parity import render_parity
    from harness.results import read_json, read_runs

    out = []
    runs, _ = read_runs(folder)
    inits = sorted({f"{r.key.model}: {r.provenance.get('extra', {}).get('init', 'not recorded')}"
                    for r in runs if r.status == "ok"})
    if inits:
        out.append("## Initial weights\n\n" + "\n".join(f"- {line}" for line in inits))
    for name, render in (("parity.json", render_parity), ("determinism.json", _determinism)):
        path = folder / name
        if not path.exists():
            continue
        try:
            out.append(render(read_json(path)))
        except (ValueError, KeyError, TypeError) as e:
            out.append(f"## {name}\n\n{path} is unreadable ({e}); rerun the command that "
                       "writes it.")
    return out


def _determinism(result: dict[str, Any]) -> str:
    rows = [(g["model"], _backend(g["backend"]), g["seed"], g["grade"],
             ", ".join(f"{k} {v}" for k, v in sorted(g.get("flags", {}).items())) or "-")
            for g in result["grades"]]
    return ("## Determinism, measured\n\nOne seed per model and backend rerun in a fresh process "
            "(`run --check-determinism`); its test probabilities compared with the stored "
            "result bit for bit.\n\n"
            + _table(["model", "backend", "seed", "grade", "flags in force"], rows))


def write_report_files(results_dir: Path | str) -> tuple[Path, Analysis]:
    """Analyse a results folder; write figures/*.png, metrics.csv and report.md there."""
    folder = Path(results_dir)
    analysis = analyze(load_bundle(folder))
    report = folder / "report.md"
    figures = write_figures(analysis, folder / "figures")
    write_text_atomic(folder / "metrics.csv", render_metrics_csv(analysis))
    write_text_atomic(report, render_report(analysis, figures, checks_sections(folder)))
    return report, analysis


def write_report(results_dir: Path | str) -> Path:
    """`harness report DIR`: write_report_files, returning report.md."""
    return write_report_files(results_dir)[0]


__all__ = [
    "fmt_difference",
    "fmt_interval",
    "fmt_value",
    "render_metrics_csv",
    "render_report",
    "write_report",
]
