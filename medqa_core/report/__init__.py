"""The parity report: ``medqa-parity report RUN RUN [RUN...] --out DIR``.

``build`` compares the runs (on :mod:`medqa_core.compare`), ``tables`` and ``charts`` present them,
``render`` writes report.md, a self-contained report.html and the chart PNGs, all or nothing.
"""
