"""Guest ELF images, read with pyelftools: loadable segments and symbols.

:meth:`GuestImage.load` parses a file once per process while it is unchanged: most guest tests
build a VM from the same few ELFs, and pyelftools takes ~0.3 s per parse in a TCG VM.
"""

from __future__ import annotations

import bisect
import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Segment:
    """A PT_LOAD segment: ``data`` goes at guest-physical ``paddr`` (``memsz`` bytes, zero-filled
    past the file data)."""

    vaddr: int
    paddr: int
    data: bytes
    memsz: int
    writable: bool
    executable: bool


class GuestImage:
    """A static guest ELF: segments, symbols (functions and objects) and the entry point."""

    _loaded: dict[tuple[int, int, int, int], GuestImage] = {}

    @classmethod
    def load(cls, path: str | Path) -> GuestImage:
        """The image of ``path``, parsed once per process while the file (inode, size, mtime)
        is unchanged. Treat it as read-only: it is shared."""
        p = Path(path)
        st = p.stat()
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)  # no resolve(): a stat a part
        img = cls._loaded.get(key)
        if img is None:
            img = cls._loaded[key] = cls(p)
        return img

    def __init__(self, path: str | Path) -> None:
        from elftools.elf.constants import P_FLAGS
        from elftools.elf.elffile import ELFFile
        from elftools.elf.sections import SymbolTableSection

        self.path = Path(path)
        with open(self.path, "rb") as f:
            elf = ELFFile(f)
            if elf.get_machine_arch() != "x64" or elf.elfclass != 64:
                raise ValueError(f"{self.path}: not an x86-64 ELF64 file")
            if elf["e_type"] != "ET_EXEC":
                raise ValueError(f"{self.path}: not a static executable (e_type "
                                 f"{elf['e_type']})")
            self.entry: int = elf["e_entry"]
            self.segments: list[Segment] = []
            for seg in elf.iter_segments():
                if seg["p_type"] != "PT_LOAD" or seg["p_memsz"] == 0:
                    continue
                self.segments.append(Segment(
                    vaddr=seg["p_vaddr"], paddr=seg["p_paddr"], data=seg.data(),
                    memsz=seg["p_memsz"], writable=bool(seg["p_flags"] & P_FLAGS.PF_W),
                    executable=bool(seg["p_flags"] & P_FLAGS.PF_X)))
            self.symbols: dict[str, int] = {}
            self._sizes: dict[str, int] = {}
            for sec in elf.iter_sections():
                if not isinstance(sec, SymbolTableSection):
                    continue
                for sym in sec.iter_symbols():
                    if sym.name and sym["st_info"]["type"] in ("STT_FUNC", "STT_OBJECT",
                                                               "STT_NOTYPE"):
                        if sym["st_shndx"] == "SHN_UNDEF":
                            continue
                        self.symbols.setdefault(sym.name, sym["st_value"])
                        self._sizes.setdefault(sym.name, sym["st_size"])
        if not self.segments:
            raise ValueError(f"{self.path}: no loadable segments")
        by_addr = sorted((a, n) for n, a in self.symbols.items())
        self._addrs = [a for a, _ in by_addr]
        self._names = [n for _, n in by_addr]

    @property
    def low(self) -> int:
        return min(s.paddr for s in self.segments)

    @property
    def high(self) -> int:
        return max(s.paddr + s.memsz for s in self.segments)

    def symbol(self, name: str) -> int:
        """A symbol's address; KeyError names the image and close matches."""
        try:
            return self.symbols[name]
        except KeyError:
            near = sorted(n for n in self.symbols if name.lower() in n.lower())[:5]
            hint = f" (similar: {', '.join(near)})" if near else ""
            raise KeyError(f"no symbol {name!r} in guest image {self.path.name}{hint}") from None

    def symbolize(self, addr: int) -> str:
        """``name+0xoff`` for an address inside the image, else the bare hex address."""
        i = bisect.bisect_right(self._addrs, addr) - 1
        if i >= 0 and self.low <= addr < self.high:
            name = self._names[i]
            off = addr - self._addrs[i]
            size = self._sizes.get(name, 0)
            if size == 0 or off < size or off < 0x1000:
                return f"{addr:#x} ({name}+{off:#x})"
        return f"{addr:#x}"


__all__ = ["GuestImage", "Segment"]
