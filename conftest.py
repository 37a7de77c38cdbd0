"""Loads the kvmpy pytest plugins for tests/ and selftests/."""

pytest_plugins = ["kvmpy.testing.plugin", "kvmpy.testing.ktap", "kvmpy.testing.health",
                  "kvmpy.testing.isolate"]
