"""Many LoRA adapters on one base, each row of a batch through its own.

A decoder linear that some adapter adapts becomes a MultiLoRALinear: the base (Linear or QuantizedLinear, untouched)
and, stacked, the LoRA factors of every adapter that adapts it, unfused. Row b's output is the base's plus
scale * (x_b @ A) @ B of its own adapter, computed for all rows at once with `mx.gather_mm` (each row multiplied
by the matrices its index picks, as mixture-of-experts layers do); a row of the base, or of an adapter that leaves
this linear alone, picks an all-zero slot, so its output is the base's exactly. Ranks differ between adapters:
each layer's stack is padded with zeros to its largest rank, which adds exact zeros to each product.

Which adapter a row uses is an input of the call, not state of the model: `row_adapters(model, ids)` hands the
(B,) int32 array (-1: the base) to every MultiLoRALinear for the duration of one forward, and the compiled decode
step does the same inside its trace, so the ids are an input of the compiled graph and change from step to step.
Outside such a call every row is the base's.

    add_adapter(model, "receipts", mx.load("ft/receipts/adapters.safetensors"), scale=20.0)
    with row_adapters(model, mx.array([0, -1])):   # row 0 through receipts, row 1 the base
        logits = model(...)
"""

import re
import reprlib
from contextlib import contextmanager
from typing import Dict, Iterable, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from .. import limits
from ..errors import Conflict, InputError

MAX_ADAPTERS = 16  # adapters loaded beside one base at most: every one costs memory and each row's products
ADAPTED = "language_model.model.layers."  # per-row adapters adapt decoder linears only (image features are shared)
# The one layout of a factor's key: a decoder block's attention or MLP linear, then lora_a or lora_b. Nothing
# deeper (`q_proj.linear.lora_a` would reach inside the wrapper another adapter put there).
FACTOR_KEY = re.compile(r"language_model\.model\.layers\.(0|[1-9][0-9]{0,3})\."
                        r"(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.(lora_a|lora_b)")
# A name is a path segment of /v1/adapters/NAME and a `model` of requests: a safe set of characters only.
NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")


class RowAdapters:
    """The (B,) adapter index of each row for the forward under way (-1: the base), or None (all rows the base).
    One per model, shared by its MultiLoRALinears: a plain object, not a parameter."""

    ids: Optional[mx.array] = None


class MultiLoRALinear(nn.Module):
    """A base linear and the unfused LoRA factors of several adapters: lora_a (slots, in, rank), lora_b (slots,
    rank, out), scales (slots,), slot 0 all zeros; `slots` maps adapter index + 1 to this layer's slot."""

    def __init__(self, linear: nn.Module, rows: RowAdapters, input_dims: int, output_dims: int):
        super().__init__()
        self.linear = linear
        self.rows = rows  # a plain attribute (not an array, list or module)
        self.lora_a = mx.zeros((1, input_dims, 1))
        self.lora_b = mx.zeros((1, 1, output_dims))
        self.scales = mx.zeros((1,))
        self.slots = mx.zeros((MAX_ADAPTERS + 1,), dtype=mx.int32)
        # Each slot's own rank and adapter index: plain attributes (a list set the usual way would join the tree).
        object.__setattr__(self, "ranks", [1])
        object.__setattr__(self, "owners", [-1])

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        ids = self.rows.ids
        if ids is None:
            return y
        slot = self.slots[ids + 1]
        # mlx-lm's LoRALinear: y + (scale * ((x @ A) @ B)).astype(x.dtype), with x promoted to the factors' dtype.
        z = mx.gather_mm(x.astype(self.lora_a.dtype), self.lora_a, None, slot)
        z = mx.gather_mm(z, self.lora_b, None, slot)
        return y + (self.scales[slot].reshape(-1, *([1] * (z.ndim - 1))) * z).astype(x.dtype)

    def put(self, index: int, a: Optional[mx.array], b: Optional[mx.array], scale: float) -> None:
        """Add adapter `index`'s factors (a: (in, r), b: (r, out)), or with a None drop its slot; the stacks are
        rebuilt padded to the largest rank left."""
        keep, rank, dtype = self._after(index, a, b, scale)
        zeros_a, zeros_b = mx.zeros((self.lora_a.shape[1], rank), dtype), mx.zeros((rank, self.lora_b.shape[2]), dtype)
        self.lora_a = mx.stack([zeros_a] + [mx.pad(k[1].astype(dtype), [(0, 0), (0, rank - k[4])]) for k in keep])
        self.lora_b = mx.stack([zeros_b] + [mx.pad(k[2].astype(dtype), [(0, rank - k[4]), (0, 0)]) for k in keep])
        self.scales = mx.stack([mx.array(0.0)] + [k[3] for k in keep]).astype(mx.float32)
        object.__setattr__(self, "owners", [-1] + [k[0] for k in keep])
        object.__setattr__(self, "ranks", [1] + [k[4] for k in keep])
        table = [0] * (MAX_ADAPTERS + 1)
        for s, o in enumerate(self.owners):
            if s:
                table[o + 1] = s
        self.slots = mx.array(table, dtype=mx.int32)

    def _after(self, index: int, a: Optional[mx.array], b: Optional[mx.array], scale: float):
        """The slots put(index, a, b, scale) keeps (owner, a, b, scale, rank), their padded rank and dtype."""
        keep = [(o, self.lora_a[s, :, :r], self.lora_b[s, :r], self.scales[s], r)
                for s, (o, r) in enumerate(zip(self.owners, self.ranks)) if s and o != index]
        if a is not None:
            keep.append((index, a, b, mx.array(scale, dtype=mx.float32), a.shape[1]))
        rank = max([1] + [r for *_, r in keep])
        dtype = mx.float32 if not keep else keep[0][1].dtype
        if any(k[1].dtype != dtype or k[2].dtype != dtype for k in keep):
            dtype = mx.float32
        return keep, rank, dtype

    def nbytes_after(self, index: int, a: mx.array, b: mx.array) -> int:
        """The bytes the stacks hold after put(index, a, b, ...), worked out from shapes: nothing is built."""
        keep, rank, dtype = self._after(index, a, b, 0.0)
        slots = len(keep) + 1
        return (slots * (self.lora_a.shape[1] + self.lora_b.shape[2]) * rank * dtype.size + slots * 4
                + self.slots.nbytes)

    @property
    def nbytes(self) -> int:
        return self.lora_a.nbytes + self.lora_b.nbytes + self.scales.nbytes + self.slots.nbytes


