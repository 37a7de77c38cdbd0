"""Packaging beyond pyproject.toml's metadata: the suite and the guests travel in the wheel.

* ``selftests/`` (the repository's top-level suite) is the package ``kvmpy.selftests``
  (package_dir), so ``kvmpy run`` and ``pytest --pyargs kvmpy.selftests`` find it installed.
* build_py copies ``guests/`` (sources, headers, linker script) into ``kvmpy/guest/sources`` and
  builds every program with kvmpy's own guest builder into ``kvmpy/guest/prebuilt`` (plus a
  manifest of the source hashes they were built from), so an installed kvmpy runs its guests
  without a compiler. An editable install (``pip install -e .``) does neither: the checkout's
  guests/ is used and built on demand.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _guest_builder():  # type: ignore[no-untyped-def]
    """kvmpy/guest/build.py on its own (stdlib only): the build environment has none of
    kvmpy's dependencies, so the kvmpy.guest package (pyelftools, ...) cannot be imported."""
    spec = importlib.util.spec_from_file_location("_kvmpy_guest_build",
                                                  HERE / "kvmpy" / "guest" / "build.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


class BuildPyWithGuests(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # the checkout's guests/ is used directly
        self._guests(Path(self.build_lib) / "kvmpy" / "guest")

    def _guests(self, dest: Path) -> None:
        b = _guest_builder()
        src_root = HERE / "guests"
        sources, prebuilt = dest / b.SOURCES_DIR, dest / b.PREBUILT_DIR
        for d in (sources, prebuilt):
            shutil.rmtree(d, ignore_errors=True)
        for f in b.guest_files(src_root):
            out = sources / f.relative_to(src_root)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, out)
        if os.environ.get("KVMPY_BUILD_NO_GUESTS"):
            print("kvmpy: KVMPY_BUILD_NO_GUESTS set: no prebuilt guest ELFs in this build")
            return
        prebuilt.mkdir(parents=True)
        with tempfile.TemporaryDirectory(prefix="kvmpy-guests-") as cache:
            old = {k: os.environ.get(k) for k in ("KVMPY_GUESTS_DIR", "KVMPY_GUEST_CACHE")}
            os.environ.update(KVMPY_GUESTS_DIR=str(sources), KVMPY_GUEST_CACHE=cache)
            try:
                programs = {}
                cc = b.compiler()  # GuestBuildError naming gcc if there is none
                for name in b.available_programs():
                    elf = b.build(name)
                    shutil.copyfile(elf, prebuilt / f"{name}.elf")
                    programs[name] = b.content_key(sources / f"{name}.c", sources)
            except b.GuestBuildError as e:
                raise SystemExit(f"kvmpy: cannot prebuild the guest programs for the wheel: {e}"
                                 "\n(set KVMPY_BUILD_NO_GUESTS=1 to build a wheel without "
                                 "them: installed kvmpy then needs gcc)") from None
            finally:
                for k, v in old.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        manifest = {"compiler": b.compiler_version(cc), "programs": programs}
        (prebuilt / b.MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        print(f"kvmpy: prebuilt {len(programs)} guest programs into {prebuilt}")


setup(
    packages=[*find_packages(include=["kvmpy", "kvmpy.*"]), "kvmpy.selftests"],
    package_dir={"kvmpy.selftests": "selftests"},
    package_data={"kvmpy": ["py.typed", "testing/suite.ini"]},
    cmdclass={"build_py": BuildPyWithGuests},
)
