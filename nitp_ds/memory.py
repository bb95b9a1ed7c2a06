"""The memory plan: what one rank of a run will hold, in bytes, before the run starts.

`plan_memory(shape, settings)` adds up, per rank, the parameters, gradients and optimizer states that
ZeRO-3 leaves on the rank, the activations of one micro-batch (with and without activation
checkpointing), the transient working set (gathered layers, gradient buckets, the loss's logits) and
where each of them lives: the device, or the host when there is no GPU or the ds_config offloads it.
`nitp train --print-config` prints the plan; the trainer refuses at start-up a run whose plan exceeds
the GPU's memory (or, without a GPU, the node's host memory) with one line naming the numbers and the fix.

The rules below follow DeepSpeed 0.19.8's ZeRO-3 (`runtime/zero/stage3.py`, `partition_parameters.py`)
and AutoEP (`module_inject/auto_ep_layer.py`):

- N ranks partition every parameter N ways. Routed experts are split over the `autoep_size` ranks of an
  expert-parallel group (E/ep experts each) and ZeRO-partitioned over the N/ep replicas of that group, so
  a rank also holds 1/N of them. A parameter with at most `stage3_param_persistence_threshold` elements
  stays whole on every rank besides its partition (one rank: no second copy, measured).
- Per parameter of the rank's partition: the compute-dtype copy (2 bytes in bf16, 4 in fp32), the
  gradient (fp32 with `data_types.grad_accum_dtype: fp32`, else the compute dtype), Adam's two fp32
  moments (8) and an fp32 master copy (4) unless the parameters are fp32 already; offloading the
  optimizer keeps a master copy and an fp32 gradient on the host (DeepSpeed copies either way).
- Activations: elements saved for backward per token, counted with `torch.autograd.graph` saved-tensor
  hooks on stock Hugging Face layers (transformers 5.x, sdpa attention; `tests/test_memory.py` re-counts
  them): per decoder layer 6h + 2q + 2kv (+2q + 2kv with per-head q/k norms) + 2 per query head, and per
  MoE layer E + k·(2h + 4·I_expert + 9), plus 4·I for a shared expert or a dense MLP and h for its gate.
  RMSNorm and the router keep fp32 copies under bf16 (the (4 - c) terms). With activation checkpointing a
  layer keeps only its input (h per token) and one layer is recomputed at a time.
- The build: under ZeRO-3 the model is built partitioned (`nitp_ds/models/partitioned.py`): a rank holds
  its fp32 share and one gathered module at a time (`partitioned_build`). Without ZeRO-3 every rank builds
  the whole model in fp32 on the host (4 bytes × every parameter), and the process keeps those pages after
  the whole tensors are freed (measured on CPU: the peak in training holds them).

The figures are estimates: measured against them in docs/benchmarks.md (`bench/memory.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nitp_ds.errors import NITPError

GIB = 2**30
HOST_BASELINE = int(0.6 * GIB)  # one rank's Python + torch + deepspeed + transformers, measured on CPU
CUDA_HOST_BASELINE = int(2.5 * GIB)  # the same on a CUDA machine (CUDA libraries mapped in)


# ---------------------------------------------------------------------------------------------
# The model's shape, as memory sees it
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerShape:
    params: int  # every parameter of the decoder layer
    expert_params: int  # its routed experts (split over the expert-parallel group)
    q_dim: int  # query width (heads × head dim)
    kv_dim: int  # key (= value) width
    q_heads: int
    qk_norm: bool  # per-head RMSNorm on q and k (Qwen3)
    experts: int = 0  # routed experts; 0 for a dense layer
    top_k: int = 0
    expert_ffn: int = 0
    dense_ffn: int = 0  # a dense MLP, or the shared expert(s) of a MoE layer


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    head_dim: int
    vocab: int
    layers: tuple[LayerShape, ...]
    embedding: int  # parameters of the input embedding
    lm_head: int  # of the output embedding (0 when tied)
    other_params: int  # final norm and the like
    head_params: int = 0  # the NITP head
    head_width: int = 0  # its hidden width (0: linear or none)
    param_numels: tuple[int, ...] = ()  # every parameter's size: which ones ZeRO-3 keeps whole

    @property
    def total(self) -> int:
        return self.embedding + self.lm_head + self.other_params + self.head_params + sum(l.params for l in self.layers)

    @property
    def experts(self) -> int:
        return sum(l.expert_params for l in self.layers)


def model_shape(hf_config: Any, head: str = "swiglu", head_mult: int = 4) -> ModelShape:
    """Build the Hugging Face model on the meta device (no memory) and read its shape."""
    import torch
    from transformers import AutoModelForCausalLM

    from nitp_ds.metrics import head_param_count

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(hf_config)
    layers = tuple(_layer_shape(layer, hf_config) for layer in lm.model.layers)
    embedding = lm.get_input_embeddings().weight
    output = lm.get_output_embeddings().weight
    tied = output is embedding
    in_layers = sum(l.params for l in layers)
    other = sum(p.numel() for p in lm.parameters()) - in_layers - embedding.numel() - (0 if tied else output.numel())
    d = hf_config.hidden_size
    numels = tuple(p.numel() for p in lm.parameters())
    head_params = head_param_count(head, d, head_mult)
    head_numels = {"swiglu": (head_mult * d * d,) * 3, "mlp": (head_mult * d * d,) * 2, "linear": (d * d,)}
    return ModelShape(hidden=d, head_dim=getattr(hf_config, "head_dim", None) or d // hf_config.num_attention_heads,
                      vocab=embedding.shape[0], layers=layers, embedding=embedding.numel(),
                      lm_head=0 if tied else output.numel(), other_params=other, head_params=head_params,
                      head_width=head_mult * d if head in ("swiglu", "mlp") else 0,
                      param_numels=numels + head_numels.get(head, ()))


def _layer_shape(layer: Any, config: Any) -> LayerShape:
    params = sum(p.numel() for p in layer.parameters())
    experts = sum(p.numel() for name, p in layer.named_parameters() if ".experts." in f".{name}")
    attn = layer.self_attn
    q = getattr(attn, "q_proj", None) or getattr(attn, "q_b_proj")
    if hasattr(attn, "k_proj"):
        kv_dim = attn.k_proj.out_features
    else:  # multi-head latent attention (DeepSeek): keys and values come out of kv_b_proj
        kv_dim = attn.kv_b_proj.out_features // 2
    mlp = layer.mlp
    moe = hasattr(mlp, "experts")
    shared = getattr(mlp, "shared_expert", None) or getattr(mlp, "shared_experts", None)
    if moe:
        from nitp_ds.models import experts_per_token, num_experts

        n = num_experts(config)
        dense = shared.gate_proj.out_features if shared is not None else 0
        return LayerShape(params=params, expert_params=experts, q_dim=q.out_features, kv_dim=kv_dim,
                          q_heads=config.num_attention_heads, qk_norm=hasattr(attn, "q_norm"), experts=n,
                          top_k=experts_per_token(config), expert_ffn=_expert_ffn(config), dense_ffn=dense)
    return LayerShape(params=params, expert_params=0, q_dim=q.out_features, kv_dim=kv_dim,
                      q_heads=config.num_attention_heads, qk_norm=hasattr(attn, "q_norm"),
                      dense_ffn=mlp.gate_proj.out_features)


def _expert_ffn(config: Any) -> int:
    return int(getattr(config, "moe_intermediate_size", None) or config.intermediate_size)


# ---------------------------------------------------------------------------------------------
# The run's settings, from the recipe and the derived ds_config
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    world_size: int = 1
    ranks_per_node: int = 1
    micro_batch: int = 1
    seq_len: int = 512
    activation_checkpointing: bool = False
    ce_chunk_tokens: int = 8192
    compiled_loss: bool = False  # the cross-entropy's softmax gradient as one compiled kernel (CUDA default)
    compute_bytes: int = 4  # 2 with bf16
    grad_bytes: int = 4
    autoep_size: int = 1
    persistence_threshold: int = 100_000
    reduce_bucket: int = 500_000_000
    prefetch_bucket: int = 50_000_000
    contiguous_gradients: bool = True
    offload_optimizer: str | None = None  # "cpu" or "nvme"
    offload_param: str | None = None
    on_gpu: bool = False
    partitioned_build: bool = False


def settings_from(cfg: Any, ds: dict[str, Any], *, world_size: int, ranks_per_node: int,
                  on_gpu: bool) -> Settings:
    """The plan's settings from a validated recipe and a derived ds_config (every "auto" filled)."""
    from nitp_ds.offload import offload_devices

    zero = ds.get("zero_optimization", {})
    bf16 = bool(ds.get("bf16", {}).get("enabled"))
    compute = 2 if bf16 else 4
    grad_dtype = str(ds.get("data_types", {}).get("grad_accum_dtype", "")).lower()
    ep = ds.get("expert_parallel", {})
    offloaded = offload_devices(ds)
    return Settings(
        world_size=world_size, ranks_per_node=max(1, min(ranks_per_node, world_size)),
        micro_batch=cfg.train.micro_batch_size, seq_len=cfg.data.seq_len,
        activation_checkpointing=cfg.train.activation_checkpointing, ce_chunk_tokens=cfg.train.ce_chunk_tokens,
        compiled_loss=on_gpu if cfg.train.compile_loss is None else bool(cfg.train.compile_loss),
        compute_bytes=compute, grad_bytes=4 if grad_dtype in ("fp32", "float32") else compute,
        autoep_size=int(ep.get("autoep_size", 1)) if ep.get("enabled") else 1,
        persistence_threshold=int(zero.get("stage3_param_persistence_threshold", 100_000)),
        reduce_bucket=int(zero.get("reduce_bucket_size", 500_000_000)),
        prefetch_bucket=int(zero.get("stage3_prefetch_bucket_size", 50_000_000)),
        contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
        offload_optimizer=offloaded[0], offload_param=offloaded[1], on_gpu=on_gpu,
        partitioned_build=int(zero.get("stage", 0)) == 3)


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


