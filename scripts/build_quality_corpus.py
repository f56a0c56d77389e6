"""Build the quality model's natural-text corpus from two Debian packages, one file each in
``fluxion_dist/data/quality_corpus`` (one paragraph a line, xz):

- ``austen.txt.xz`` from ``r-cran-janeaustenr``: its ``data/Rdata.rdb`` is a run of records,
  each a 4-byte big-endian uncompressed length then a zlib stream of R's XDR serialisation;
  the six novels are character vectors (one element per line). This parses that format
  directly (no R needed) and joins lines into paragraphs.
- ``kjv.txt.xz`` from ``sword-text-kjv``: a SWORD zText module, per testament a ``.bzs``
  index of (offset, size, uncompressed size) little-endian uint32 triples into a ``.bzz`` run
  of zlib blocks (one per book) of OSIS markup. Notes and titles are dropped, the other tags
  stripped; a paragraph runs from one pilcrow (or chapter) to the next.

    python scripts/build_quality_corpus.py                 # apt-get download both, then extract
    python scripts/build_quality_corpus.py --source kjv --deb PATH  # one source from a .deb
"""

from __future__ import annotations

import argparse
import hashlib
import html
import lzma
import re
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "fluxion_dist" / "data" / "quality_corpus"
RDB = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
ZTEXT = "usr/share/sword/modules/texts/ztext/engKJV2006eb"


class RReader:
    """The subset of R's XDR serialisation that data sets use."""

    def __init__(self, buf: bytes) -> None:
        if buf[:2] != b"X\n":
            raise ValueError("not XDR serialisation")
        self.b, self.p, self.refs = buf, 2, []
        version = self.int()
        self.int(), self.int()
        if version == 3:
            n = self.int()
            self.p += n  # native encoding name

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.b, self.p)
        self.p += 4
        return v

    def length(self) -> int:
        n = self.int()
        if n == -1:
            hi, lo = self.int(), self.int()
            n = (hi << 32) | (lo & 0xFFFFFFFF)
        return n

    def item(self):
        flags = self.int()
        t, attr, tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if t in (254, 253, 252, 251, 250, 242, 241):
            return None
        if t == 255:
            return self.refs[(flags >> 8) - 1]
        if t == 1:  # SYMSXP
            s = self.item()
            self.refs.append(s)
            return s
        if t == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            s = self.b[self.p:self.p + n].decode("utf-8", "replace")
            self.p += n
            return s
        if t in (2, 6, 239, 240):  # pairlist / language
            a = self.item() if attr else None
            k = self.item() if tag else None
            car = self.item()
            cdr = self.item()
            return [(k, car)] + (cdr if isinstance(cdr, list) else [])
        if t in (10, 13):
            n = self.length()
            v = list(struct.unpack_from(f">{n}i", self.b, self.p))
            self.p += 4 * n
        elif t == 14:
            n = self.length()
            v = list(struct.unpack_from(f">{n}d", self.b, self.p))
            self.p += 8 * n
        elif t in (16, 19, 20):
            v = [self.item() for _ in range(self.length())]
        else:
            raise ValueError(f"R type {t} not handled")
        if attr:
            self.item()
        return v


def rdb_records(data: bytes):
    p = 0
    while p < len(data):
        d = zlib.decompressobj()
        out = d.decompress(data[p + 4:])
        yield out
        p = len(data) - len(d.unused_data)


def paragraphs(lines: list[str]) -> list[str]:
    out, cur = [], []
    for ln in lines + [""]:
        ln = (ln or "").strip()
        if ln:
            cur.append(ln)
        elif cur:
            out.append(" ".join(" ".join(cur).replace("_", "").split()))
            cur = []
    return out


def extract(rdb: bytes) -> list[str]:
    paras = []
    for rec in rdb_records(rdb):
        v = RReader(rec).item()
        if isinstance(v, list) and v and all(isinstance(s, (str, type(None))) for s in v) and len(v) > 1000:
            paras += paragraphs(v)
    return paras


def ztext_blocks(bzs: bytes, bzz: bytes):
    """The decompressed blocks of one zText testament, in order."""
    for i in range(len(bzs) // 12):
        off, size, _ = struct.unpack_from("<III", bzs, 12 * i)
        if size:
            yield zlib.decompress(bzz[off:off + size]).decode("utf-8")


def osis_paragraphs(osis: str) -> list[str]:
    text = re.sub(r"<note\b.*?</note>", "", osis, flags=re.S)
    text = re.sub(r"<title\b.*?</title>", "\n", text, flags=re.S)
    text = re.sub(r"<chapter\b[^>]*/>", "\n", text).replace("\u00b6", "\n")
    text = html.unescape(re.sub(r"<[^>]+>", "", text))
    return [p for p in (" ".join(line.split()) for line in text.split("\n")) if p]


def kjv(module: Path) -> list[str]:
    paras = []
    for testament in ("ot", "nt"):
        for block in ztext_blocks((module / f"{testament}.bzs").read_bytes(), (module / f"{testament}.bzz").read_bytes()):
            paras += osis_paragraphs(block)
    return paras


SOURCES = {  # name -> (Debian package, extract(unpacked package root) -> paragraphs)
    "austen": ("r-cran-janeaustenr", lambda root: extract((root / RDB).read_bytes())),
    "kjv": ("sword-text-kjv", lambda root: kjv(root / ZTEXT)),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", choices=[*SOURCES, "all"], default="all")
    ap.add_argument("--deb", type=Path, help="the source's downloaded .deb (one source only)")
    args = ap.parse_args(argv)
    names = list(SOURCES) if args.source == "all" else [args.source]
    if args.deb is not None and len(names) > 1:
        ap.error("--deb names one package: pick its --source")
    OUT.mkdir(parents=True, exist_ok=True)
    for name in names:
        package, read = SOURCES[name]
        with tempfile.TemporaryDirectory() as tmp:
            deb = args.deb
            if deb is None:
                subprocess.run(["apt-get", "download", package], cwd=tmp, check=True)
                deb = next(Path(tmp).glob(f"{package}_*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), f"{tmp}/x"], check=True)
            print(f"{deb.name} sha256 {hashlib.sha256(deb.read_bytes()).hexdigest()}")
            text = "\n".join(read(Path(f"{tmp}/x"))) + "\n"
        blob = lzma.compress(text.encode("utf-8"), preset=9)
        (OUT / f"{name}.txt.xz").write_bytes(blob)
        print(f"{name}.txt.xz: {len(text.split())} words, {len(blob)} bytes xz, "
              f"sha256 {hashlib.sha256(blob).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
