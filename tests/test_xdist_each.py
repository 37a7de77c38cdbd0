"""pytest-xdist gateways as the way to spread the suite: with one `--tx` per emulator profile and
`--dist each`, every case runs on every worker and the merged JUnit names each case's backend,
profile and host (docs/running.md, "Several kernels, profiles or hosts at once")."""

from __future__ import annotations

import collections
import os
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CASES = """
def test_one(backend_name):
    pass

def test_two(backend_name):
    pass
"""


def test_each_profile_worker_is_named_in_junit(tmp_path: Path) -> None:
    (tmp_path / "test_cases.py").write_text(CASES)
    junit = tmp_path / "j.xml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVMPY_")}
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "kvmpy.testing.plugin",
                        "-p", "no:cacheprovider", "--backend", "emu", "--dist", "each",
                        "--tx", "popen//env:KVMPY_EMU_PROFILE=6.12",
                        "--tx", "popen//env:KVMPY_EMU_PROFILE=7.3",
                        f"--junitxml={junit}", "test_cases.py"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    seen = collections.Counter()
    for tc in ET.parse(junit).iter("testcase"):
        props = {p.get("name"): p.get("value") for p in tc.iter("property")}
        assert props["backend"] == "emu" and props["host"] == platform.node()
        seen[props["backend_description"]] += 1
    release = platform.release()
    assert seen == {f"emulated KVM (profile 6.12) on Linux {release}": 2,
                    f"emulated KVM (profile 7.3) on Linux {release}": 2}
