"""Load a Llama 3 tower from what the user has: a Meta folder, a Hugging Face folder or a GGUF file.

Every format is turned into one native state dict (Meta parameter names) and streamed into a model
built on the meta device, one tensor at a time, so peak memory stays about one copy of the model.

    Meta  : params.json + consolidated.NN.pth (model-parallel shards merged)
    HF    : config.json + model.safetensors | model-0000x-of-0000y.safetensors + index (q/k un-permuted)
    GGUF  : *.gguf, dequantised with the `gguf` package (q/k already in Meta's interleaved layout)

One module per format (format_meta.py, format_hf.py, format_gguf.py); this one detects the format and loads.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ModelArgs, get_preset
from .errors import CheckpointError, TensorStream
from .format_gguf import GGUF_SUPPORTED, _gguf_file, _gguf_stream, gguf_to_meta_key
from .format_hf import (
    _hf_stream,
    args_from_hf_config,
    hf_to_meta_key,
    meta_to_hf_key,
    permute_hf_to_meta,
    permute_meta_to_hf,
)
from .format_meta import _meta_stream, args_from_meta_params, save_meta
from .model import Transformer
from .quantize import QUANTIZE_MODES, quantize_int8

__all__ = [
    "GGUF_SUPPORTED",
    "CheckpointError",
    "ParamFiller",
    "TensorStream",
    "args_from_hf_config",
    "args_from_meta_params",
    "detect_format",
    "gguf_to_meta_key",
    "hf_to_meta_key",
    "load_pretrained",
    "load_state_into",
    "meta_to_hf_key",
    "permute_hf_to_meta",
    "permute_meta_to_hf",
    "read_checkpoint",
    "save_meta",
]


def detect_format(path: str | Path) -> str:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path does not exist: {p}")
    if p.is_file():
        if p.suffix == ".gguf":
            return "gguf"
        raise CheckpointError(f"unknown checkpoint format: {p} (expected a .gguf file, a Meta folder or an HF folder)")
    if (p / "params.json").is_file():
        if not sorted(p.glob("consolidated.*.pth")):
            raise CheckpointError(f"Meta folder {p} has params.json but no consolidated.NN.pth file")
        return "meta"
    if (p / "config.json").is_file():
        if not sorted(p.glob("*.safetensors")):
            raise CheckpointError(f"Hugging Face folder {p} has config.json but no *.safetensors file")
        return "hf"
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf"
    raise CheckpointError(
        f"unknown checkpoint format in {p}: expected params.json + consolidated.*.pth (Meta), "
        "config.json + *.safetensors (Hugging Face) or one .gguf file"
    )


# ----------------------------------------------------------------------------------------------
# public entry points


def read_checkpoint(path: str | Path, dtype: torch.dtype | None = None) -> tuple[ModelArgs, TensorStream, str]:
    """(ModelArgs, stream of (Meta key, tensor), format) for any supported checkpoint.

    `dtype` lets formats that must convert anyway (GGUF dequantisation) produce the target dtype directly."""
    p = Path(path)
    fmt = detect_format(p)
    if fmt == "meta":
        args, stream = _meta_stream(p)
    elif fmt == "hf":
        args, stream = _hf_stream(p)
    else:
        args, stream = _gguf_stream(_gguf_file(p), dtype)
    return args, stream, fmt


class ParamFiller:
    """Materialise the parameters of a model built on the meta device, one tensor at a time.

    `put` checks the name and shape and assigns the tensor in its final dtype/device; `finish` names every
    parameter nothing was put into. Shared by every checkpoint loader (tower, Mllama HF and Meta formats)."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        source: str,
        dtype: torch.dtype,
        device: torch.device | str,
        requires_grad: bool | None = None,
    ) -> None:
        """requires_grad: None keeps each parameter's flag from the meta model; a bool sets it on all."""
        self.model, self.source, self.dtype, self.device = model, source, dtype, device
        self.requires_grad = requires_grad
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.seen: set[str] = set()

    def put(self, name: str, t: torch.Tensor, key: str | None = None) -> None:
        """`key`: the checkpoint's own name for the tensor, when it differs (quoted in errors)."""
        what = repr(name) if key is None or key == name else f"{name!r} (checkpoint key {key!r})"
        p = self.params.get(name)
        if p is None:
            raise CheckpointError(f"{self.source}: unexpected key {what}")
        if tuple(t.shape) != tuple(p.shape):
            raise CheckpointError(
                f"{self.source}: shape mismatch for {what}: checkpoint {tuple(t.shape)} vs model {tuple(p.shape)}"
            )
        module_name, _, pname = name.rpartition(".")
        grad = p.requires_grad if self.requires_grad is None else self.requires_grad
        new = torch.nn.Parameter(t.to(device=self.device, dtype=self.dtype), requires_grad=grad)
        setattr(self.model.get_submodule(module_name), pname, new)
        self.seen.add(name)

    def skip(self, name: str) -> None:
        """Count `name` as provided without assigning it (a tied weight)."""
        self.seen.add(name)

    def finish(self) -> None:
        missing = sorted(set(self.params) - self.seen)
        if missing:
            shown = ", ".join(missing[:8]) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
            raise CheckpointError(f"{self.source}: missing keys: {shown}")


