"""Experiment configs as data: one module per experiment (``FIELDS``, ``RULES``,
``get_config()``) and one file per preset building on it (see `experiments.common.entry`)."""
