"""The kvmpy selftest suite: ``selftests/`` in the repository, ``kvmpy.selftests`` installed
(setup.py maps it). A package, so its modules import one another relatively (``from
.test_private_mem_conversions import ...``) whichever name it has."""
