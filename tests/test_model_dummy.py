"""load_format: dummy, shipped 8B config.json shapes, model.device, and their config validation."""

import pytest
import torch

from fluxion_dist.config.loader import config_from_dict, load_config
from fluxion_dist.config.schema import ModelConfig
from fluxion_dist.errors import ConfigError, ModelLoadError
from fluxion_dist.model.arch import ModelArch
from fluxion_dist.model.loader import checkpoint_dir, dummy_model, load_from_config, read_hf_config


@pytest.mark.parametrize("name,layers,qk", [("llama-3.1-8b", 32, False), ("qwen3-8b", 36, True)])
def test_shipped_8b_configs(name, layers, qk):
    arch = read_hf_config(checkpoint_dir(ModelConfig(path=f"builtin:{name}", load_format="dummy")))
    assert (arch.num_hidden_layers, arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim) == (
        layers, 32, 8, 128)
    assert arch.qk_norm is qk


def test_dummy_needs_path_and_names_field():
    with pytest.raises(ConfigError, match="model.load_format"):
        config_from_dict({"model": {"load_format": "dummy"}})
    with pytest.raises(ConfigError, match="model.load_format"):
        config_from_dict({"model": {"load_format": "random"}})
    with pytest.raises(ConfigError, match="model.device"):
        config_from_dict({"model": {"device": "tpu"}})


def test_unknown_builtin():
    with pytest.raises(ModelLoadError, match="model.path"):
        checkpoint_dir(ModelConfig(path="builtin:nope", load_format="dummy"))


@pytest.mark.parametrize("name", ["llama-3.1-8b", "qwen3-8b"])
def test_dummy_small_shape_runs(name):
    # The 8B shape with few layers / narrow width, so it runs on 2 cores: same code path.
    arch = read_hf_config(checkpoint_dir(ModelConfig(path=f"builtin:{name}")))
    small = ModelArch(**{**{f: getattr(arch, f) for f in arch.__slots__},
                         "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512,
                         "num_hidden_layers": 2})
    m = dummy_model(small, "cpu", torch.bfloat16, seed=1)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in m.parameters())
    assert m.rotary.inv_freq.dtype == torch.float32
    out = m.prefill(torch.arange(20), all_logits=False)
    assert torch.isfinite(out.logits).all() and out.keys[0].dtype == torch.bfloat16
    m2 = dummy_model(small, "cpu", torch.bfloat16, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))


def test_load_from_config_cpu_default_unchanged():
    model, _ = load_from_config(ModelConfig())
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.parametrize("name", ["llama-3.1-8b", "qwen3-8b"])
def test_deploy_yamls_validate(name):
    cfg = load_config(f"cluster_configs/deploy_{name}_dummy_gpu.yaml")
    assert cfg.model.load_format == "dummy" and cfg.model.device == "auto"
