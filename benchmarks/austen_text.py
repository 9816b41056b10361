"""Rebuild benchmarks/data/persuasion-ch1-7.txt, the evaluation text of benchmarks/quality.py.

Source: Jane Austen, *Persuasion* (1818, public domain), chapters 1-7, as shipped in Debian's
package ``r-cran-janeaustenr`` 1.0.0-1 (Julia Silge's janeaustenr R package, MIT, which
carries the Project Gutenberg text line by line). Real English prose, not model output; about
25,300 SmolLM2 tokens. The hard-wrapped lines are joined into paragraphs (one blank line
between paragraphs), which is how the text reads, not how it was typeset.

    python benchmarks/austen_text.py            # apt-get download + parse; writes the file

It needs apt (Debian) and no R: the package's lazy-load database (Rdata.rdb/.rdx) is read
here with a minimal reader of R's XDR serialization (character vectors, lists, symbols).
"""
from __future__ import annotations

import gzip
import re
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

OUT = Path(__file__).with_name("data") / "persuasion-ch1-7.txt"
DATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"


class _RReader:
    def __init__(self, b: bytes):
        self.b, self.p, self.refs = b, 0, []

    def int(self) -> int:
        v = struct.unpack(">i", self.b[self.p:self.p + 4])[0]
        self.p += 4
        return v

    def read(self):
        f = self.int()
        t, has_attr, has_tag = f & 0xFF, f & (1 << 9), f & (1 << 10)
        if t in (254, 242, 253):  # NULL, empty env, global env
            return None
        if t == 255:  # reference to an earlier symbol
            return self.refs[(f >> 8) - 1]
        if t == 1:  # symbol
            v = self.read()
            self.refs.append(v)
            return v
        if t == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            v = self.b[self.p:self.p + n].decode("utf-8", "replace")
            self.p += n
            return v
        if t == 2:  # pairlist
            out = {}
            while True:
                if has_attr:
                    self.read()
                tag = self.read() if has_tag else None
                out[tag] = self.read()
                f = self.int()
                t, has_attr, has_tag = f & 0xFF, f & (1 << 9), f & (1 << 10)
                if t == 254:
                    return out
        if t in (16, 19, 20):  # character vector, list, expression
            v = [self.read() for _ in range(self.int())]
            attrs = self.read() if has_attr else None
            return dict(zip(attrs["names"], v)) if attrs and "names" in attrs else v
        if t in (10, 13):  # logical, integer
            n = self.int()
            v = list(struct.unpack(f">{n}i", self.b[self.p:self.p + 4 * n]))
            self.p += 4 * n
            if has_attr:
                self.read()
            return v
        raise ValueError(f"R type {t} is not handled")


def _unserialize(b: bytes):
    assert b[:2] == b"X\n", "not an R XDR stream"
    r = _RReader(b)
    r.p = 2
    version = r.int()
    r.int(), r.int()
    if version == 3:
        n = r.int()  # native encoding name
        r.p += n
    return r.read()


def austen_book(root: Path, name: str) -> str:
    index = _unserialize(gzip.decompress((root / f"{DATA}.rdx").read_bytes()))
    off, length = index["variables"][name]
    blob = (root / f"{DATA}.rdb").read_bytes()[off:off + length]
    return "\n".join(line or "" for line in _unserialize(zlib.decompress(blob[4:])))


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=tmp, check=True)
        deb = next(Path(tmp).glob("*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")], check=True)
        book = austen_book(Path(tmp) / "x", "persuasion")
    paragraphs = [re.sub(r"\s*\n\s*", " ", p.strip()) for p in re.split(r"\n\s*\n", book)]
    text = "\n\n".join(p for p in paragraphs if p)
    chapters = [m.start() for m in re.finditer(r"^Chapter \d+$", text, flags=re.M)]
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(text[chapters[0]:chapters[7]].rstrip() + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
