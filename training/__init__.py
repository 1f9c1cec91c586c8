"""training: paper presets, data, the training loop and distributed runs.

Stands on :mod:`model_core` only (never on :mod:`service`). Built by the training issue.
"""
