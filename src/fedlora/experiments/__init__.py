"""Experiments: grids of runs and what is read from them.

``grid`` expands strategies × seeds × ``--grid`` values into cells and runs them, resumably
(``fedlora compare``); ``report`` writes tables and plots from finished runs (``fedlora report``,
the quickstart's comparison), built from ``run_results`` (what is read from one run),
``grouping`` (which runs are one row), ``report_tables`` and ``report_plots``, with
``alignment_report`` its FedRot-by-aligned-factor section; ``demo`` runs every strategy on a
synthetic federation; ``cli`` holds the commands (quickstart, compare, report). The engines never
import this package.
"""
