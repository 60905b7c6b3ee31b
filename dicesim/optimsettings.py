"""The optim config group as typed settings and the learning-rate schedule: what the
config's validation checks without importing torch (dicesim/optim.py builds the
optimizers from them)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dicesim.config import OPTIMIZERS, SCHEDULES, closest
from dicesim.errors import ConfigError

EXAMPLES = {"lr": 0.05, "momentum": 0.9, "dampening": 0, "weight_decay": 0.0005, "eps": 1e-8,
            "min_lr": 0, "warmup_steps": 10, "step_size": 50, "gamma": 0.5}


@dataclass(frozen=True)
class Schedule:
    """η_t for t = 0 … steps − 1 (the index DESIGN §2 gives η)."""

    lr: float
    name: str = "constant"
    steps: int = 1  # the horizon T of the cosine
    min_lr: float = 0.0  # η at the end of a cosine
    warmup_steps: int = 0  # linear_warmup_cosine: η (t + 1) / warmup for t < warmup
    step_size: int = 1  # step: η γ^⌊t / step_size⌋
    gamma: float = 0.1

    def __call__(self, t: int) -> float:
        if self.name == "constant":
            return self.lr
        if self.name == "step":
            return self.lr * self.gamma ** (t // self.step_size)
        warm = self.warmup_steps if self.name == "linear_warmup_cosine" else 0
        if t < warm:
            return self.lr * (t + 1) / warm
        span = max(1, self.steps - warm)
        progress = min(1.0, (t - warm) / span)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class OptimSettings:
    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    gossip_state: bool = False
    schedule: str = "constant"
    min_lr: float = 0.0
    warmup_steps: int = 0
    step_size: int = 1
    gamma: float = 0.1


def optim_settings(cfg, steps: int) -> OptimSettings:
    """The optim group as typed settings, checked (a ConfigError names the key)."""
    get = cfg.get

    def num(key: str, default: float, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False, hi_open: bool = False, kind: type = float) -> float:
        value = get(key, default)
        ok = (isinstance(value, int | float) and not isinstance(value, bool)
              and math.isfinite(value) and (kind is float or float(value).is_integer()))
        if ok and lo is not None:
            ok = value > lo if lo_open else value >= lo
        if ok and hi is not None:
            ok = value < hi if hi_open else value <= hi
        if not ok:
            bounds = [f"{'>' if lo_open else '>='} {lo:g}" if lo is not None else "",
                      f"{'<' if hi_open else '<='} {hi:g}" if hi is not None else ""]
            what = "an integer" if kind is int else "a finite number"
            rng = " and ".join(b for b in bounds if b)
            raise ConfigError(f"optim.{key}={value}: must be {what}{' ' + rng if rng else ''}; "
                              f"e.g. optim.{key}={EXAMPLES.get(key, default)}")
        return kind(value)

    def flag(key: str) -> bool:
        value = get(key, False)
        if not isinstance(value, bool):
            raise ConfigError(f"optim.{key}={value}: must be true or false")
        return value

    def choice(key: str, default: str, choices: tuple[str, ...], hint: str = "") -> str:
        value = get(key, default)
        if value not in choices:
            close = closest(str(value), choices)
            guess = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"optim.{key}={value}: unknown{guess}; choose one of "
                              f"{', '.join(choices)}{hint}")
        return value

    name = choice("name", "sgd", OPTIMIZERS, " (optim=sgd|momentum|adam|adamw)")
    schedule = choice("schedule", "constant", SCHEDULES)
    betas = get("betas", (0.9, 0.999))
    try:
        betas = tuple(betas)
    except TypeError:
        betas = ()
    if len(betas) != 2 or not all(isinstance(b, int | float) and not isinstance(b, bool)
                                  and 0 <= b < 1 for b in betas):
        raise ConfigError(f"optim.betas={list(betas) if betas else get('betas')}: two numbers "
                          "in [0, 1), e.g. [0.9, 0.999]")
    out = OptimSettings(
        name=name, lr=num("lr", 0.05, 0, lo_open=True), momentum=num("momentum", 0.0, 0, 1),
        dampening=num("dampening", 0.0, 0, 1), nesterov=flag("nesterov"),
        weight_decay=num("weight_decay", 0.0, 0), betas=(float(betas[0]), float(betas[1])),
        eps=num("eps", 1e-8, 0, lo_open=True), gossip_state=flag("gossip_state"),
        schedule=schedule, min_lr=num("min_lr", 0.0, 0),
        warmup_steps=num("warmup_steps", 0, 0, kind=int),
        step_size=num("step_size", 1, 1, kind=int), gamma=num("gamma", 0.1, 0, 1, lo_open=True))
    if out.nesterov and (out.momentum <= 0 or out.dampening != 0):
        raise ConfigError("optim.nesterov=true needs optim.momentum > 0 and optim.dampening=0 "
                          "(as torch.optim.SGD)")
    if out.name != "sgd" and (out.momentum or out.nesterov or out.dampening):
        raise ConfigError(f"optim.momentum/nesterov/dampening are SGD's; optim.name={name} uses "
                          "optim.betas")
    if out.schedule == "linear_warmup_cosine" and not 0 < out.warmup_steps < steps:
        raise ConfigError(f"optim.warmup_steps={out.warmup_steps}: linear_warmup_cosine needs "
                          f"0 < warmup_steps < steps ({steps})")
    if out.schedule in ("cosine", "linear_warmup_cosine") and out.min_lr > out.lr:
        raise ConfigError(f"optim.min_lr={out.min_lr}: must not exceed optim.lr={out.lr}")
    if out.gossip_state and not (out.momentum or out.name != "sgd"):
        raise ConfigError("optim.gossip_state=true mixes the optimizer state, but plain SGD "
                          "(optim.momentum=0) has none")
    return out
