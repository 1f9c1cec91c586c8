"""Shared pytest set-up: makes ``tests/`` importable (support modules ``problems``,
``promql``, ``service_support``, ``training_support``) and nothing else, so that
``tests/model_core`` runs with torch alone (``tests/model_core/test_floor.py``).

The service tests' fixtures live in ``service_support`` and are taken in by
``tests/service/conftest.py``."""
