import subprocess
import sys
from pathlib import Path

from fluxion_dist.model.tokenizer import ByteTokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_byte_tokenizer_round_trips_utf8():
    tok = ByteTokenizer()
    ids = tok.encode("héllo ✓")
    assert ids[0] == tok.BOS and max(ids) < tok.vocab_size
    assert tok.decode(ids) == "héllo ✓"


def test_hf_tokenizer_json_is_used_when_present(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"[UNK]": 0, "long": 1, "context": 2, "kv": 3}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path, eos_token_id=3)
    assert tok.encode("long context kv zzz") == [1, 2, 3, 0]
    assert tok.vocab_size == 4 and tok.eos_token_id == 3
    assert isinstance(load_tokenizer(None, None), ByteTokenizer)


def test_demo_serves_requests_through_the_deployment():
    out = subprocess.run([sys.executable, "-m", "fluxion_dist.cli", "demo",
                          str(ROOT / "cluster_configs/deploy_cpu_demo.yaml"), "--max-tokens", "8", "--port", "0"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "GET /health -> True" in out.stdout
    assert out.stdout.count("[stream]") == 1 and out.stdout.count("(8 tokens") == 2


def test_demo_questions_follow_the_shipped_models_tokenizer(tmp_path):
    """v1 ships: word-vocabulary questions; a v2 model directory (BPE with <eoa>): RULER
    questions whose text the serving tokenizer turns back into the evaluated ids."""
    import numpy as np

    from fluxion_dist.quality.demo_prompts import demo_questions
    from fluxion_dist.quality.model import write_text_tokenizer
    from fluxion_dist.quality.tasks import TaskSuite
    from fluxion_dist.quality.text_vocab import load_text_vocab

    assert [q.task for q in demo_questions(512)] == ["kv_retrieval", "passkey", "var_tracking"]
    write_text_tokenizer(tmp_path)
    tv = load_text_vocab()
    tok = load_tokenizer(tmp_path, tv.eoa)
    questions = demo_questions(1500, seed=3, model_dir=tmp_path)
    assert [q.task for q in questions] == ["niah_multikey", "vt_chains", "qa_facts"]
    rng = np.random.default_rng(3)
    suite = TaskSuite.for_model(tmp_path)
    for q in questions:
        sample = suite.make_sample(q.task, rng, 1500)
        assert tok.encode(q.prompt) == sample.prompt().tolist()
        assert q.answer == sample.texts[0][1] and q.prompt.endswith("Answer:")
