"""mondeq_cli: the ``mondeq`` command line, its argument types and the benchmark harness.

It stands on :mod:`model_core` (the maths) and needs nothing beyond torch. ``training`` and
``service`` add their commands through the ``mondeq.commands`` entry-point group and use the
argument types of :mod:`mondeq_cli.args`; this package never imports them.

* :mod:`mondeq_cli.main`: ``mondeq`` itself (command discovery, missing-extra errors).
* :mod:`mondeq_cli.args`: argparse types with ranges (``positive_int``, ``tolerance``, ...).
* :mod:`mondeq_cli.commands`: ``mondeq import-locuslab`` and ``mondeq bench``.
* :mod:`mondeq_cli.benchmark`: the speed harness behind ``mondeq bench`` and ``bench/``.
"""
