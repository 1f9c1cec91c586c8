"""Shared pytest set-up. The service tests' fixtures live in ``service_support``."""

pytest_plugins = ["service_support"]
