"""A decoder-only transformer in plain torch, built straight from a GGUF's tensors (imports torch).

One module for the four supported families, each a few switches on the same block, computed the way
llama.cpp computes it (the engine the export runs in is the oracle):

    llama    rotary on adjacent pairs: the GGUF stores q/k rows permuted for exactly that; optional rope_freqs
    qwen2    rotary on halves; q/k/v biases
    qwen3    rotary on halves; an RMSNorm over each q and k head
    gemma3   rotary on halves; embeddings scaled by sqrt(width); q/k head norms; a norm after attention and
             after the MLP; GELU (tanh); 5 of every 6 layers attend to a sliding window, with their own
             rotary base

Weights are read by their GGUF names and kept in GGUF layout (numpy order: out x in, the layout of
`torch.nn.functional.linear`), one tensor at a time, so loading peaks at the model plus one tensor. A LoRA
pair lives beside the weight it adapts under the same name, so the adapter written for llama.cpp is the
trained tensors as they are. The fast pieces are plain calls: the LoRA product as one node
(torch_lora.LoraLinear), fused RMSNorm, rotary and gated activation, attention per span of a packed pair
row, and the output head that runs only where a response token is predicted (torch_head).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import gguf_io
from ..errors import ModelError
from . import torch_buffers
from .torch_lora import LoraLinear, frozen_linear
from .torch_mlp import GatedActivation
from .torch_norm import RMSNorm
from .torch_rotary import Rotary

GEMMA3_SWA_PATTERN = 6  # llama.cpp: in every 6 layers, the first 5 attend to a window, the 6th to everything
GEMMA3_LOCAL_ROPE_BASE = 10000.0  # llama.cpp's fixed rotary base of Gemma 3's windowed layers
# LoRA targets (gguf_io.LORA_TARGET_TENSORS keys) -> the GGUF tensor stem of each block
STEMS = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate", "up": "ffn_up",
         "down": "ffn_down"}  # fmt: skip
# Outputs the backward pass keeps (v for attention, gate and up for the activation): torch_buffers tensors.
KEPT = frozenset({"v", "gate", "up"})


@dataclass(frozen=True)
class Shape:
    """What the forward pass needs from the GGUF's metadata."""

    architecture: str
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    eps: float
    rope_base: float
    rope_scale: float  # linear rope scaling: positions divided by this
    window: int  # sliding window of the windowed layers; 0: none

    @property
    def halves(self) -> bool:
        """Rotary on the two halves of a head (NEOX order) rather than on adjacent pairs (llama's)."""
        return self.architecture != "llama"

    def windowed(self, layer: int) -> bool:
        return bool(self.window) and layer % GEMMA3_SWA_PATTERN < GEMMA3_SWA_PATTERN - 1

    def rope_base_of(self, layer: int) -> float:
        return GEMMA3_LOCAL_ROPE_BASE if self.windowed(layer) else self.rope_base


