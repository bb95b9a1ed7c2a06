"""The typed configuration tree of a training run.

A recipe is a YAML file whose sections mirror the dataclasses below. It is loaded with
`load_config(path, overrides)`, where each override is `section.key=value` and the value is
coerced to the field's type. Unknown keys are errors with a did-you-mean; `validate` checks
every value before anything heavy starts. The DeepSpeed JSON config stays a separate file
(`nitp_ds.ds_config` derives and checks it against this tree).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nitp_ds.errors import NITPError
from nitp_ds.models.families import FAMILY_NAMES as FAMILIES

NITP_HEADS = ("swiglu", "mlp", "linear", "none")
NITP_LOSSES = ("cosine", "mse")
SCHEDULES = ("cosine", "wsd", "constant")
AUX_SCOPES = ("micro_batch", "global")
WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class DataConfig:
    path: str = ""  # a directory written by `nitp prepare-data`
    seq_len: int = 512
    weights: dict[str, float] = field(default_factory=dict)  # per-source blend weights; empty = the manifest's


@dataclass
class ModelConfig:
    family: str = "qwen3_moe"
    pretrained: str | None = None  # a local Hugging Face directory; the shape fields below are then ignored
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None  # default: hidden_size // num_heads
    num_experts: int = 8
    experts_per_token: int = 2
    moe_intermediate_size: int = 256
    intermediate_size: int = 1024  # dense MLP layers and shared experts
    vocab_size: int = 0  # 0: the vocabulary of the prepared data
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Draw the initial weights with the host's CPU generator (bit for bit an ordinary build on the host; ~120M
    # values/s, about 30 s per 3.5B parameters) instead of the training device's (same on any world size too)
    init_on_host: bool = False
    attn_implementation: str = "sdpa"
    extra: dict[str, Any] = field(default_factory=dict)  # passed as-is to the Hugging Face config


@dataclass
class NITPConfig:
    weight: float = 1.0  # λ; 0 with head "none" is plain next-token prediction
    target_layer: int | None = None  # z = output of the first k decoder layers; default round(0.2 * num_layers)
    head: str = "swiglu"  # swiglu (the paper's 12d² head), mlp (GELU), linear, none
    head_mult: int = 4  # hidden width of swiglu/mlp heads, in multiples of hidden_size
    # The paper's ablations; the defaults are the paper's method.
    loss: str = "cosine"  # cosine: 1 - cos(P(h_t), z); mse: mean squared error (the paper: diverges)
    stop_grad: bool = True  # false: the NITP loss also trains the first k layers through the target
    offset: int = 1  # 1: the target of position t is z_{t+1} (next token); 0: z_t (same position)
    weight_warmup_steps: int = 0  # λ ramps linearly from 0 to nitp.weight over this many optimizer steps; 0: off


@dataclass
class MoEConfig:
    aux_loss_weight: float = 0.001  # α of the Switch-style load-balancing loss
    z_loss_weight: float = 0.0  # β of the router z-loss
    aux_loss_scope: str = "micro_batch"  # or "global": expert loads summed over the data-parallel group


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    fused: bool | None = None  # None: fused AdamW where the accelerator has it


@dataclass
class ScheduleConfig:
    kind: str = "cosine"  # cosine, wsd (warmup-stable-decay), constant
    warmup_steps: int = 100
    decay_ratio: float = 0.2  # wsd: fraction of the steps spent decaying
    min_lr_ratio: float = 0.1  # final lr as a fraction of optim.lr


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    steps: int = 1000
    micro_batch_size: int = 8
    grad_accum: int = 1
    seed: int = 1234
    eval_every: int = 200  # 0: only at the end
    eval_tokens: int = 1_000_000  # cap on scored validation tokens, spread over the whole val split (evaluate.py)
    activation_checkpointing: bool = False
    ce_chunk_tokens: int = 8192  # cross-entropy is computed this many tokens at a time
    compile_loss: bool | None = None  # torch.compile the cross-entropy's softmax gradient, the NITP loss; None: CUDA only
    compile_layers: bool | None = None  # torch.compile each decoder layer's and the NITP head's forward; None: CUDA only
    zero3_fetch: str = "layer"  # layer: each decoder layer is one ZeRO-3 fetch unit; module: one per module
    fast_zero_step: bool = True  # ZeRO-3's step without its fp64-norm, flatten and unscale passes; one_rank.py
    gc_every: int = 50  # automatic Python GC paused in the loop, young generations collected every N steps; 0: off
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    deterministic: bool = False
    memory_check: bool = True  # refuse at start-up a run whose memory plan exceeds the GPU (or host) memory


@dataclass
class CheckpointConfig:
    every: int = 500  # 0: only at the end
    keep_last: int = 3  # 0: keep all
    resume: str = "auto"  # auto (newest complete checkpoint in out_dir), never, or a checkpoint path
    # Copy the state to host memory and write the files in a thread while training goes on (the save blocks
    # only for the copy); a file whose copy would not fit in 3/4 of the free host memory is written at once
    async_save: bool = True


@dataclass
class WandbConfig:
    project: str | None = None  # set it to log to Weights & Biases (needs `pip install nitp-ds[wandb]`)
    name: str | None = None  # the W&B run name; default: the run directory's name
    mode: str | None = None  # online, offline or disabled; default: W&B's own (WANDB_MODE, else online)


@dataclass
class LoggingConfig:
    every: int = 10
    tensorboard: bool = True
    expert_load: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    nitp: NITPConfig = field(default_factory=NITPConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ---------------------------------------------------------------------------------------------
# Loading: YAML -> dict -> dataclasses, with overrides and did-you-mean for unknown keys
# ---------------------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a recipe (or the defaults when `path` is None), apply `key.path=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(Path(path))
    cfg = from_dict(raw)
    for item in overrides or []:
        apply_override(cfg, item)
    return cfg


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise NITPError(f"recipe {path} does not exist; pass --config with a YAML recipe (see recipes/)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise NITPError(f"recipe {path} is not valid YAML{where}; fix the syntax") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise NITPError(f"recipe {path} must be a mapping of sections (data:, model:, ...), not {type(raw).__name__}")
    return raw


# Keys that were replaced by others: a recipe or override that sets one is refused with the replacement named.
REPLACED_KEYS = {
    "train.eval_batches": "train.eval_tokens, a cap on scored validation tokens spread evenly over the whole val "
                          "split (default 1,000,000; docs/metrics.md)",
}


def from_dict(raw: dict[str, Any], drop_replaced: bool = False) -> Config:
    """The config tree of a recipe's mapping; `drop_replaced` ignores REPLACED_KEYS instead of refusing them (for a
    run directory's resolved_config.yaml written by an older version)."""
    if drop_replaced:
        raw = {section: ({k: v for k, v in values.items() if f"{section}.{k}" not in REPLACED_KEYS}
                         if isinstance(values, dict) else values) for section, values in raw.items()}
    return _build(Config, raw, prefix="")


