"""service: the FastAPI inference server for monDEQ checkpoints.

Stands on :mod:`model_core` only (never on :mod:`training`). Built by the service issue.
"""