@dataclass
class MemoryPlan:
    settings: Settings
    params: int  # bytes per rank
    grads: int
    optimizer: int
    activations: int  # one micro-batch, as configured
    activations_other: int  # the same with activation checkpointing switched the other way
    working: int  # gathered layers, gradient buckets, the loss's logits
    build: int  # the host peak of building the model (before the first step)
    host_baseline: int
    where: dict[str, str] = field(default_factory=dict)  # part -> "device" | "host"

    def on(self, place: str) -> int:
        """Bytes of the training state + activations + working set that live on `place`, per rank."""
        parts = {"params": self.params, "grads": self.grads, "optimizer": self.optimizer,
                 "activations": self.activations, "working": self.working}
        return sum(v for k, v in parts.items() if self.where[k] == place)

    @property
    def device(self) -> int:
        """Per GPU; 0 without one."""
        return self.on("device") if self.settings.on_gpu else 0

    @property
    def build_peak(self) -> int:
        """Host bytes per rank at the end of the build: the model as built, and the training state that
        `deepspeed.initialize` allocates on the host (all of it without a GPU; what is offloaded with one)."""
        states = sum(v for k, v in (("params", self.params), ("grads", self.grads), ("optimizer", self.optimizer))
                     if self.where[k] == "host")
        return self.host_baseline + self.build + states

    @property
    def host(self) -> int:
        """Per rank, at its peak in training. The model as built stays counted: DeepSpeed frees its whole
        tensors once partitioned, but the process keeps most of those pages (measured, docs/benchmarks.md)."""
        return self.host_baseline + self.build + self.on("host")

    @property
    def host_per_node(self) -> int:
        return self.settings.ranks_per_node * self.host


