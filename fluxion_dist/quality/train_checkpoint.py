"""Resumable training checkpoints: HF-format weights, Adam moments and the trainer's progress.

Layout of a checkpoint directory::

    config.json, model.safetensors    the model, as ``load_model`` reads it
    trainer_state.json                step, training seconds so far, the run's settings
    optimizer/exp_avg.safetensors     Adam first moments, by parameter name
    optimizer/exp_avg_sq.safetensors  Adam second moments

(The moments sit in a subfolder because ``load_model`` reads every ``*.safetensors``
beside config.json, so the checkpoint directory doubles as a model directory.)

Everything is stored in bf16. Each file then stays under the device machine's
16 MiB per-file limit, so a run cut at one 10-minute call resumes in the next from
files that travelled back and forth. Resuming from bf16 weights rounds them once
(relative 2^-8), which training absorbs within a few steps.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fluxion_dist.model.checkpoint import load_model, save_model
from fluxion_dist.model.decoder import CausalLM

_MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True, slots=True)
class TrainerState:
    step: int
    train_seconds: float  # time spent in training steps over all calls: drives the curriculum
    seed: int
    budget_seconds: float
    gate_seconds: float | None  # train_seconds when the short-context phase ended; None: not yet
    level: float = 0.0  # the curriculum level the code tasks have earned (the trainer's ``--level-gate``)
    vt_level: float = 0.0  # variable tracking's own, earned by its accuracy


def named_param_order(model: CausalLM, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order, which is how its state dict indexes them."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]


def save_checkpoint(path: Path, model: CausalLM, optimizer: torch.optim.Optimizer, state: TrainerState) -> None:
    path.mkdir(parents=True, exist_ok=True)
    export = CausalLM(model.arch)
    export.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    save_model(export.to(torch.bfloat16), path)
    names = named_param_order(model, optimizer)
    opt = optimizer.state_dict()["state"]
    (path / "optimizer").mkdir(exist_ok=True)
    for moment in _MOMENTS:
        tensors = {names[i]: s[moment].detach().to("cpu", torch.bfloat16).contiguous() for i, s in opt.items()}
        save_file(tensors, str(path / "optimizer" / f"{moment}.safetensors"))
    (path / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))


def has_checkpoint(path: Path) -> bool:
    return (path / "trainer_state.json").is_file()


def load_checkpoint(path: Path, optimizer_factory, device: torch.device
                    ) -> tuple[CausalLM, torch.optim.Optimizer, TrainerState]:
    """``optimizer_factory(model)`` builds the optimizer the state is loaded into."""
    state = TrainerState(**json.loads((path / "trainer_state.json").read_text()))
    model = load_model(path).to(device).train()
    optimizer = optimizer_factory(model)
    names = named_param_order(model, optimizer)
    moments = {m: load_file(str(path / "optimizer" / f"{m}.safetensors")) for m in _MOMENTS}
    template = optimizer.state_dict()
    template["state"] = {
        i: {"step": torch.tensor(float(state.step)),
            **{m: moments[m][n].to(torch.float32) for m in _MOMENTS}}
        for i, n in enumerate(names) if n in moments[_MOMENTS[0]]}  # none before the first step
    optimizer.load_state_dict(template)
    return model, optimizer, state
