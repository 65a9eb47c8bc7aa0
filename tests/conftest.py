"""Test-suite settings: hypothesis never fails a test because a loaded machine is slow."""

from hypothesis import settings

settings.register_profile("torch-dmc", deadline=None)
settings.load_profile("torch-dmc")
