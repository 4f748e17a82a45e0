"""The analysis of a results folder, one module per job (harness/analyze.py composes them).

    load      results folder -> Bundle (spec, data, plan, RunResults) and which runs count
    runs      one run -> its metrics and intervals at each level, ROC curve, degenerate or not
    across    over seeds (seed means, noise), against the paper (prediction intervals and
              verdicts), across backends (paired differences, McNemar)
    context   resources, architecture, data and leakage, environment
    prose     the rules and methods in words

Imports go one way: load <- runs <- across; context needs load only; prose needs none of them
(tests/test_analysis_layout.py checks it). Nothing here imports the report or a framework.
"""
