import sys
from pathlib import Path

from fluxion_dist.quality.corpus import SPECIAL, load_paragraphs, train_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def test_shipped_corpus_reads():
    paras = load_paragraphs()
    assert paras[0] == "SENSE AND SENSIBILITY" or "EMMA" in paras[:5] or len(paras) > 10000
    words = sum(len(p.split()) for p in paras)
    assert 700_000 < words < 740_000
    assert any("Elizabeth Bennet" in p for p in paras)


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
