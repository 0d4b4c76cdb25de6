"""The regression gate: ``medqa-parity gate --baseline RUN --candidate RUN``.

``thresholds`` (what is allowed, from one TOML table), ``cases`` (a file as comparable cases),
``checks`` (one figure each), ``decide`` (match cases, check, the verdict and exit code), ``render``
(table, verdict line, markdown). It stands on :mod:`medqa_core.compare`, as the report does.
"""