def _refuse_replaced(dotted: str) -> None:
    if dotted in REPLACED_KEYS:
        raise NITPError(f"'{dotted}' was replaced by {REPLACED_KEYS[dotted]}; set that instead")


def to_dict(cfg: Config) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return list(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the recipe"
    if not isinstance(raw, dict):
        raise NITPError(f"{where} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in names:
            _refuse_replaced(f"{prefix}{key}")
            raise NITPError(f"unknown key '{prefix}{key}'{_did_you_mean(str(key), names, prefix)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value if value is not None else {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, f"{prefix}{key}")
    return cls(**kwargs)


def _did_you_mean(key: str, choices: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f"; valid keys: {', '.join(prefix + c for c in choices)}"


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Coerce a YAML or command-line value to the annotated type, or say what was expected."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        last_error: NITPError | None = None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except NITPError as exc:
                last_error = exc
        assert last_error is not None
        raise last_error
    if hint is Any:
        return value
    if origin is dict:
        if isinstance(value, str):
            value = _parse_literal(value)
        if not isinstance(value, dict):
            raise NITPError(f"{key} must be a mapping, got {value!r}")
        return {str(k): (_coerce(v, args[1], f"{key}.{k}") if args else v) for k, v in value.items()}
    if origin in (tuple, list):
        if isinstance(value, str):
            value = _parse_literal(value)
        if not isinstance(value, (list, tuple)):
            raise NITPError(f"{key} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise NITPError(f"{key} must have {len(args)} items, got {len(value)}: {list(value)!r}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        inner = args[0] if args else Any
        return origin(_coerce(v, inner, key) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise NITPError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise NITPError(f"{key} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise NITPError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool):
            raise NITPError(f"{key} must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise NITPError(f"{key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise NITPError(f"{key} must be a string, got {value!r}")
    return value


def _parse_literal(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(cfg: Config, item: str) -> None:
    """Apply one `section.key=value` override in place, with the same checks as the recipe."""
    if "=" not in item:
        raise NITPError(f"override '{item}' must look like section.key=value (e.g. train.steps=100)")
    dotted, text = item.split("=", 1)
    parts = dotted.strip().split(".")
    target: Any = cfg
    prefix = ""
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(target)]
        if part not in names:
            _refuse_replaced(f"{prefix}{part}")
            raise NITPError(f"unknown key '{prefix}{part}' in override '{item}'{_did_you_mean(part, names, prefix)}")
        hint = typing.get_type_hints(type(target))[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(hint):
                raise NITPError(f"override '{item}' names a whole section; set one key, e.g. {dotted}.<key>=...")
            value = _parse_literal(text) if text.strip() != "" else ""
            if hint is str or typing.get_args(hint) == (str, type(None)):
                value = text  # strings stay verbatim (paths, names), except none/null for optionals
            setattr(target, part, _coerce(value, hint, dotted))
            return
        if not dataclasses.is_dataclass(hint):
            raise NITPError(f"override '{item}': '{prefix}{part}' is a value, not a section")
        target = getattr(target, part)
        prefix += part + "."


# ---------------------------------------------------------------------------------------------
# Validation: every value is checked before anything heavy starts
# ---------------------------------------------------------------------------------------------


def validate(cfg: Config) -> Config:
    m, n, t = cfg.model, cfg.nitp, cfg.train

    def need(cond: bool, message: str) -> None:
        if not cond:
            raise NITPError(message)

    need(m.family in FAMILIES, f"model.family '{m.family}' is not supported; use one of {', '.join(FAMILIES)}")
    if m.pretrained is None:
        need(m.num_layers >= 1, f"model.num_layers must be >= 1, got {m.num_layers}")
        need(m.hidden_size >= 1, f"model.hidden_size must be >= 1, got {m.hidden_size}")
        need(m.num_heads >= 1 and m.hidden_size % m.num_heads == 0 or m.head_dim is not None,
             f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_heads ({m.num_heads}), "
             "or set model.head_dim")
        need(m.num_kv_heads >= 1 and m.num_heads % m.num_kv_heads == 0,
             f"model.num_heads ({m.num_heads}) must be a multiple of model.num_kv_heads ({m.num_kv_heads})")
        need(m.num_experts >= 1, f"model.num_experts must be >= 1, got {m.num_experts}")
        need(1 <= m.experts_per_token <= m.num_experts,
             f"model.experts_per_token ({m.experts_per_token}) must be between 1 and model.num_experts "
             f"({m.num_experts})")
        need(m.vocab_size >= 0, f"model.vocab_size must be >= 0 (0 takes the data's), got {m.vocab_size}")
        need(m.max_seq_len >= cfg.data.seq_len,
             f"data.seq_len ({cfg.data.seq_len}) exceeds model.max_seq_len ({m.max_seq_len}); "
             "lower data.seq_len or raise model.max_seq_len")
        from nitp_ds.resolve import resolve_target_layer

        resolve_target_layer(cfg, m.num_layers)
    need(n.head in NITP_HEADS, f"nitp.head '{n.head}' is not one of {', '.join(NITP_HEADS)}")
    need(n.weight >= 0, f"nitp.weight must be >= 0, got {n.weight}")
    need(not (n.head == "none" and n.weight > 0),
         f"nitp.weight is {n.weight} but nitp.head is 'none'; set nitp.weight=0 for plain next-token "
         "prediction, or choose a head (swiglu)")
    need(n.head_mult >= 1, f"nitp.head_mult must be >= 1, got {n.head_mult}")
    need(n.loss in NITP_LOSSES, f"nitp.loss '{n.loss}' is not one of {', '.join(NITP_LOSSES)}")
    need(n.offset in (0, 1), f"nitp.offset must be 1 (next token's target) or 0 (same position), got {n.offset}")
    need(n.weight_warmup_steps >= 0,
         f"nitp.weight_warmup_steps must be >= 0 (0: λ constant from step 0), got {n.weight_warmup_steps}")
    need(cfg.moe.aux_loss_weight >= 0, f"moe.aux_loss_weight must be >= 0, got {cfg.moe.aux_loss_weight}")
    need(cfg.moe.z_loss_weight >= 0, f"moe.z_loss_weight must be >= 0, got {cfg.moe.z_loss_weight}")
    need(cfg.moe.aux_loss_scope in AUX_SCOPES,
         f"moe.aux_loss_scope '{cfg.moe.aux_loss_scope}' is not one of {', '.join(AUX_SCOPES)}")
    need(cfg.optim.lr > 0, f"optim.lr must be > 0, got {cfg.optim.lr}")
    need(all(0 <= b < 1 for b in cfg.optim.betas), f"optim.betas must be in [0, 1), got {list(cfg.optim.betas)}")
    need(cfg.optim.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {cfg.optim.weight_decay}")
    need(cfg.optim.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables), got {cfg.optim.grad_clip}")
    need(cfg.schedule.kind in SCHEDULES, f"schedule.kind '{cfg.schedule.kind}' is not one of {', '.join(SCHEDULES)}")
    need(cfg.schedule.warmup_steps >= 0, f"schedule.warmup_steps must be >= 0, got {cfg.schedule.warmup_steps}")
    need(0 <= cfg.schedule.decay_ratio <= 1, f"schedule.decay_ratio must be in [0, 1], got {cfg.schedule.decay_ratio}")
    need(0 <= cfg.schedule.min_lr_ratio <= 1,
         f"schedule.min_lr_ratio must be in [0, 1], got {cfg.schedule.min_lr_ratio}")
    need(cfg.data.seq_len >= 2, f"data.seq_len must be >= 2, got {cfg.data.seq_len}")
    need(all(w >= 0 for w in cfg.data.weights.values()),
         f"data.weights must be >= 0, got {cfg.data.weights}")
    need(t.steps >= 0, f"train.steps must be >= 0, got {t.steps}")
    need(t.micro_batch_size >= 1, f"train.micro_batch_size must be >= 1, got {t.micro_batch_size}")
    need(t.grad_accum >= 1, f"train.grad_accum must be >= 1, got {t.grad_accum}")
    need(t.eval_every >= 0, f"train.eval_every must be >= 0, got {t.eval_every}")
    need(t.eval_tokens >= cfg.data.seq_len, f"train.eval_tokens ({t.eval_tokens}) must be at least one sequence "
         f"of data.seq_len = {cfg.data.seq_len} tokens")
    need(t.ce_chunk_tokens >= 1, f"train.ce_chunk_tokens must be >= 1, got {t.ce_chunk_tokens}")
    need(t.gc_every >= 0, f"train.gc_every must be >= 0 (0: Python's automatic garbage collection), got {t.gc_every}")
    need(t.zero3_fetch in ("layer", "module"), f"train.zero3_fetch must be 'layer' or 'module', got '{t.zero3_fetch}'")
    need(t.max_bad_steps >= 1, f"train.max_bad_steps must be >= 1, got {t.max_bad_steps}")
    need(bool(t.out_dir), "train.out_dir must be set (the run directory)")
    need(cfg.checkpoint.every >= 0, f"checkpoint.every must be >= 0, got {cfg.checkpoint.every}")
    need(cfg.checkpoint.keep_last >= 0, f"checkpoint.keep_last must be >= 0, got {cfg.checkpoint.keep_last}")
    need(cfg.logging.every >= 1, f"logging.every must be >= 1, got {cfg.logging.every}")
    _validate_wandb(cfg.logging.wandb)
    return cfg


def _validate_wandb(w: WandbConfig) -> None:
    if w.mode is not None and w.mode not in WANDB_MODES:
        raise NITPError(f"logging.wandb.mode '{w.mode}' is not one of {', '.join(WANDB_MODES)}")
    if w.project is None:
        if w.name is not None or w.mode is not None:
            raise NITPError("logging.wandb.name / mode are set but logging.wandb.project is not; "
                            "set logging.wandb.project to log to Weights & Biases")
        return
    if not w.project.strip() or "/" in w.project:
        raise NITPError(f"logging.wandb.project {w.project!r} must be a non-empty W&B project name without '/' "
                        "(the entity comes from WANDB_ENTITY or your W&B login)")
    import importlib.util

    if w.mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise NITPError("logging.wandb.project is set but the wandb package is not installed; "
                        "pip install 'nitp-ds[wandb]' (or pip install wandb), or remove logging.wandb")
