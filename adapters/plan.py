"""Memory per GPU of one adapter training step, predicted from the model's own code (`mm-llama plan`).

Weights are counted from the model itself, built on the meta device (no memory, no checkpoint needed): the frozen
tower in its dtype, the adapter's frozen parts and its trainable weights in fp32 (the recipe keeps adapters in fp32
and runs them under autocast), their fp32 gradients (our engine's buckets: `gradient_as_bucket_view`) and AdamW's
two fp32 moments.

Activations are what autograd keeps for backward, counted by running each piece of the step once on the meta
device under `saved_tensors_hooks` (unique storages; parameters and tensors shared between pieces counted once):
one tower layer, each kind of adapter block, the modality's encoder (its plug-in's `plan_pieces`), the logits and
the loss at the labelled positions. Attention is counted as the fused kernels keep it (query, key, value, output,
log-sum-exp), not as the math fallback would (scores). With activation checkpointing each tower layer keeps only
its input, plus one layer recomputed at a time in backward, and so does each of the adapter's large blocks (the
pieces' `units`, the plug-ins' `shard_units`). Layers below the lowest trainable part keep nothing.

Layouts (`parallel.tower`): replicate -- every rank holds the tower; fsdp -- 1/N of it per rank (hybrid: 1/GPUs
per machine), plus the units gathered at the peak (two blocks: the running one and the prefetched next, and the
output projection). The peak is taken at the start of backward: all static memory, every kept activation and the
logits' gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

GB = 1e9


@dataclass
class Piece:
    """One piece of the modality's forward for the plan: `fn()` runs on the meta device; what autograd saves for
    it counts `repeats` times; tensors in `shared` (inputs several pieces read) are not counted here."""

    name: str
    fn: Callable[[], object]
    repeats: int = 1
    shared: tuple = ()
    units: tuple = ()  # the blocks inside it that activation checkpointing recomputes (keeping their inputs)


@dataclass
class PlanPieces:
    pieces: list[Piece]
    shared_bytes: int = 0  # tensors the pieces share (e.g. the media tokens every cross-attention block reads)
    extra_rows: int = 0  # rows the modality adds to each sequence (spliced speech rows)
    lowest_layer: int = 0  # lowest tower layer whose input needs a gradient (below it: forward only)


# ----------------------------------------------------------------------------------------------
# counting what autograd keeps


class _FusedAttention(torch.autograd.Function):
    """Stand-in for scaled_dot_product_attention on the meta device that keeps what the fused kernels keep."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse, *(() if mask is None else (mask,)))
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover -- the plan never runs backward
        raise NotImplementedError


class _FusedAttentionMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            return _FusedAttention.apply(q, k, v, kwargs.get("attn_mask", args[3] if len(args) > 3 else None))
        return func(*args, **kwargs)


def saved_bytes(fn: Callable[[], object], exclude=()) -> tuple[int, object]:
    """(bytes autograd keeps for backward while `fn()` runs, its output): unique storages, without `exclude`
    (parameters, shared inputs); attention as the fused kernels keep it (`count_piece` without blocks)."""
    box = []
    count = count_piece(Piece("", lambda: box.append(fn())), exclude)
    return count.total, box[0]


@dataclass
class PieceCount:
    """What one call of a piece keeps: in all (`total`), inside its checkpointable blocks (`in_units`, and the
    largest one call of them keeps, `max_unit`), and those blocks' distinct tensor inputs (`unit_inputs`: what a
    checkpointed block keeps instead)."""

    total: int
    in_units: int = 0
    max_unit: int = 0
    unit_inputs: int = 0
    repeats: int = 1

    def kept(self, checkpointed: bool) -> int:
        if not checkpointed or not self.max_unit:
            return self.repeats * self.total
        return self.repeats * (self.total - self.in_units + self.unit_inputs) + self.max_unit


