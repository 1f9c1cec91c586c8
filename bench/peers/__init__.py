"""The servers users would pick instead of ours, serving the same checkpoint for
``bench/service_load.py``: KServe's ``ModelServer`` and LitServe, each in its own virtual
environment (``bench/.venv-peers``), plus the gRPC load generator that drives them all."""
