import sys
from pathlib import Path

from fluxion_dist.quality.corpus import SOURCES, SPECIAL, load_paragraphs, train_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def test_shipped_corpus_reads():
    austen, kjv = (load_paragraphs(path) for path in SOURCES)
    assert 700_000 < sum(len(p.split()) for p in austen) < 740_000
    assert any("Elizabeth Bennet" in p for p in austen)
    assert 780_000 < sum(len(p.split()) for p in kjv) < 800_000
    assert kjv[0].startswith("In the beginning God created the heaven and the earth.")
    assert not any("<" in p or "\u00b6" in p for p in kjv), "markup or pilcrows left"
    assert load_paragraphs() == austen + kjv


def test_osis_reader_strips_markup_and_cuts_paragraphs():
    from build_quality_corpus import osis_paragraphs, ztext_blocks
    import struct
    import zlib

    osis = ('<title type="main">Book</title><chapter n="1"/> In the <w lemma="x">beginning</w>.'
            '<note placement="foot">a note</note> Then &amp; now. \u00b6 A new <transChange>one</transChange>.'
            '<chapter n="2"/>Two.')
    assert osis_paragraphs(osis) == ["In the beginning. Then & now.", "A new one.", "Two."]
    blocks = [zlib.compress(b"first"), zlib.compress("second \u00b6".encode())]
    index = struct.pack("<III", 0, len(blocks[0]), 5) + struct.pack("<III", 0, 0, 0) + \
        struct.pack("<III", len(blocks[0]), len(blocks[1]), 9)
    assert list(ztext_blocks(index, b"".join(blocks))) == ["first", "second \u00b6"]


def test_r_reader_parses_character_vector():
    import struct
    import zlib

    from build_quality_corpus import extract

    def chars(s):
        b = s.encode()
        return struct.pack(">ii", 0x00040009, len(b)) + b
    lines = ["Line one", "continues", "", "Second para", ""] * 250
    body = b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500) + struct.pack(">i", 5) + b"UTF-8"
    body += struct.pack(">ii", 16, len(lines)) + b"".join(chars(s) for s in lines)
    rdb = struct.pack(">i", len(body)) + zlib.compress(body)
    paras = extract(rdb + rdb)
    assert paras[:2] == ["Line one continues", "Second para"] and len(paras) == 1000


def test_bpe_tokenizer_round_trips():
    paras = load_paragraphs()[:2000]
    tok = train_tokenizer(paras, vocab_size=800)
    assert [tok.token_to_id(s) for s in SPECIAL] == list(range(len(SPECIAL)))
    enc = tok.encode(paras[100])
    assert enc.ids[0] == 2 and tok.decode(enc.ids[1:]) == paras[100]