def count_piece(piece: Piece, exclude=()) -> PieceCount:
    """Run `piece.fn` on the meta device and attribute what autograd keeps to its checkpointable blocks."""
    skip = {t.untyped_storage()._cdata for t in [*exclude, *piece.shared] if torch.is_tensor(t)}
    sizes: dict[int, int] = {}
    calls: list[int] = []  # bytes kept inside each block call
    stack: list[int] = []
    inputs: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in skip and st._cdata not in sizes:
            sizes[st._cdata] = st.nbytes()
            if stack:
                calls[stack[-1]] += st.nbytes()
        return t

    def pre(module, args, kwargs):
        for t in [*args, *kwargs.values()]:
            if torch.is_tensor(t) and t.untyped_storage()._cdata not in skip:
                inputs[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        calls.append(0)
        stack.append(len(calls) - 1)

    def post(module, args, kwargs, out):
        stack.pop()

    handles = [
        h
        for u in piece.units
        for h in (u.register_forward_pre_hook(pre, with_kwargs=True), u.register_forward_hook(post, with_kwargs=True))
    ]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _FusedAttentionMode():
            piece.fn()
    finally:
        for h in handles:
            h.remove()
    return PieceCount(sum(sizes.values()), sum(calls), max(calls, default=0), sum(inputs.values()), piece.repeats)


def tensor_bytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if torch.is_tensor(t))


def param_bytes(params, dtype: torch.dtype | None = None) -> int:
    size = torch.empty((), dtype=dtype).element_size() if dtype is not None else None
    return sum(p.numel() * (size or p.element_size()) for p in params)


# ----------------------------------------------------------------------------------------------
# the plan


@dataclass
class Workload:
    batch: int  # micro-batch per rank
    seq_len: int  # tokens per sequence (before any rows the modality splices in)
    labels: float  # labelled tokens per sequence (on average)
    tower_dtype: torch.dtype = torch.bfloat16
    compute_dtype: torch.dtype = torch.bfloat16  # adapters under autocast (fp32 on CPU)


@dataclass
class Layout:
    gpus: int
    gpus_per_machine: int
    tower: str = "replicate"  # replicate | fsdp
    mesh: str = "flat"  # flat | hybrid
    activation_checkpointing: bool = False
    adapters: str = "replicate"  # replicate | fsdp (the plug-in's shard_units, on the tower's mesh)

    @property
    def shards(self) -> int:
        if self.tower != "fsdp":
            return 1
        return self.gpus if self.mesh == "flat" else min(self.gpus, self.gpus_per_machine)

    def describe(self) -> str:
        if self.tower != "fsdp":
            s = "parallel.tower=replicate"
        else:
            s = f"parallel.tower=fsdp parallel.mesh={self.mesh}"
            if self.adapters == "fsdp":
                s += " parallel.adapters=fsdp"
        return s + f" activation_checkpointing={str(self.activation_checkpointing).lower()}"

    def short(self) -> str:
        base = "replicate" if self.tower != "fsdp" else f"fsdp-{self.mesh}"
        base += "+adapters" if self.adapters == "fsdp" else ""
        return base + ("+AC" if self.activation_checkpointing else "")


@dataclass
class ModelSizes:
    """What the plan measured on the meta-device model (bytes unless named otherwise)."""

    tower: int
    tower_block: int  # one transformer block
    tower_output: int  # output projection (tied: the embedding)
    adapter_frozen: int
    trainable_params: int
    layer_acts: int  # one tower layer, its input included
    layer_input: int  # what a checkpointed layer keeps
    rope: int
    blocks_acts: dict[str, PieceCount] = field(default_factory=dict)  # the modality's pieces
    shared: int = 0
    logits: int = 0
    logits_grad: int = 0
    n_layers: int = 0
    lowest_layer: int = 0
    tower_params: int = 0
    unit_trainable_params: int = 0  # trainable parameters inside the plug-ins' shard_units
    unit_frozen: int = 0  # frozen adapter bytes inside them
    unit_max_params: int = 0  # the largest unit's parameters
    compute_bytes: int = 4  # bytes per element of the compute dtype (bf16 under autocast: 2)


@dataclass
class Plan:
    layout: Layout
    rows: dict[str, float]  # GB per GPU
    total: float
    gpu_mem: float

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_mem * USABLE


# the loss's backward holds this many [labelled rows, V] fp32 buffers at once beside the kept logits and
# log-probabilities (the gradient of the log-probabilities, of the logits, the kernel's temporaries): measured on
# CPU as the growth of the step's peak per labelled row (`mm-llama plan --measure` at two text lengths): 2 to 4 of
# them, by where the step peaks (micro-batch 8 / 32, with / without activation checkpointing); the plan takes 3
LOSS_BACKWARD_BUFFERS = 3
USABLE = 0.92  # the allocator's fragmentation, CUDA context and communication buffers take the rest