class AdapterSet:
    """The adapters loaded beside one model: index -> name (None where free), and what each one is."""

    def __init__(self):
        self.rows = RowAdapters()
        self.names: List[Optional[str]] = []
        self.info: Dict[str, dict] = {}  # name -> rank, scale, layers (module paths), bytes

    def index(self, name: Optional[str]) -> int:
        """-1 for the base (None), else the adapter's index; an unknown name is one line."""
        if name is None:
            return -1
        if name not in self.info:
            known = ", ".join(n for n in self.names if n) or "none are loaded"
            raise InputError(f"unknown adapter {reprlib.repr(name)}: loaded adapters: {known}", param="adapter")
        return self.names.index(name)


def adapter_set(model: nn.Module, create: bool = False) -> Optional[AdapterSet]:
    """The model's adapters (None when it has none and `create` is False)."""
    found = getattr(model, "_adapter_set", None)
    if found is None and create:
        found = AdapterSet()
        object.__setattr__(model, "_adapter_set", found)  # a plain attribute, not a parameter
    return found


def adapter_names(model: nn.Module) -> List[str]:
    found = adapter_set(model)
    return [n for n in found.names if n] if found else []


@contextmanager
def row_adapters(model: nn.Module, ids: Optional[mx.array]):
    """Every MultiLoRALinear of `model` takes row b through adapter ids[b] (-1: the base) inside the block."""
    found = adapter_set(model)
    if found is None:
        yield
        return
    before, found.rows.ids = found.rows.ids, ids
    try:
        yield
    finally:
        found.rows.ids = before


def _dims(linear: nn.Module):
    out, inp = linear.weight.shape
    if isinstance(linear, nn.QuantizedLinear):
        inp = inp * 32 // linear.bits
    return inp, out


def check_name(name, reserved: Iterable[str] = ()) -> None:
    """An adapter's name: 1 to 64 of A-Z a-z 0-9 . _ - (not starting with '.'), and none of `reserved` (the names
    the server answers to with its base)."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        shown = repr(name[:64]) + "..." if isinstance(name, str) and len(name) > 64 else repr(name)
        raise InputError(f"an adapter's name is 1 to 64 characters of A-Z a-z 0-9 . _ - (not starting with '.'), "
                         f"got {shown}", param="name")
    if name in reserved:
        raise InputError(f"{name!r} names the base model here: give the adapter another name", param="name")


def factor_path(key: str) -> str:
    """The module path of a factor's key, which must be in the one layout (FACTOR_KEY); else one line."""
    if not FACTOR_KEY.fullmatch(key):
        shown = key[:200]
        if not key.startswith(ADAPTED):
            raise InputError(f"{shown}: adapters chosen per request adapt the decoder's linears only",
                             param="weights")
        raise InputError(f"{shown} is not a LoRA factor of a decoder linear (language_model.model.layers.N."
                         "self_attn.q_proj ... mlp.down_proj, then .lora_a or .lora_b): load other weights alone "
                         "with adapter_path=", param="weights")
    return key.rpartition(".")[0]