def read_shape(info: gguf_io.GGUFInfo) -> Shape:
    """The Shape of a GGUF as gguf_io.read_info reads it (which refuses any architecture but
    gguf_io.SUPPORTED_ARCHITECTURES, naming them)."""
    arch = info.architecture
    key = info.arch_key
    n_embd, n_head = int(key("embedding_length")), int(key("attention.head_count"))
    scaling = key("rope.scaling.type")
    if scaling not in (None, "none", "linear"):
        raise ModelError(
            f"{info.path} uses '{scaling}' rope scaling, which the torch backend does not support."
        )
    return Shape(
        architecture=arch,
        n_layers=int(key("block_count")),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=int(key("attention.head_count_kv") or n_head),
        head_dim=int(key("attention.key_length") or n_embd // n_head),
        eps=float(key("attention.layer_norm_rms_epsilon")),
        rope_base=float(key("rope.freq_base") or 10000.0),
        rope_scale=float(key("rope.scaling.factor") or 1.0) if scaling == "linear" else 1.0,
        window=int(key("attention.sliding_window") or 0) if arch == "gemma3" else 0,
    )


class Decoder:
    """The frozen base model as GGUF-named tensors, LoRA pairs beside the adapted ones, and its forward pass."""

    def __init__(self, shape: Shape, weights: dict[str, torch.Tensor], rope_factors: torch.Tensor | None):
        self.shape = shape
        self.weights = weights
        self.rope_factors = rope_factors
        self.lora: dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
        self.lora_scale = 1.0
        self.adapters_on = True
        self.checkpointing = False  # recompute each block's activations in the backward pass
        self.after_layer: dict[int, Callable[[torch.Tensor], None]] = {}  # called with a block's output

    # -- building ---------------------------------------------------------------------------------

    @classmethod
    def from_gguf(
        cls, path: Path, dtype: torch.dtype, *, reader=None, fp16_storage: frozenset[str] = frozenset()
    ):
        """The model of the GGUF at `path`, its matrices in `dtype` and everything else in fp32, on the CPU.

        `fp16_storage`: LoRA targets (and "embd" for the embedding and head) whose matrices are kept in fp16
        where every value is exactly an fp16 number (an F16 GGUF's are): half the memory of fp32, the same
        numbers, cast for each product (fp32 training only)."""
        from .torch_load import dequantized, exact_in_fp16

        path = Path(path)
        reader = reader or gguf_io.open_reader(path)
        info = gguf_io.read_info(path, reader=reader)
        shape = read_shape(info)
        kept_fp16 = {f".{STEMS[t]}.weight" for t in fp16_storage if t in STEMS}
        if "embd" in fp16_storage and shape.architecture != "gemma3":  # Gemma scales its embedding rows
            kept_fp16 |= {"token_embd.weight", "output.weight"}
        weights, rope_factors = {}, None
        with open(path, "rb") as fh:
            for tensor in reader.tensors:
                array = dequantized(fh, tensor)
                if tensor.name == "rope_freqs.weight":
                    rope_factors = torch.from_numpy(np.ascontiguousarray(array, np.float32))
                    continue
                if array.ndim == 2 and tensor.name.endswith(tuple(kept_fp16)) and exact_in_fp16(array):
                    weights[tensor.name] = torch.from_numpy(array.astype(np.float16))
                elif array.ndim == 2:
                    weights[tensor.name] = torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
                else:  # norms and biases: fp32, with the residual stream
                    weights[tensor.name] = torch.from_numpy(np.ascontiguousarray(array, np.float32))
                del array
        decoder = cls(shape, weights, rope_factors)
        missing = [n for n in decoder.required_names() if n not in weights]
        if missing:
            raise ModelError(f"{path} has no tensor {missing[0]}, which a {shape.architecture} model needs.")
        return decoder

    def required_names(self) -> list[str]:
        s, names = self.shape, ["token_embd.weight", "output_norm.weight"]
        for i in range(s.n_layers):
            names += [f"blk.{i}.{n}.weight" for n in ("attn_norm", "ffn_norm", *STEMS.values())]
            if s.architecture in ("qwen3", "gemma3"):
                names += [f"blk.{i}.attn_q_norm.weight", f"blk.{i}.attn_k_norm.weight"]
            if s.architecture == "gemma3":
                names += [f"blk.{i}.post_attention_norm.weight", f"blk.{i}.post_ffw_norm.weight"]
        return names

    def add_lora(self, targets: tuple[str, ...], rank: int, alpha: float, seed: int) -> None:
        """A LoRA pair (A: rank x in, random; B: out x rank, zeros) on each target matrix of every block, in fp32."""
        generator = torch.Generator().manual_seed(seed)
        self.lora_scale = alpha / rank
        for i in range(self.shape.n_layers):
            for t in targets:
                name = f"blk.{i}.{STEMS[t]}.weight"
                out_dim, in_dim = self.weights[name].shape
                bound = 1 / math.sqrt(
                    in_dim
                )  # PEFT's and torch.nn.Linear's kaiming-uniform (a = sqrt(5)) bound
                a = (torch.rand(rank, in_dim, generator=generator) * 2 - 1) * bound
                self.lora[name] = (torch.nn.Parameter(a), torch.nn.Parameter(torch.zeros(out_dim, rank)))

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [
            (f"{n}.lora_{ab}", p) for n, pair in self.lora.items() for ab, p in zip("ab", pair, strict=True)
        ]

    def to(self, device: torch.device) -> Decoder:
        self.weights = {n: w.to(device) for n, w in self.weights.items()}
        if self.rope_factors is not None:
            self.rope_factors = self.rope_factors.to(device)
        with torch.no_grad():
            for a, b in self.lora.values():
                a.data, b.data = a.data.to(device), b.data.to(device)
        return self

    @property
    def head_weight(self) -> torch.Tensor:
        return self.weights.get("output.weight", self.weights["token_embd.weight"])

    @contextlib.contextmanager
    def base_only(self):
        """The base model (every LoRA pair skipped) until the block ends."""
        on, self.adapters_on = self.adapters_on, False
        try:
            yield
        finally:
            self.adapters_on = on

    # -- forward ----------------------------------------------------------------------------------

    def linear(self, x: torch.Tensor, layer: int, target: str) -> torch.Tensor:
        name = f"blk.{layer}.{STEMS[target]}.weight"
        weight, bias = self.weights[name], self.weights.get(name.replace(".weight", ".bias"))
        kept = target in KEPT
        pair = self.lora.get(name) if self.adapters_on else None
        if pair is None:
            return frozen_linear(x, weight, bias, kept=kept)
        with torch.autocast(x.device.type, enabled=False):  # LoraLinear computes in the weight's dtype
            return LoraLinear.apply(x, weight, bias, pair[0], pair[1], self.lora_scale, kept)

    def norm(self, x: torch.Tensor, name: str, kept: bool = False) -> torch.Tensor:
        """RMSNorm in fp32 (the GGUF's weight is the whole multiplier, Gemma's 1 + w included)."""
        weight = self.weights[name]
        if x.dtype == torch.float32:
            return RMSNorm.apply(x, weight, self.shape.eps, kept)
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.shape.eps) * weight).to(x.dtype)

    def rotary_tables(self, positions: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin per (row, position, head dimension), laid out as the architecture rotates."""
        s = self.shape
        dims = torch.arange(0, s.head_dim, 2, dtype=torch.float32, device=positions.device)
        inv = s.rope_base_of(layer) ** (-dims / s.head_dim)
        if self.rope_factors is not None:
            inv = inv / self.rope_factors
        angles = (positions.float() / s.rope_scale)[..., None] * inv  # (B, T, head_dim / 2)
        if s.halves:
            angles = torch.cat((angles, angles), -1)
        else:
            angles = angles.repeat_interleave(2, -1)
        return angles.cos()[:, None], angles.sin()[:, None]  # (B, 1, T, head_dim): broadcast over heads

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor, spans, mask: torch.Tensor | None = None):
        """Final hidden states (B, T, n_embd) of packed rows (batching.pack_pairs / pack_sequences).

        `spans`: per row, (prompt, chosen, rejected) token counts; attention is computed per span. `mask`
        (B, T, T): the packed rows' mask, used instead where a span is longer than a layer's window."""
        s = self.shape
        compute = self.head_weight.dtype if self.head_weight.dtype != torch.float16 else torch.float32
        x = F.embedding(tokens, self.weights["token_embd.weight"]).float()
        if s.architecture == "gemma3":
            x = x * math.sqrt(s.n_embd)
        tables = {}
        recompute = self.checkpointing and torch.is_grad_enabled()
        for i in range(s.n_layers):
            base = s.rope_base_of(i)
            if base not in tables:  # fp32: q and k are rotated in fp32 (one rounding to bf16, after it)
                tables[base] = self.rotary_tables(positions, i)
            args = (x, i, tables[base], spans, positions, mask, compute)
            if recompute:  # non-reentrant: gradients reach LoRA through the frozen embedding
                x = torch.utils.checkpoint.checkpoint(self.block, *args, use_reentrant=False)
            else:
                x = self.block(*args)
            if i in self.after_layer:
                self.after_layer[i](x)
        return self.norm(x, "output_norm.weight")

    def block(self, x, i, rope, spans, positions, mask, compute):
        s = self.shape
        gemma = s.architecture == "gemma3"
        b, t, _ = x.shape
        h = self.norm(x, f"blk.{i}.attn_norm.weight", kept=compute == torch.float32).to(compute)
        q = self.linear(h, i, "q").view(b, t, s.n_head, s.head_dim)
        k = self.linear(h, i, "k").view(b, t, s.n_head_kv, s.head_dim)
        v = self.linear(h, i, "v").view(b, t, s.n_head_kv, s.head_dim)
        if s.architecture in ("qwen3", "gemma3"):
            q = self.norm(q, f"blk.{i}.attn_q_norm.weight")
            k = self.norm(k, f"blk.{i}.attn_k_norm.weight")
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, heads, T, head_dim)
        cos, sin = rope
        q, k = Rotary.apply(q, cos, sin, s.halves), Rotary.apply(k, cos, sin, s.halves)
        window = s.window if s.windowed(i) else 0
        attended = span_attention(q.to(compute), k.to(compute), v.to(compute), spans, window, positions, mask)
        out = self.linear(attended.reshape(b, t, -1), i, "o")
        if gemma:
            out = self.norm(out.float(), f"blk.{i}.post_attention_norm.weight")
        x = x + out.float()
        h = self.norm(x, f"blk.{i}.ffn_norm.weight", kept=compute == torch.float32).to(compute)
        act = _gelu_tanh if gemma else F.silu
        out = self.linear(
            GatedActivation.apply(self.linear(h, i, "gate"), self.linear(h, i, "up"), act), i, "down"
        )
        if gemma:
            out = self.norm(out.float(), f"blk.{i}.post_ffw_norm.weight")
        return x + out.float()


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def span_attention(q, k, v, spans, window: int, positions, mask):
    """Attention of packed pair rows, (B, H, T, D) -> (B, T, H * D) laid out for the output projection.

    A row is `prompt + chosen + rejected`: prompt + chosen as plain causal attention (the kernel skips the
    blocks above the diagonal), the rejected tokens against the prompt's and their own keys, bottom-right
    causal: about 2.4x fewer scores than one masked product over the row on the default model's pairs.
    On a GPU, and where a windowed layer's span is longer than its window, the rows' own mask (with the
    window applied) goes to one masked kernel instead. Padding positions get zeros: nothing reads them (the
    masked kernel gives them the attention a padding position has to itself)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    gqa = kv_heads != heads
    if gqa and q.dtype != torch.float32:
        # bf16: SDPA's grouped path trained 5-12% slower and rounded differently.
        k, v = (z.repeat_interleave(heads // kv_heads, dim=1) for z in (k, v))
        gqa = False
    scale = 1.0 / math.sqrt(q.shape[-1])
    width = q.shape[2]
    # On a GPU one masked kernel over the batch beats a Python loop over its rows; on the CPU the spans win.
    dense = q.device.type != "cpu" or window and any(p + max(c, r) > window for p, c, r in spans)
    if dense:
        allowed = mask if not window else mask & ((positions[:, :, None] - positions[:, None, :]) < window)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2).reshape(q.shape[0], width, -1)
    rows = []
    for i, (prompt, chosen, rejected) in enumerate(spans):
        qi, ki, vi = q[i : i + 1], k[i : i + 1], v[i : i + 1]
        first = prompt + chosen
        parts = [F.scaled_dot_product_attention(qi[:, :, :first], ki[:, :, :first], vi[:, :, :first],
                                                is_causal=True, scale=scale, enable_gqa=gqa)]  # fmt: skip
        end = first + rejected
        if rejected:
            keys = torch.cat((ki[:, :, :prompt], ki[:, :, first:end]), 2)
            values = torch.cat((vi[:, :, :prompt], vi[:, :, first:end]), 2)
            # Rejected token j sees the whole prompt and rejected tokens 0..j: causal, aligned bottom-right.
            allowed = torch.ones(rejected, prompt + rejected, dtype=torch.bool, device=q.device).tril(prompt)
            parts.append(F.scaled_dot_product_attention(qi[:, :, first:end], keys, values, attn_mask=allowed,
                                                        scale=scale, enable_gqa=gqa))  # fmt: skip
        if end < width:
            parts.append(q.new_zeros(1, heads, width - end, q.shape[-1]))
        rows.append(torch.cat(parts, 2))
    # (B, T, H, D) in memory, as the output projection reads and keeps it: a torch_buffers tensor.
    merged = torch.cat(rows).transpose(1, 2)
    out = torch_buffers.empty(merged.shape, merged.dtype, merged.device).copy_(merged)
    return out.reshape(q.shape[0], width, -1)
