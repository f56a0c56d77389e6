"""scripts/loadgen.py against a fake streaming server on 127.0.0.1 with known delays.

Timing bounds are loose on purpose: the machine is shared and has 2 cores.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from fake_openai_server import FakeServer

REPO = Path(__file__).resolve().parent.parent
LOADGEN = REPO / "scripts" / "loadgen.py"
sys.path.insert(0, str(REPO / "scripts"))

from loadgen_lib.arrivals import arrival_offsets  # noqa: E402
from loadgen_lib.metrics import parse_goodput  # noqa: E402
from loadgen_lib.target import TargetError, check_target  # noqa: E402
from loadgen_lib.workload import LengthSpec, PromptMaker, WorkloadError  # noqa: E402

FIRST_TOKEN_S = 0.15
INTER_TOKEN_S = 0.03
VLLM_KEYS = {
    "duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
    "request_throughput", "request_goodput", "output_throughput", "total_token_throughput",
    "input_lens", "output_lens", "ttfts", "itls", "latencies", "errors",
    "max_output_tokens_per_s", "max_concurrent_requests",
    *(f"{stat}_{m}_ms" for stat in ("mean", "median", "std", "p99") for m in ("ttft", "tpot", "itl", "e2el")),
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def server():
    srv = FakeServer(first_token_s=FIRST_TOKEN_S, inter_token_s=INTER_TOKEN_S).start()
    yield srv
    srv.stop()


def _loadgen(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LOADGEN), "--no-progress", *args],
                          capture_output=True, text=True, timeout=timeout_s)


def test_poisson_and_gamma_gaps_have_the_requested_mean():
    for burstiness in (1.0, 0.5, 4.0):
        offsets = arrival_offsets(20001, rate=10.0, burstiness=burstiness, seed=1)
        assert offsets[0] == 0.0 and offsets == sorted(offsets)
        assert offsets[-1] / 20000 == pytest.approx(0.1, rel=0.05)
    # Lower burstiness spreads the gaps more (gamma CV = 1/sqrt(shape)).
    gaps = {b: [y - x for x, y in zip(o, o[1:], strict=False)]
            for b in (0.5, 4.0) for o in [arrival_offsets(5001, 10.0, b, 2)]}
    spread = {b: max(g) / (sum(g) / len(g)) for b, g in gaps.items()}
    assert spread[0.5] > spread[4.0]
    assert arrival_offsets(3, math.inf, 1.0, 0) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("bad", ["0", "5:3", "a", "1:2:3", ""])
def test_bad_lengths_are_refused(bad):
    with pytest.raises(WorkloadError):
        LengthSpec.parse(bad)


def test_length_specs_and_goodput_parse():
    assert LengthSpec.parse("64:256") == LengthSpec(64, 256)
    assert parse_goodput(["ttft:500", "tpot:50"]) == {"ttft": 500.0, "tpot": 50.0}
    for bad in (["ttft"], ["itl:5"], ["ttft:-1"], ["tpot:x"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)


def test_prompt_units(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20,
                            tokenizers.trainers.BpeTrainer(vocab_size=120, special_tokens=["[UNK]"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    rng = random.Random(0)
    for unit in ("words", "bytes", str(tmp_path / "tokenizer.json")):
        maker = PromptMaker(unit)
        for n in (1, 17, 100):
            assert abs(maker.count(maker.make(n, rng)) - n) <= n // 20, (unit, n)
    with pytest.raises(WorkloadError):
        PromptMaker("no-such-tokenizer.json")


def test_only_loopback_targets_without_allow_remote():
    for url in ("http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:8000", "http://127.8.9.10"):
        check_target(url, allow_remote=False)
    for url in ("http://192.0.2.10:8000", "http://[2001:db8::1]:80"):  # documentation ranges
        with pytest.raises(TargetError, match="--allow-remote"):
            check_target(url, allow_remote=False)
        check_target(url, allow_remote=True)
    with pytest.raises(TargetError):
        check_target("ftp://127.0.0.1", allow_remote=False)


def test_cli_refuses_a_remote_target_before_sending_anything(tmp_path):
    done = _loadgen("--base-url", "http://192.0.2.10:8000", "--model", "m", "--num-prompts", "1",
                    "--result-dir", str(tmp_path))
    assert done.returncode == 2
    assert "--allow-remote" in done.stderr
    assert not list(tmp_path.iterdir())


def test_poisson_run_measures_the_server_delays(server, tmp_path):
    before = len(server.requests)
    done = _loadgen("--base-url", server.base_url, "--num-prompts", "12", "--request-rate", "25",
                    "--burstiness", "0.7", "--input-len", "8:16", "--output-len", "6", "--num-warmups", "2",
                    "--goodput", "ttft:20000", "tpot:20000", "--result-dir", str(tmp_path),
                    "--result-filename", "run.json")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "run.json").read_text())
    assert result.keys() >= VLLM_KEYS, VLLM_KEYS - result.keys()
    assert result["completed"] == 12 and result["failed"] == 0, result["errors"]
    assert result["output_lens"] == [6] * 12
    assert all(8 <= n <= 16 for n in result["input_lens"])  # the server's usage.prompt_tokens
    assert len(server.requests) - before == 12 + 2
    sent = server.requests[-1]
    assert sent["stream"] is True and sent["max_tokens"] == 6 and sent["model"] == "fake-model"

    ttft_ms, itl_ms = FIRST_TOKEN_S * 1000, INTER_TOKEN_S * 1000
    assert 0.8 * ttft_ms <= result["median_ttft_ms"] <= ttft_ms + 500
    assert 0.5 * itl_ms <= result["median_itl_ms"] <= itl_ms + 200
    assert 0.5 * itl_ms <= result["median_tpot_ms"] <= itl_ms + 200
    assert result["mean_e2el_ms"] >= 0.8 * (ttft_ms + 5 * itl_ms)
    assert all(len(itl) == 5 for itl in result["itls"])
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])
    assert result["request_rate"] == 25.0 and result["burstiness"] == 0.7
    assert (tmp_path / "run.png").read_bytes()[:8] == PNG_MAGIC


def test_max_concurrency_caps_requests_in_flight_and_strict_slo_gives_no_goodput(server, tmp_path):
    server.max_in_flight = 0
    done = _loadgen("--base-url", server.base_url, "--num-prompts", "6", "--max-concurrency", "2",
                    "--output-len", "3", "--input-len", "4", "--num-warmups", "0",
                    "--goodput", "ttft:1", "--result-dir", str(tmp_path), "--no-plot")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "fluxion-infqps-concurrency2.json").read_text())
    assert result["completed"] == 6
    assert server.max_in_flight <= 2
    assert result["peak_requests_in_flight"] <= 2
    assert result["request_goodput"] == 0.0  # nobody gets a first token within 1 ms
    assert max(result["queue_times"]) > 0.5 * FIRST_TOKEN_S  # later requests waited for a slot


def test_jsonl_dataset_and_failed_requests(server, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in [
        {"prompt": "alpha beta gamma", "output_len": 2},
        {"prompt": "PLEASE_FAIL now", "max_tokens": 4},
        {"prompt": "delta epsilon"},
    ]) + "\n")
    done = _loadgen("--base-url", server.base_url, "--dataset", str(data), "--num-prompts", "3",
                    "--output-len", "5", "--num-warmups", "0", "--result-dir", str(tmp_path),
                    "--result-filename", "ds.json", "--no-plot")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "ds.json").read_text())
    assert result["completed"] == 2 and result["failed"] == 1
    assert sorted(result["output_lens"]) == [0, 2, 5]
    assert any("HTTP 500" in e for e in result["errors"])
    assert {r["prompt"] for r in server.requests[-3:]} == {"alpha beta gamma", "PLEASE_FAIL now", "delta epsilon"}


def test_sweep_writes_one_file_per_rate_and_a_summary_plot(server, tmp_path):
    done = _loadgen("--base-url", server.base_url, "--sweep", "8,inf", "--num-prompts", "4",
                    "--output-len", "3", "--input-len", "4", "--num-warmups", "0",
                    "--label", "sw", "--result-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    for rate in ("8", "inf"):
        result = json.loads((tmp_path / f"sw-{rate}qps.json").read_text())
        assert result["completed"] == 4
        assert (tmp_path / f"sw-{rate}qps.png").read_bytes()[:8] == PNG_MAGIC
    summary = json.loads((tmp_path / "sw-sweep.json").read_text())
    assert [s["request_rate"] for s in summary] == [8.0, "inf"]
    assert "ttfts" not in summary[0] and "median_ttft_ms" in summary[0]
    assert (tmp_path / "sw-sweep.png").read_bytes()[:8] == PNG_MAGIC
