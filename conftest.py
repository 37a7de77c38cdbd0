"""Loads the kvmpy pytest plugin for tests/ and selftests/."""

pytest_plugins = ["kvmpy.testing.plugin"]