def plan_memory(shape: ModelShape, s: Settings) -> MemoryPlan:
    n, c = s.world_size, s.compute_bytes
    total = shape.total
    shard = _ceil_div(total, n)  # parameters in this rank's partition (experts included: 1/ep × ep/N)
    persistent = sum(x for x in shape.param_numels if x <= s.persistence_threshold)

    # The partition, and the parameters held whole besides; on one rank the partition is the whole parameter
    # and no second copy is kept (measured: the same build peak with every parameter persistent or none).
    params = c * (shard + persistent) if n > 1 else c * shard
    grads = s.grad_bytes * shard
    master = 4 if (c != 4 or s.offload_optimizer) else 0  # fp32 training updates its parameters in place
    optimizer = (8 + master) * shard
    if s.offload_optimizer:
        optimizer += 4 * shard  # the fp32 gradient the CPU optimizer reads
    elif c != 4 and s.grad_bytes != 4:
        optimizer += 4 * min(shard, 1_000_000_000)  # one sub-group's fp32 gradients during the step

    with_ckpt = activation_bytes(shape, s, checkpointing=True)
    without = activation_bytes(shape, s, checkpointing=False)
    working = working_bytes(shape, s, persistent)
    if s.offload_param and s.on_gpu:
        working += c * persistent  # DeepSpeed keeps persistent parameters on the device, offload or not
    # Under ZeRO-3 a rank builds its partition and gathers one module at a time to initialise it; otherwise
    # it builds the whole model in fp32 on the host.
    build = 4 * total if not s.partitioned_build else 4 * (shard + _largest_unit(shape, s))

    offload_param = s.offload_param is not None or not s.on_gpu
    offload_opt = s.offload_optimizer is not None or not s.on_gpu
    where = {"params": "host" if offload_param else "device", "grads": "host" if offload_opt else "device",
             "optimizer": "host" if offload_opt else "device",
             "activations": "device" if s.on_gpu else "host", "working": "device" if s.on_gpu else "host"}
    return MemoryPlan(settings=s, params=params, grads=grads, optimizer=optimizer,
                      activations=with_ckpt if s.activation_checkpointing else without,
                      activations_other=without if s.activation_checkpointing else with_ckpt,
                      working=working, build=build,
                      host_baseline=CUDA_HOST_BASELINE if s.on_gpu else HOST_BASELINE, where=where)


