"""Model-based testing of guest_memfd, memslot bindings and memory attributes.

* :mod:`kvmpy.model.state`: the pure-Python reference model (no KVM), rules cited from api.rst;
* :mod:`kvmpy.model.harness`: :class:`ModelHarness` drives a backend and the model in lockstep;
* :mod:`kvmpy.model.repro`: :func:`format_reproducer` prints a recorded sequence as a pytest test.

The hypothesis state machine lives in selftests/test_model_statemachine.py (docs/beyond.md).
"""

from .repro import format_reproducer
from .state import Config, Fault, Mem, Mmio, Model

__all__ = ["Config", "Fault", "Mem", "Mmio", "Model", "format_reproducer"]