def measure_model(model, pieces: PlanPieces, w: Workload) -> ModelSizes:
    """Count weights and activations of a composed model's parts on its tower (all on the meta device) for the
    workload; `pieces`: the trained part's plan pieces."""
    tower = model.tower
    args = tower.args
    tower_params = set(tower.parameters())
    adapter = [p for p in dict.fromkeys(model.parameters()) if p not in tower_params]
    trainable = [p for p in adapter if p.requires_grad]
    frozen = [p for p in adapter if not p.requires_grad]
    B, T = w.batch, w.seq_len + pieces.extra_rows
    dt = w.tower_dtype
    layer = tower.layers[0]
    x = torch.empty(B, T, args.dim, device="meta", dtype=dt, requires_grad=True)
    freqs = tower.rope(torch.zeros(B, T, dtype=torch.long, device="meta"))
    acts, _ = saved_bytes(lambda: layer(x, freqs), exclude=[*layer.parameters(), freqs])
    blocks = {piece.name: count_piece(piece, exclude=adapter) for piece in pieces.pieces}
    N = round(B * w.labels)
    h = torch.empty(N, args.dim, device="meta", dtype=dt, requires_grad=True)
    targets = torch.zeros(N, dtype=torch.long, device="meta")
    logits, _ = saved_bytes(
        lambda: F.cross_entropy(tower.output(tower.norm(h)).float(), targets), exclude=[*tower.parameters()]
    )
    return ModelSizes(
        tower=param_bytes(tower_params, dt),
        tower_block=param_bytes(layer.parameters(), dt),
        tower_output=param_bytes(tower.output.parameters(), dt),
        adapter_frozen=param_bytes(frozen, torch.float32),
        trainable_params=sum(p.numel() for p in trainable),
        layer_acts=acts,
        layer_input=tensor_bytes(x),
        rope=tensor_bytes(freqs),
        blocks_acts=blocks,
        shared=pieces.shared_bytes,
        logits=logits,
        logits_grad=LOSS_BACKWARD_BUFFERS * N * args.vocab_size * 4,
        n_layers=args.n_layers,
        lowest_layer=pieces.lowest_layer,
        tower_params=sum(p.numel() for p in tower_params),
    )


def plan(sizes: ModelSizes, layout: Layout, gpu_mem: float) -> Plan:
    s = sizes
    shards = layout.shards
    layers = s.n_layers - s.lowest_layer  # layers autograd runs through
    if layout.activation_checkpointing:
        tower_acts = layers * s.layer_input + (s.layer_acts if layers else 0)
    else:
        tower_acts = layers * s.layer_acts
    a_shards = shards if layout.adapters == "fsdp" and shards > 1 else 1
    trained = s.trainable_params - s.unit_trainable_params + s.unit_trainable_params / a_shards
    gathered = (2 * s.tower_block + s.tower_output) if shards > 1 else 0
    if a_shards > 1:  # two adapter units whole at a time (compute dtype), with their whole gradients, and one
        # fp32 reduce-scatter input
        gathered += s.unit_max_params * (2 * 2 * s.compute_bytes + 4)
    rows = {
        "tower weights": s.tower / shards,
        "units gathered": gathered,
        "adapter frozen weights": s.adapter_frozen - s.unit_frozen + s.unit_frozen / a_shards,
        "trainable weights": trained * 4,
        "gradients": trained * 4,
        "optimizer state": trained * 8,
        "activations: tower layers": tower_acts + s.rope,
        "activations: adapter": sum(c.kept(layout.activation_checkpointing) for c in s.blocks_acts.values()) + s.shared,
        "activations: logits + loss": s.logits + s.logits_grad,
    }
    rows = {k: v / GB for k, v in rows.items()}
    return Plan(layout, rows, sum(rows.values()), gpu_mem)


def candidates(gpus: int, per_machine: int) -> list[Layout]:
    """Layouts from the cheapest in communication and compute to the most sharded."""
    out = [Layout(gpus, per_machine, "replicate", "flat", ac) for ac in (False, True)]
    if gpus > 1:
        # hybrid only over whole machines: the trainer refuses a world that does not split into them (engine/shard.py)
        meshes = ["hybrid", "flat"] if gpus > per_machine and gpus % per_machine == 0 else ["flat"]
        for adapters in ("replicate", "fsdp"):
            for mesh in meshes:
                out += [Layout(gpus, per_machine, "fsdp", mesh, ac, adapters) for ac in (False, True)]
    return out