def layer_activation_elements(layer: LayerShape, hidden: int) -> tuple[int, int]:
    """(elements saved per token in the compute dtype, elements kept in fp32 besides) for one decoder layer."""
    h = hidden
    elements = 6 * h + 2 * layer.q_dim + 2 * layer.kv_dim + 2 * layer.q_heads
    normed = 2 * h
    if layer.qk_norm:
        elements += 2 * layer.q_dim + 2 * layer.kv_dim
        normed += layer.q_dim + layer.kv_dim
    if layer.experts:
        elements += layer.experts + layer.top_k * (2 * h + 4 * layer.expert_ffn + 9)
        normed += 4 * layer.experts
    if layer.dense_ffn:
        elements += 4 * layer.dense_ffn + (h if layer.experts else 0)
    return elements, normed


def activation_bytes(shape: ModelShape, s: Settings, *, checkpointing: bool) -> int:
    """Saved activations of one micro-batch at their peak (the end of forward, with the loss computed)."""
    c, h = s.compute_bytes, shape.hidden
    tokens = s.micro_batch * s.seq_len
    per_layer = [c * e + (4 - c) * f for e, f in (layer_activation_elements(l, h) for l in shape.layers)]
    if checkpointing:
        layers = len(per_layer) * c * h + max(per_layer, default=0)  # inputs kept, one layer recomputed
    else:
        layers = sum(per_layer)
    outside = c * (2 * h + shape.head_dim) + (4 - c) * h  # embedding output, rotary tables, final norm
    if shape.head_params:
        outside += c * (4 * shape.head_width + 3 * h)  # NITP head (gate, up, product, down input) and target
    chunk = min(tokens, s.ce_chunk_tokens)
    loss_saved = tokens * h * c + shape.vocab * h * (4 if tokens > s.ce_chunk_tokens else c)  # dL/dh, dL/dW
    # One chunk's logits and their gradient; eager PyTorch also holds an fp32 copy and the softmax.
    loss_chunk = chunk * shape.vocab * (2 * c if s.compiled_loss else 2 * c + 8)
    return tokens * (layers + outside) + loss_saved + loss_chunk


