"""A GPU dry run without a GPU: `mm-llama plan --config C --dry-run`.

The config's full-size model is built on fake CUDA tensors (torch's FakeTensorMode: shapes, devices and dtypes,
no memory), with its tower in the dtype training uses on CUDA and its parts in fp32. One micro-batch
(`data.batch_size` synthetic samples of each trained medium, made by the recipe's own sample maker and collate) runs
the training forward under the same autocast. Every op of that forward is watched. A tensor that is not on the
config's device is reported with the op and the line of code that used it: a tensor created on the CPU inside the
step, which on a cluster fails at the first step. So is a floating tensor in a dtype other than the tower's or fp32
(a float64 from NumPy, a float16). The report lists each problem once with its count. The backward is not run:
under FakeTensorMode it needs a CUDA context.
"""

from __future__ import annotations

import contextlib
import io
import traceback
from collections import Counter
from pathlib import Path
from unittest import mock

import av
import numpy as np
import soundfile as sf
import torch
from PIL import Image
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
)
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

from mm_llama.adapters.registry import MODALITIES
from mm_llama.assets import resolve
from mm_llama.engine.parallelize import weight_dtype
from mm_llama.llama import Tokenizer

from .train_config import run_kinds
from .train_data import collate_for, samples_for

_TORCH = str(Path(torch.__file__).parent)
_HERE = "/dry_run.py"


