"""The decoder: incremental decode equals a full forward; our logits equal transformers'."""

import json

import pytest
import torch

from fluxion_dist.errors import ModelLoadError
from fluxion_dist.model.arch import ModelArch, RopeScaling
from fluxion_dist.model.checkpoint import load_model, save_model
from fluxion_dist.model.dense_cache import DenseKVCache
from fluxion_dist.model.tiny import TINY_ARCH, tiny_model


def _arch(architecture="llama", **kw):
    base = dict(architecture=architecture, vocab_size=97, hidden_size=64, intermediate_size=96,
                num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                rms_norm_eps=1e-6, rope_theta=5000.0, max_position_embeddings=4096,
                tie_word_embeddings=False)
    base.update(kw)
    return ModelArch(**base)


def test_incremental_decode_reproduces_full_forward():
    model = tiny_model(seed=3)
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, TINY_ARCH.vocab_size, (90,), generator=g)
    prompt_len = 20
    cache = DenseKVCache(TINY_ARCH.num_hidden_layers)
    cache.add_sequence(model.prefill(seq[:prompt_len]))
    full = model.prefill(seq).logits
    worst = 0.0
    for pos in range(prompt_len, seq.numel()):  # 70 decode steps
        logits = model.decode_step(seq[pos:pos + 1], torch.tensor([pos]), cache)
        worst = max(worst, (logits[0] - full[pos]).abs().max().item())
    assert worst <= 1e-5, worst
    assert cache.seq_len(0) == seq.numel()


def test_batched_decode_equals_one_at_a_time():
    model = tiny_model(seed=4)
    prompts = [torch.randint(0, 258, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 17, 33)]
    batch = DenseKVCache(4)
    singles = []
    for p in prompts:
        batch.add_sequence(model.prefill(p))
        c = DenseKVCache(4)
        c.add_sequence(model.prefill(p))
        singles.append(c)
    toks = torch.tensor([7, 8, 9])
    pos = torch.tensor([p.numel() for p in prompts])
    got = model.decode_step(toks, pos, batch)
    for i, c in enumerate(singles):
        want = model.decode_step(toks[i:i + 1], pos[i:i + 1], c)
        torch.testing.assert_close(got[i], want[0], rtol=1e-5, atol=1e-5)


def _hf_logits(path, tokens):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(tokens[None]).logits[0]


@pytest.mark.parametrize("arch", [
    _arch("llama"),
    _arch("llama", tie_word_embeddings=True, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64),
          rope_theta=500000.0),
    _arch("qwen3"),
    _arch("llama", attention_bias=True, num_key_value_heads=8),
], ids=["llama", "llama3-rope-scaling-tied", "qwen3-qk-norm", "llama-bias-mha"])
def test_logits_match_transformers(tmp_path, arch):
    model = tiny_model(seed=5, arch=arch)
    save_model(model, tmp_path)
    tokens = torch.randint(0, arch.vocab_size, (300,), generator=torch.Generator().manual_seed(1))
    ours = load_model(tmp_path).prefill(tokens).logits
    theirs = _hf_logits(tmp_path, tokens)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_sharded_checkpoint_loads(tmp_path):
    from safetensors.torch import load_file, save_file
    model = tiny_model(seed=6, arch=_arch())
    save_model(model, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for f, ns in shards.items():
        save_file({n: state[n] for n in ns}, str(tmp_path / f))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: f for f, ns in shards.items() for n in ns}}))
    tokens = torch.arange(40) % 97
    torch.testing.assert_close(load_model(tmp_path).prefill(tokens).logits, model.prefill(tokens).logits)


def test_bad_checkpoints_get_one_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)
    model = tiny_model(seed=7, arch=_arch())
    save_model(model, tmp_path)
    f = tmp_path / "model.safetensors"
    state = load_file(f)
    dropped = dict(state)
    del dropped["model.layers.1.mlp.up_proj.weight"]
    save_file(dropped, str(f))
    with pytest.raises(ModelLoadError, match=r"missing tensor\(s\) \['model.layers.1.mlp.up_proj.weight'\]"):
        load_model(tmp_path)
    bad = dict(state)
    bad["model.norm.weight"] = torch.ones(3)
    save_file(bad, str(f))
    with pytest.raises(ModelLoadError, match=r"model.safetensors: tensor 'model.norm.weight' has shape \(3,\)"):
        load_model(tmp_path)
    f.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="unreadable safetensors"):
        load_model(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"config.json: unsupported architecture \['MambaForCausalLM'\]"):
        load_model(tmp_path)
    del cfg["architectures"]
    cfg["architectures"] = ["LlamaForCausalLM"]
    del cfg["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="missing required key 'hidden_size'"):
        load_model(tmp_path)