def _largest_unit(shape: ModelShape, s: Settings) -> int:
    """Parameters of the largest ZeRO-3 fetch unit: a decoder layer, with 1/ep of its experts."""
    units = [l.params - l.expert_params + _ceil_div(l.expert_params, s.autoep_size) for l in shape.layers]
    return max(units + [shape.embedding, shape.lm_head])


def working_bytes(shape: ModelShape, s: Settings, persistent: int) -> int:
    """Transients around the saved state: gathered parameters (the unit in use, one prefetched, and the LM
    head, which the chunked loss holds for the whole forward), a layer's full gradients before
    reduce-scatter, and the gradient bucket."""
    c = s.compute_bytes
    gathered = 0
    if persistent < shape.total:  # some parameters are partitioned: they are gathered to be used
        unit = _largest_unit(shape, s)
        gathered = c * (unit + min(unit, s.prefetch_bucket) + shape.lm_head)
    layer_grads = c * max((l.params - l.expert_params + _ceil_div(l.expert_params, s.autoep_size)
                           for l in shape.layers), default=0)
    bucket = c * min(s.reduce_bucket, shape.total) if s.contiguous_gradients else 0
    return gathered + layer_grads + bucket


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------
# Printing and the start-up check
# ---------------------------------------------------------------------------------------------


def gib(n: int) -> str:
    value = n / GIB
    return f"{value:.3g}" if value < 10 else f"{value:.0f}"


def size(n: int) -> str:
    return f"{n / 2**20:.3g} MiB" if n < GIB else f"{n / GIB:.3g} GiB"


def describe(plan: MemoryPlan, shape: ModelShape) -> str:
    """The plan as `--print-config` shows it: one line per part, and the totals."""
    s = plan.settings
    ckpt, other = ("on", "off") if s.activation_checkpointing else ("off", "on")
    lines = [
        f"# memory plan per rank (an estimate): world size {s.world_size}, {s.ranks_per_node} rank(s) per node, "
        f"expert-parallel size {s.autoep_size}, {'bf16' if s.compute_bytes == 2 else 'fp32'}, micro-batch "
        f"{s.micro_batch} × {s.seq_len} tokens, offload optimizer {s.offload_optimizer or 'none'}, "
        f"offload params {s.offload_param or 'none'}",
        f"#   model: {shape.total / 1e9:.3g}B parameters ({shape.experts / 1e9:.3g}B in routed experts)",
        f"#   params       {size(plan.params):>10}  {plan.where['params']}",
        f"#   grads        {size(plan.grads):>10}  {plan.where['grads']}",
        f"#   optimizer    {size(plan.optimizer):>10}  {plan.where['optimizer']}",
        f"#   activations  {size(plan.activations):>10}  {plan.where['activations']}, activation checkpointing "
        f"{ckpt} ({size(plan.activations_other)} with it {other})",
        f"#   working set  {size(plan.working):>10}  {plan.where['working']} (gathered layers, a layer's gradients, "
        "gradient bucket)",
        f"#   build        {size(plan.build):>10}  host"
        f"{'' if s.partitioned_build else ' (every rank builds the whole model in fp32)'}",
    ]
    host = f"host {size(plan.host)} per rank (process {size(plan.host_baseline)}), {size(plan.host_per_node)} per node"
    lines.append(f"#   total: {size(plan.device)} per GPU; {host}" if s.on_gpu else f"#   total: {host}")
    return "\n".join(lines)