def _where() -> str:
    """The innermost frame outside torch: the line of code that ran the op."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if not frame.filename.startswith(_TORCH) and not frame.filename.endswith(("/unittest/mock.py", _HERE)):
            name = frame.filename
            for root in ("/adapters/", "/mm_llama/", "/recipes/", "/data/", "/tests/"):
                if root in name:
                    name = name[name.rindex(root) + 1 :]
                    break
            return f"{name}:{frame.lineno} ({frame.name})"
    return "?"


class Audit(TorchDispatchMode):
    """Watches every op of the step. A problem is an op that mixes tensors on `device` with non-scalar tensors
    elsewhere (what fails on the GPU: "Expected all tensors to be on the same device"), reported with where the
    stray tensor was made; the op then runs with it moved, so every stray tensor is found. A note is a tensor made on
    the CPU inside the step and copied to the device (it works; it is a host-side step and a copy per step). A
    floating tensor in a dtype outside `dtypes` is a problem too.

    Integer and boolean tensors (ids, masks, lengths) keep their values in a real CPU shadow computed beside the
    fake one, so the model's data-dependent steps (a `.tolist()` of a mask, a boolean selection) run as they would
    on the GPU: the fake tensors carry shapes only."""

    def __init__(self, device: torch.device, dtypes: set[torch.dtype], fake: FakeTensorMode):
        super().__init__()
        self.device, self.dtypes, self.fake = device, dtypes, fake
        self.problems: Counter = Counter()
        self.notes: Counter = Counter()
        self.ops = 0
        self.shadow = WeakIdKeyDictionary()  # fake integer/boolean tensor -> its real value
        self.born = WeakIdKeyDictionary()  # tensor off the device -> where it was made
        self.watching = True

    def _off(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t.device.type != self.device.type and t.dim() > 0

    def _real(self, t):
        """The real value of an integer/boolean tensor (itself when it is not fake), else None."""
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex():
            return None
        return t if not isinstance(t, FakeTensor) else self.shadow.get(t)

    def _real_or_same(self, t):
        r = self._real(t)
        return r if r is not None else t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "prim":  # metadata queries (a tensor's device): asked, not computed
            return func(*args, **kwargs)
        self.ops += 1
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        off = [t for t in tensors if self._off(t)]
        here = _where() if self.watching and (off or any(self._bad_dtype(t) for t in tensors)) else ""
        to_device = func in _COPIES and torch.device(kwargs.get("device", self.device)).type == self.device.type
        mixing = bool(off) and not to_device and any(t.device.type == self.device.type for t in tensors)
        if self.watching:
            for t in tensors:
                if self._bad_dtype(t):
                    self.problems[f"{func} at {here}: a {str(t.dtype).removeprefix('torch.')} tensor"] += 1
            for t in off:
                made = self.born.get(t, "outside the step")
                shape = tuple(t.shape)
                if to_device:
                    self.notes[f"made on the {t.device.type} at {made}, copied to {self.device.type} at {here}"] += 1
                elif mixing:
                    self.problems[f"{func} at {here}: a {shape} tensor on {t.device} (made at {made})"] += 1
        real_out = self._real_compute(func, tensors, args, kwargs)
        if func is torch.ops.aten._local_scalar_dense.default and real_out is not None:
            return real_out  # .item() / .tolist() of known data

        def moved(t):
            return self.place(t) if mixing and self._off(t) else t

        try:
            out = func(*tree_map(moved, args), **tree_map(moved, kwargs))
        except (DataDependentOutputException, DynamicOutputShapeException):
            # a shape that depends on data (a boolean mask's selection): known data decides it, with zeros for
            # the floating inputs (only their shapes matter)
            real_out = real_out if real_out is not None else self._with_zeros(func, args, kwargs)
            out = tree_map(lambda r: self.place(r) if isinstance(r, torch.Tensor) else r, real_out)
        made = next((self.born[t] for t in off if t in self.born), None)
        for t in tree_flatten(out)[0]:
            if self._off(t) and self.watching:
                self.born[t] = made or _where()
        if real_out is not None:
            for f, r in zip(tree_flatten(out)[0], tree_flatten(real_out)[0], strict=False):
                if isinstance(f, FakeTensor) and isinstance(r, torch.Tensor) and not r.is_floating_point():
                    self.shadow[f] = r
        return out

    def _bad_dtype(self, t: torch.Tensor) -> bool:
        return t.is_floating_point() and t.dtype not in self.dtypes

    def _real_compute(self, func, tensors, args, kwargs):
        """The op on the real values when every tensor input is known integer/boolean data (cheap: ids, masks)."""
        if any(self._real(t) is None for t in tensors):
            return None
        with contextlib.suppress(Exception):
            return _on_cpu(func, self._real_or_same, args, kwargs)
        return None

    def _with_zeros(self, func, args, kwargs):
        def real(t):
            if not isinstance(t, torch.Tensor):
                return t
            r = self._real(t)
            if r is None and not t.is_floating_point():
                raise RuntimeError(f"dry run: {func} needs the values of a {t.dtype} tensor it cannot know")
            return r if r is not None else torch.zeros(t.shape, dtype=t.dtype)

        return _on_cpu(func, real, args, kwargs)

    def place(self, t: torch.Tensor) -> torch.Tensor:
        """`t` as a fake tensor on the device (a real one: its value kept as the shadow when it is data)."""
        f = (t if isinstance(t, FakeTensor) else self.fake.from_tensor(t)).to(self.device)
        r = self._real(t)
        if r is not None:
            self.shadow[f] = r
        return f


def _on_cpu(func, real, args, kwargs):
    """`func` run for real on the CPU (no fake or audit mode), each tensor argument replaced by `real(tensor)`."""
    on_cpu = {**kwargs, "device": torch.device("cpu")} if "device" in kwargs else kwargs
    with _disable_current_modes():
        return func(*tree_map(real, args), **tree_map(real, on_cpu))


_COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}


def synthetic_raw(medium: str, text: str) -> dict:
    """One shard sample of `medium` with a caption: a 448 px picture, 5 s of noise, or a 16-frame clip."""
    rng = np.random.default_rng(0)
    raw = {"__key__": "dry-run", "__shard__": "dry-run", "txt": text.encode()}
    if medium == "image":
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (448, 448, 3), dtype=np.uint8)).save(buf, format="PNG")
        return raw | {"png": buf.getvalue()}
    if medium == "audio":
        buf = io.BytesIO()
        sf.write(buf, (rng.standard_normal(16000 * 5) * 0.1).astype(np.float32), 16000, format="WAV")
        return raw | {"wav": buf.getvalue()}
    if medium == "video":
        buf = io.BytesIO()
        with av.open(buf, "w", format="mp4") as c:
            s = c.add_stream("mpeg4", rate=8)
            s.width, s.height, s.pix_fmt = 128, 128, "yuv420p"
            for _ in range(16):
                frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8), format="rgb24")
                for p in s.encode(frame):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
        return raw | {"mp4": buf.getvalue()}
    raise ValueError(f"the dry run has no synthetic sample of {medium!r}")


@contextlib.contextmanager
def fake_cuda():
    """FakeTensorMode on a machine without CUDA, with CUDA autocast allowed (it only sets dispatch flags)."""
    with (
        FakeTensorMode(allow_non_fake_inputs=True) as mode,
        mock.patch("torch.cuda.amp.common.amp_definitely_not_available", return_value=False),
        mock.patch("torch.cuda.is_bf16_supported", return_value=True),
    ):
        yield mode


LLAMA3_TOKENIZER = "asset:llama3_tokenizer_model"


def _tokenizer(name: str, vocab_size: int):
    """The config's tokenizer; one not on this machine (a cluster's path) is replaced by the shipped Llama 3
    tokenizer when its ids fit the tower (the batch's shapes are what matter here), and said so."""
    path = resolve(name)
    if Path(path).exists() or name.startswith("asset:"):
        return Tokenizer.from_pretrained(path)
    tok = Tokenizer.from_pretrained(resolve(LLAMA3_TOKENIZER))
    if vocab_size < 128256:  # not a Llama 3 vocabulary: its ids would not fit
        raise FileNotFoundError(f"model.tokenizer {name} is not on this machine (the dry run needs it to make a batch)")
    print(f"dry run: model.tokenizer {name} is not on this machine: the batch is made with {LLAMA3_TOKENIZER}")
    return tok


def dry_run(cfg, build, *, device: str = "cuda", inject=None) -> dict:
    """{"problems": [...], "ops", "dtype", "batch", "params"} of one training forward of `build()` (the config's
    model, e.g. on the meta device) placed on fake `device`; `inject(model)`: a test's deliberate fault."""
    dev = torch.device(device)
    dt = weight_dtype(cfg.dtype, device)
    model = build()
    tok = _tokenizer(cfg.model.tokenizer, model.tower.args.vocab_size)
    text = " ".join(["word"] * max(cfg.data.max_text_tokens - 2, 1))
    maker, collate = samples_for(cfg, tok, model), collate_for(cfg)
    items = [maker(synthetic_raw(MODALITIES[k].data.medium.name, text)) for k in run_kinds(cfg)]
    batch = collate((items * cfg.data.batch_size)[: max(cfg.data.batch_size, len(items))])
    model.tower.to(dt)  # on the meta device: dtypes first, then fake storage
    for part in model.parts.values():
        part.float()
    with fake_cuda() as fake:
        audit = Audit(dev, {dt, torch.float32}, fake)
        model = model.to_empty(device=dev)
        if inject is not None:
            inject(model)
        for name, p in model.named_parameters():
            want = torch.float32 if p.requires_grad else None
            if (want and p.dtype != want) or p.device.type != dev.type:
                audit.problems[f"parameter {name}: {p.dtype} on {p.device}"] += 1
        amp = torch.autocast(dev.type, dtype=dt) if dt != torch.float32 else contextlib.nullcontext()
        model.train()
        with audit:
            audit.watching = False  # the batch's copy to the device is the loader's, not the step's
            batch = tree_map(lambda t: audit.place(t) if isinstance(t, torch.Tensor) else t, batch)
            audit.watching = True
            with amp:
                out = model(**batch)
            loss = out.loss_sum if out.aux_sum is None else out.loss_sum + out.aux_sum
    return {
        "problems": [f"{k} (x{n})" if n > 1 else k for k, n in audit.problems.items()],
        "notes": [f"{k} (x{n})" if n > 1 else k for k, n in audit.notes.items()],
        "ops": audit.ops,
        "dtype": str(dt).removeprefix("torch."),
        "batch": {k: tuple(v.shape) for k, v in batch.items() if torch.is_tensor(v)},
        "params": sum(p.numel() for p in model.parameters()),
        "loss_shape": tuple(loss.shape),
    }