def check_weights(model: nn.Module, weights: Dict[str, mx.array]) -> Dict[str, tuple]:
    """module path -> (lora_a, lora_b), each against the base linear it adapts; a misfit is one line."""
    modules = dict(model.named_modules())
    factors: Dict[str, dict] = {}
    for key, w in weights.items():
        path = factor_path(key)
        base = modules.get(path)
        if isinstance(base, MultiLoRALinear):
            base = base.linear
        if not isinstance(base, (nn.Linear, nn.QuantizedLinear)):
            raise InputError(f"{key}: this model has no linear layer {path}", param="weights")
        factors.setdefault(path, {"base": base})[key.rpartition(".")[2]] = w
    if not factors:
        raise InputError("the adapter file holds no LoRA factors", param="weights")
    checked = {}
    for path, f in factors.items():
        if "lora_a" not in f or "lora_b" not in f:
            raise InputError(f"{path}: the adapter has lora_a or lora_b but not both", param="weights")
        (inp, out), a, b = _dims(f["base"]), f["lora_a"], f["lora_b"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != inp or b.shape[1] != out or a.shape[1] != b.shape[0]:
            raise InputError(f"{path}: LoRA factors of shapes {tuple(a.shape)} and {tuple(b.shape)} do not fit its "
                             f"({inp} -> {out}) linear", param="weights")
        if not mx.issubdtype(a.dtype, mx.floating) or not mx.issubdtype(b.dtype, mx.floating):
            raise InputError(f"{path}: LoRA factors must be floating point, got {a.dtype} and {b.dtype}",
                             param="weights")
        checked[path] = (a, b)
    return checked


def add_adapter(model: nn.Module, name: str, weights: Dict[str, mx.array], scale: float) -> dict:
    """Load an adapter's LoRA factors (`language_model.model.layers.N.<...>.lora_a/lora_b`) beside the base under
    `name`, unfused. Everything is checked before the model changes, the bytes the stacks would hold after it
    (padding to each layer's largest rank included) against limits.LIMITS.max_adapter_bytes too. Returns what it
    is (rank, layers, bytes)."""
    check_name(name)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale != scale or abs(scale) == float("inf"):
        raise InputError(f"the adapter's scale must be a finite number, got {scale!r}", param="scale")
    found = adapter_set(model, create=True)
    if name in found.info:
        raise Conflict(f"an adapter named {name!r} is loaded already", param="name")
    if len(found.info) >= MAX_ADAPTERS:
        raise Conflict(f"at most {MAX_ADAPTERS} adapters beside one base; {len(found.info)} are loaded",
                       param="adapters")
    checked = check_weights(model, weights)
    before = stacked_bytes(model)
    index = found.names.index(None) if None in found.names else len(found.names)
    modules = dict(model.named_modules())
    layers = {path: modules[path] if isinstance(modules[path], MultiLoRALinear)
              else MultiLoRALinear(modules[path], found.rows, *_dims(modules[path])) for path in checked}
    after = before
    for path, (a, b) in checked.items():
        layer = layers[path]
        after += layer.nbytes_after(index, a, b) - (layer.nbytes if layer is modules[path] else 0)
    limit = limits.LIMITS.max_adapter_bytes
    if after > limit:
        # Refused for what is loaded when others' stacks count (their padding to this one's rank, say).
        raise (Conflict if found.info else InputError)(
            f"loading it would make the adapters' stacks {after} bytes (padding to each layer's largest rank "
            f"included), more than the limit of {limit} (max_adapter_bytes)", param="bytes")
    for path, (a, b) in checked.items():
        layers[path].put(index, a, b, float(scale))
    wrapped = [(path, layer) for path, layer in layers.items() if layer is not modules[path]]
    if wrapped:
        model.update_modules(tree_unflatten(wrapped))
    if index == len(found.names):
        found.names.append(name)
    else:
        found.names[index] = name
    ranks = sorted({a.shape[1] for a, _ in checked.values()})
    # bytes: its own factors; added_bytes: what loading it added to the stacks, padding to larger ranks included.
    found.info[name] = {"rank": ranks[-1], "scale": float(scale), "layers": sorted(checked),
                        "bytes": sum(a.nbytes + b.nbytes for a, b in checked.values()),
                        "added_bytes": stacked_bytes(model) - before}
    return found.info[name]


def stacked_bytes(model: nn.Module) -> int:
    """Bytes the MultiLoRALinears hold beside their bases: every adapter's factors as stacked, padding included."""
    return sum(m.nbytes for _, m in model.named_modules() if isinstance(m, MultiLoRALinear))


def remove_adapter(model: nn.Module, name: str) -> None:
    """Drop an adapter: its slots go, and a linear no adapter adapts any more is the plain base again."""
    found = adapter_set(model) or AdapterSet()
    index = found.index(name)
    modules = dict(model.named_modules())
    unwrapped = []
    for path in found.info[name]["layers"]:
        layer = modules[path]
        layer.put(index, None, None, 0.0)
        if len(layer.owners) == 1:
            unwrapped.append((path, layer.linear))
    if unwrapped:
        model.update_modules(tree_unflatten(unwrapped))
    found.names[index] = None
    del found.info[name]