def check_fits(plan: MemoryPlan, *, device_bytes: int | None, host_bytes: int | None,
               device_name: str = "GPU 0") -> None:
    """Refuse a plan that cannot fit: one line with the numbers and the fixes that could close the gap."""
    s = plan.settings
    parts = (f"params {gib(plan.params)}, grads {gib(plan.grads)}, optimizer {gib(plan.optimizer)}, "
             f"activations {gib(plan.activations)}, working set {gib(plan.working)}")
    if s.on_gpu and device_bytes is not None and plan.device > device_bytes:
        excess = plan.device - device_bytes
        fixes = ["more GPUs"]
        offloadable = sum(v for k, v in (("params", plan.params), ("grads", plan.grads),
                                         ("optimizer", plan.optimizer)) if plan.where[k] == "device")
        if offloadable >= excess:
            fixes.append("ds_configs/zero3_moe_offload.json")
        fixes += _activation_fixes(plan, excess)
        raise NITPError(f"the memory plan needs {gib(plan.device)} GiB per GPU ({parts}) but {device_name} has "
                        f"{gib(device_bytes)} GiB; use {_or(fixes)} (the plan is an estimate: "
                        "train.memory_check=false skips this check)")
    if host_bytes is not None and plan.host_per_node > host_bytes:
        excess = (plan.host_per_node - host_bytes) // s.ranks_per_node
        fixes = ["more nodes" if s.ranks_per_node == 1 else "more nodes with fewer ranks each"]
        if s.on_gpu and (s.offload_optimizer or s.offload_param):
            fixes.append("a ds_config without offload")
        if not s.on_gpu:
            fixes += _activation_fixes(plan, excess)
        where = f"{s.ranks_per_node} rank(s) × {gib(plan.host)} GiB"
        raise NITPError(f"the memory plan needs {gib(plan.host_per_node)} GiB of host memory per node ({where}: "
                        f"build {gib(plan.build)}, {parts}) but this node has {gib(host_bytes)} GiB; "
                        f"use {_or(fixes)} (the plan is an estimate: train.memory_check=false skips this check)")


def _activation_fixes(plan: MemoryPlan, excess: int) -> list[str]:
    """The activation fixes that would free at least `excess` bytes on their own."""
    s, fixes = plan.settings, []
    if s.micro_batch > 1 and plan.activations * (s.micro_batch - 1) // s.micro_batch >= excess:
        fixes.append("a smaller train.micro_batch_size")
    if not s.activation_checkpointing and plan.activations - plan.activations_other >= excess:
        fixes.append("train.activation_checkpointing=true")
    return fixes


def _or(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def device_capacity(local_rank: int = 0) -> tuple[int | None, str]:
    """(total bytes, name) of this rank's GPU; (None, "") without one."""
    import torch

    if not torch.cuda.is_available():
        return None, ""
    index = local_rank % torch.cuda.device_count()
    return torch.cuda.get_device_properties(index).total_memory, f"GPU {index}"


def host_capacity() -> int:
    import psutil

    return psutil.virtual_memory().total


def plan_for_run(cfg: Any, run: Any, ranks_per_node: int) -> tuple[MemoryPlan, ModelShape]:
    """The plan of a resolved run (`nitp_ds.resolve.ResolvedRun`), as the trainer and `--print-config` see it."""
    import torch

    shape = model_shape(run.hf_config, cfg.nitp.head, cfg.nitp.head_mult)
    s = settings_from(cfg, run.ds_config, world_size=run.world_size, ranks_per_node=ranks_per_node,
                      on_gpu=torch.cuda.is_available())
    return plan_memory(shape, s), shape


def ranks_on_this_node(world_size: int) -> int:
    """Processes per node, as the launcher says (deepspeed: LOCAL_SIZE; torchrun: LOCAL_WORLD_SIZE)."""
    import os

    for key in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return world_size


def check_run(cfg: Any, run: Any, *, local_rank: int = 0) -> MemoryPlan:
    """The trainer's start-up check: the plan of this run, refused when it cannot fit (`train.memory_check`)."""
    plan, _ = plan_for_run(cfg, run, ranks_on_this_node(run.world_size))
    if cfg.train.memory_check:
        device_bytes, name = device_capacity(local_rank)
        check_fits(plan, device_bytes=device_bytes, host_bytes=host_capacity(), device_name=name or "GPU 0")
    return plan
