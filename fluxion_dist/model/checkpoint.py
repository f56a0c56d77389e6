"""Load and write Hugging Face-format checkpoint directories (config.json + *.safetensors).

Every tensor is checked against the architecture before any is used: a missing,
unexpected or wrongly shaped tensor is one ModelLoadError naming the file and tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fluxion_dist.errors import ModelLoadError
from fluxion_dist.model.arch import ModelArch
from fluxion_dist.model.decoder import CausalLM

_INDEX = "model.safetensors.index.json"


def read_arch(path: Path) -> ModelArch:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path}: not a checkpoint directory (no config.json)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_file}: invalid JSON: {e}") from None
    return ModelArch.from_hf(cfg, source=str(cfg_file))


def _weight_files(path: Path) -> list[Path]:
    index = path / _INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index}: malformed index ({e})") from None
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index}: names shard(s) that do not exist: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors weight files")
    return files


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> CausalLM:
    path = Path(path)
    arch = read_arch(path)
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for f in _weight_files(path):
        try:
            tensors = load_file(f)
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{f}: unreadable safetensors file ({e})") from None
        for name, t in tensors.items():
            state[name] = t
            origin[name] = f.name
    model = CausalLM(arch)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ModelLoadError(f"{path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    # Tied checkpoints often still carry lm_head.weight; HF ignores it too.
    unexpected = sorted(set(state) - set(expected) - {"lm_head.weight"})
    if unexpected:
        raise ModelLoadError(f"{path}: unexpected tensor(s) {unexpected[:5]} for {arch.architecture}")
    for name, ref in expected.items():
        if state[name].shape != ref.shape:
            raise ModelLoadError(
                f"{path / origin[name]}: tensor {name!r} has shape {tuple(state[name].shape)}, "
                f"config.json implies {tuple(ref.shape)}")
    model.load_state_dict({k: state[k].to(torch.float32) for k in expected})
    return model.to(dtype).eval()


def save_model(model: CausalLM, path: str | Path) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    hf = model.arch.to_hf()
    hf["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
