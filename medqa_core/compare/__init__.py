"""The layer under the report and the gate: reading inputs, statistics, parity findings, pairwise comparison,
the metric registry. Neither output imports the other; both import from here.

Modules: ``inputs`` (records and bench files -> RunSummary), ``stats`` (Wilson, McNemar, bootstrap, TOST,
Mann-Whitney), ``parity`` (paired accuracy, drift, findings), ``pairs`` (comparability, settings,
compare_runs), ``metrics`` (the registry), ``tables`` (flatten, markdown).
"""