def load_state_into(
    model: Transformer, stream: TensorStream, *, source: str, dtype: torch.dtype, device: torch.device | str
) -> None:
    """Materialise a meta-device model tensor by tensor from `stream`, checking keys and shapes."""
    filler = ParamFiller(model, source=source, dtype=dtype, device=device)
    tied = model.args.tie_embeddings
    for key, t in stream:
        if tied and key == "output.weight":
            # some tied checkpoints still store the output matrix; it must equal the embedding
            if key not in filler.params:
                raise CheckpointError(f"{source}: unexpected key {key!r}")
            filler.skip(key)
            continue
        filler.put(key, t)
        del t
    if tied:
        filler.skip("output.weight")
    filler.finish()
    model.tie_weights()


def load_pretrained(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    *,
    requires_grad: bool = False,
    quantize: str | None = None,
) -> Transformer:
    """Load a Llama 3 tower from a Meta folder, a Hugging Face folder or a .gguf file.

    The tower is returned in eval mode with `requires_grad=False` (frozen) unless asked otherwise.
    quantize="int8": weight-only int8 linears for decoding (`mm_llama.llama.quantize`), computing in `dtype`
    (bfloat16 is the fast pairing on CPU); inference only.
    """
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)} or None, not {quantize!r}")
    if quantize is not None and requires_grad:
        raise ValueError("a quantized tower is for inference: quantize= cannot be combined with requires_grad=True")
    args, stream, _ = read_checkpoint(path, dtype)
    with torch.device("meta"):
        model = Transformer(args)
    load_state_into(model, stream, source=str(path), dtype=dtype, device=device)
    model.reset_buffers()
    model.requires_grad_(requires_grad)
    if quantize == "int8":
        quantize_int8(model, dtype)
    return model.eval()


def random_tower(preset: str, vocab_size: int | None = None, seed: int = 0) -> Transformer:
    """A seeded random tower of a preset's shape (debug configs, tests, benchmarks): the same weights for the same
    (preset, vocab_size, seed), frozen."""
    args = get_preset(preset)
    if vocab_size:
        args = args.replace(vocab_size=vocab_size)
    tower = Transformer(args)
    tower.init_weights(std=0.05, generator=torch.Generator().manual_seed(seed))
    return tower.requires_grad_(False).eval()


def random_tower_source(preset: str, vocab_size: int | None = None, seed: int = 0) -> str:
    """The string that names a random preset tower where a checkpoint path would stand (adapter files record it)."""
    return f"preset:{preset}?vocab_size={vocab_size or get_preset(preset).vocab_size}&seed={seed}"


def load_source(
    source: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", quantize: str | None = None
) -> Transformer:
    """A tower from a path (Meta folder, HF folder, .gguf) or a `preset:NAME?vocab_size=V&seed=S` source."""
    if source.startswith("preset:"):
        name, _, query = source.removeprefix("preset:").partition("?")
        try:
            opts = {k: int(v) for k, v in (kv.split("=", 1) for kv in query.split("&") if kv)}
            tower = random_tower(name, opts.get("vocab_size"), opts.get("seed", 0))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"tower source {source!r}: {e}") from None
        return tower.to(device=device, dtype=dtype)
    return load_pretrained(source, dtype=dtype, device=device, quantize=quantize)
