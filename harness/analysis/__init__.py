"""The analysis of a results folder, one module per job (harness/analyze.py composes them).

    load      results folder -> Bundle (spec, data, plan, RunResults) and which runs count
    runs      one run -> its metrics and intervals at each level, degenerate or not
    compare   across seeds (prediction intervals), against the paper (verdicts), across backends
    context   resources, architecture, data, environment
    prose     the rules and methods in words

Imports go one way: load <- runs <- compare; context needs load only; prose needs none of them.
"""
