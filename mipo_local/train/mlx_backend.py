"""The MLX backend: mlx-lm's model classes fed from the GGUF, LoRA through mlx-lm's LoRA layers.

QLoRA on the GGUF's own Q4_0/Q4_1/Q8_0 weights (see mlx_model). The reference model is the same model with
every LoRA layer's scale set to zero, never a second copy. MLX is lazy: every public method ends with
mx.eval on what it produced, so no graph outlives a call and the loop never needs to know about MLX.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from .. import gguf_io
from ..chat import EncodedPair
from ..errors import TrainingError
from ..fsutil import PRIVATE_FILE, atomic_write_text
from ..gguf_io import gguf_permute_rows, gguf_unpermute_rows
from .backend import Backend, LoraConfig, LoraTensor, PairBatch
from .dpo import dpo_metrics, dpo_objective, dpo_terms
from .mlx_model import load_model

# LoRA target short names (gguf_io.LORA_TARGET_TENSORS keys) -> module paths inside an mlx-lm block.
MLX_PROJ = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
STATE_FILE = "backend.safetensors"
META_FILE = "backend.json"
_DTYPES = {"fp32": mx.float32, "bf16": mx.bfloat16}


@contextlib.contextmanager
def _oom_as_memory_error():
    """MLX reports a failed allocation as a RuntimeError; the loop turns MemoryError into advice."""
    try:
        yield
    except RuntimeError as err:
        if "malloc" in str(err) or "memory" in str(err).lower():
            raise MemoryError(str(err)) from err
        raise


def _module(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = root[part]
    return root


class MLXBackend(Backend):
    name = "mlx"

    def __init__(self, precision: str = "auto", threads: int | None = None, grad_checkpointing: bool = False):
        # threads and grad_checkpointing are accepted for a uniform constructor; MLX schedules its own
        # threads, and the small models this backend is for need no checkpointing.
        self.precision = precision

    # -- loading -----------------------------------------------------------------------------------

    def _pick_device(self, device: str) -> None:
        if device == "cpu":
            mx.set_default_device(mx.cpu)
        elif device in ("auto", "gpu", "cuda", "mps"):
            has_gpu = mx.is_available(mx.gpu)
            if device != "auto" and not has_gpu:
                raise TrainingError(f"--device {device} was asked for, but MLX sees no GPU on this machine.")
            mx.set_default_device(mx.gpu if has_gpu else mx.cpu)
        else:
            raise TrainingError(f"--device must be auto, cpu or gpu for the MLX backend, not '{device}'.")
        self.on_gpu = mx.default_device() == mx.gpu

    def load(self, base_gguf: Path, lora: LoraConfig, *, seed: int, device: str = "auto") -> None:
        self._pick_device(device)
        # fp32 on the CPU (exact, and bf16 is not faster there); bf16 on a GPU unless fp32 is asked for.
        precision = self.precision if self.precision != "auto" else ("bf16" if self.on_gpu else "fp32")
        if precision not in _DTYPES:
            raise TrainingError(f"--precision must be auto, fp32 or bf16, not '{self.precision}'.")
        self.dtype_name = precision
        self.model, info = load_model(Path(base_gguf), _DTYPES[precision])
        self.architecture = info.architecture
        self.n_head = int(info.arch_key("attention.head_count"))
        self.n_head_kv = int(info.arch_key("attention.head_count_kv") or self.n_head)
        self.lora, self.seed, self._micro_batches = lora, seed, 0
        mx.random.seed(seed)  # mlx-lm's LoRALinear draws lora_a from MLX's global generator
        config = {
            "rank": lora.rank,
            "scale": lora.scale,  # mlx-lm multiplies by `scale` itself: it is alpha / rank here
            "dropout": lora.dropout,
            "keys": [MLX_PROJ[t] for t in lora.targets],
        }
        linear_to_lora_layers(self.model, len(self.model.layers), config)
        self.optimizer = optim.AdamW(
            learning_rate=0.0, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0, bias_correction=True
        )  # torch's AdamW semantics, so both backends train alike
        self._grads = None
        self._loss_and_grad = nn.value_and_grad(self.model, self._dpo_loss)
        self._kl_and_grad = nn.value_and_grad(self.model, self._kl_loss)
        mx.eval(self.model.parameters())

    def _lora_modules(self):
        """(layer index, target short name, LoRALinear) for every LoRA layer."""
        for i, layer in enumerate(self.model.layers):
            for kind in self.lora.targets:
                module = _module(layer, MLX_PROJ[kind])
                if isinstance(module, LoRALinear):
                    yield i, kind, module

    # -- forward -------------------------------------------------------------------------------------

    @staticmethod
    def _sequence_layout(seqs: list[tuple[list[int], list[int]]]):
        """(prompt, response) sequences as numpy arrays: token ids (right-padded), the row and column of the
        state predicting each response token, the tokens, and a (sequences x tokens) 0/1 owner matrix."""
        ids = np.zeros((len(seqs), max(len(p) + len(r) for p, r in seqs)), np.int32)
        rows, cols, targets = [], [], []
        for i, (p, r) in enumerate(seqs):
            ids[i, : len(p) + len(r)] = [*p, *r]
            rows += [i] * len(r)
            cols += range(
                len(p) - 1, len(p) + len(r) - 1
            )  # the position before each response token predicts it
            targets += r
        owner = np.zeros((len(seqs), len(rows)), np.float32)  # sums per sequence as one matmul
        owner[rows, np.arange(len(rows))] = 1.0
        return ids, np.array(rows), np.array(cols), np.array(targets), owner

    @staticmethod
    def _layout(pairs: list[EncodedPair]):
        """Token ids (right-padded) of [chosen_0, rejected_0, chosen_1, ...] and where each response token is."""
        seqs = [(e.prompt, r) for e in pairs for r in (e.chosen, e.rejected)]
        return tuple(mx.array(a) for a in MLXBackend._sequence_layout(seqs))

    def _sequence_logps(self, ids, rows, cols, targets, owner) -> mx.array:
        """Summed response log-probs per sequence, in fp32; the output head runs at response positions only.

        Right padding needs no attention mask: the causal mask keeps real tokens from seeing it.
        """
        logits = self._head(self.model.model(ids)[rows, cols])
        token_lp = mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0] - mx.logsumexp(logits, axis=-1)
        return owner @ token_lp

    def _head(self, hidden: mx.array) -> mx.array:
        """fp32 logits of final hidden states (a tied head is the embedding matrix)."""
        head = self.model.lm_head if "lm_head" in self.model else self.model.model.embed_tokens.as_linear
        return head(hidden).astype(mx.float32)

    @staticmethod
    def _other_layout(pairs: list[EncodedPair]):
        """The pairs' anchor sequences (EncodedPair.anchor_prompt/anchor_response) laid out as in _layout,
        with a (pairs x tokens) matrix of 1/|y'| in place of the owner matrix: it averages each pair's
        per-token values (a zero row for a pair without one). None when no pair has one."""
        owners = [i for i, e in enumerate(pairs) if e.anchor_prompt]
        if not owners:
            return None
        ids, rows, cols, _, owner = MLXBackend._sequence_layout(
            [(pairs[i].anchor_prompt, pairs[i].anchor_response) for i in owners]
        )
        to_pairs = np.zeros((len(pairs), len(owners)), np.float32)
        to_pairs[owners, np.arange(len(owners))] = [1.0 / len(pairs[i].anchor_response) for i in owners]
        return tuple(mx.array(a) for a in (ids, rows, cols, to_pairs @ owner))

    def _log_softmax_at(self, ids, rows, cols) -> mx.array:
        logits = self._head(self.model.model(ids)[rows, cols])
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def _kl_loss(self, ids, rows, cols, spread, ref_log_q, weight: float):
        """`weight` times the pairs' mean per-token KL(reference || policy) (dpo.py), and the KL per pair."""
        log_p = self._log_softmax_at(ids, rows, cols)
        per_pair = spread @ (mx.exp(ref_log_q) * (ref_log_q - log_p)).sum(axis=-1)
        return weight * per_pair.mean(), per_pair

    @contextlib.contextmanager
    def _adapter_off(self):
        """The reference model: LoRA's contribution (scale * x @ a @ b) switched off in place."""
        modules = [m for _, _, m in self._lora_modules()]
        scales = [m.scale for m in modules]
        for m in modules:
            m.scale = 0.0
        try:
            yield
        finally:
            for m, s in zip(modules, scales, strict=True):
                m.scale = s

    def logprobs(self, pairs: list[EncodedPair], *, adapter: bool) -> tuple[np.ndarray, np.ndarray]:
        self.model.eval()
        with _oom_as_memory_error(), contextlib.nullcontext() if adapter else self._adapter_off():
            lp = self._sequence_logps(*self._layout(pairs))
            mx.eval(lp)
        lp = np.array(lp, dtype=np.float64)
        return lp[0::2], lp[1::2]

    def _dpo_loss(
        self,
        layout,
        ref_chosen,
        ref_rejected,
        chosen_tokens,
        beta: float,
        loss_scale: float,
        sft_weight: float,
        weights=None,
    ):
        lp = self._sequence_logps(*layout)
        loss, r_c, r_r = dpo_terms(lp[0::2], lp[1::2], ref_chosen, ref_rejected, beta, mx)
        objective = dpo_objective(loss, lp[0::2], chosen_tokens, sft_weight, weights)
        return objective.mean() * loss_scale, loss, r_c, r_r

    def accumulate(
        self,
        batch: PairBatch,
        *,
        beta: float,
        loss_scale: float,
        sft_weight: float = 0.0,
        kl_weight: float = 0.0,
    ) -> dict[str, float]:
        self.model.train()
        if self.lora.dropout > 0:  # dropout masks as a pure function of (seed, micro-batch): resumable
            mx.random.seed(self.seed * 1_000_003 + self._micro_batches)
        ref_c = mx.array(np.asarray(batch.ref_chosen, np.float32))
        ref_r = mx.array(np.asarray(batch.ref_rejected, np.float32))
        n_c = mx.array(np.array([len(e.chosen) for e in batch.pairs], np.float32))
        extra = {}
        other = self._other_layout(batch.pairs) if kl_weight > 0 else None
        with _oom_as_memory_error():
            if other is not None:
                with self._adapter_off():
                    ref_log_q = self._log_softmax_at(*other[:3])
                    mx.eval(ref_log_q)
                (_, per_pair), grads = self._kl_and_grad(*other, ref_log_q, kl_weight * loss_scale)
                self._grads = grads if self._grads is None else tree_map(mx.add, self._grads, grads)
                mx.eval(self._grads, per_pair)
                extra["other_kl"] = float(np.array(per_pair).sum()) / other[0].shape[0]
            elif kl_weight > 0:
                extra["other_kl"] = 0.0
            weights = None if batch.weights is None else mx.array(np.asarray(batch.weights, np.float32))
            (_, loss, r_c, r_r), grads = self._loss_and_grad(
                self._layout(batch.pairs), ref_c, ref_r, n_c, beta, loss_scale, sft_weight, weights
            )
            self._grads = grads if self._grads is None else tree_map(mx.add, self._grads, grads)
            mx.eval(self._grads, loss, r_c, r_r)
        self._micro_batches += 1
        metrics = dpo_metrics(np.array(loss), np.array(r_c), np.array(r_r))
        metrics["tokens"] = float(sum(len(e.prompt) + len(e.chosen) + len(e.rejected) for e in batch.pairs))
        return {**metrics, **extra}

    def optimizer_step(self, lr: float, *, max_grad_norm: float = 1.0) -> float:
        if self._grads is None:
            raise TrainingError("optimizer_step was called before any accumulate; there are no gradients.")
        grads, norm = optim.clip_grad_norm(self._grads, max_grad_norm)
        self.optimizer.learning_rate = lr
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        self._grads = None
        return float(norm)

    def lora_gradients(self) -> dict[str, LoraTensor]:
        """The accumulated (not yet applied) gradients of each LoRA pair, in GGUF layout like lora_tensors."""
        if self._grads is None:
            return {}
        flat = dict(tree_flatten(self._grads))
        out = {}
        for i, kind, _ in self._lora_modules():
            prefix = f"model.layers.{i}.{MLX_PROJ[kind]}"
            out[self._gguf_name(i, kind)] = self._to_gguf(
                kind, flat[f"{prefix}.lora_a"], flat[f"{prefix}.lora_b"]
            )
        return out

    # -- state ----------------------------------------------------------------------------------------

    @property
    def ref_source(self) -> str:
        """Name of this backend's reference numbers in the cache: precision changes them."""
        return f"{self.name}:{self.dtype_name}"

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        arrays = {f"param.{k}": v for k, v in tree_flatten(self.model.trainable_parameters())}
        arrays.update({f"optim.{k}": v for k, v in tree_flatten(self.optimizer.state)})
        tmp = directory / f".{STATE_FILE}.part.safetensors"  # mx.save_safetensors wants this suffix
        mx.save_safetensors(str(tmp), arrays)
        os.chmod(tmp, PRIVATE_FILE)
        os.replace(tmp, directory / STATE_FILE)
        meta = {"backend": self.name, "lora": asdict(self.lora), "micro_batches": self._micro_batches}
        atomic_write_text(directory / META_FILE, json.dumps(meta))

    def load_state(self, directory: Path) -> None:
        directory = Path(directory)
        try:
            arrays = mx.load(str(directory / STATE_FILE))
            meta = json.loads((directory / META_FILE).read_text())
        except Exception as err:  # mx.load raises RuntimeError/ValueError for damaged files
            raise TrainingError(f"The checkpoint {directory} is damaged or incomplete ({err}).") from err
        if meta.get("backend") != self.name:
            raise TrainingError(
                f"The checkpoint {directory} was written by the {meta.get('backend')} backend, not mlx."
            )
        expected = dict(tree_flatten(self.model.trainable_parameters()))
        params = {k.removeprefix("param."): v for k, v in arrays.items() if k.startswith("param.")}
        wrong = sorted(k for k in expected if k not in params or params[k].shape != expected[k].shape)
        if wrong or len(params) != len(expected):
            raise TrainingError(
                f"The checkpoint {directory} does not match this model ({(wrong or ['extra tensors'])[0]})."
            )
        self.model.update(tree_unflatten(list(params.items())))
        self.optimizer.state = tree_unflatten(
            [(k.removeprefix("optim."), v) for k, v in arrays.items() if k.startswith("optim.")]
        )
        self._micro_batches = int(meta.get("micro_batches", 0))
        self._grads = None
        mx.eval(self.model.parameters(), self.optimizer.state)

    # -- GGUF layout ----------------------------------------------------------------------------------

    def _gguf_name(self, layer: int, kind: str) -> str:
        return gguf_io.tensor_name(gguf_io.LORA_TARGET_TENSORS[kind], layer)

    def _qk_heads(self, kind: str) -> int | None:
        """Head count of llama's permuted q/k rows, None where the GGUF keeps mlx-lm's row order."""
        if self.architecture != "llama" or kind not in ("q", "k"):
            return None
        return self.n_head if kind == "q" else self.n_head_kv

    def _to_gguf(self, kind: str, lora_a: mx.array, lora_b: mx.array) -> LoraTensor:
        # mlx-lm keeps a as (in, rank) and b as (rank, out): GGUF's a and b are their transposes.
        a = np.ascontiguousarray(np.array(lora_a.astype(mx.float32)).T)
        b = np.array(lora_b.astype(mx.float32)).T
        if (heads := self._qk_heads(kind)) is not None:
            b = gguf_permute_rows(b, heads)
        return LoraTensor(a, np.ascontiguousarray(b), float(self.lora.scale))

    def lora_tensors(self) -> dict[str, LoraTensor]:
        return {
            self._gguf_name(i, kind): self._to_gguf(kind, m.lora_a, m.lora_b)
            for i, kind, m in self._lora_modules()
        }

    def set_lora_tensors(self, tensors: dict[str, LoraTensor]) -> None:
        """Load LoRA weights given in GGUF layout (the inverse of lora_tensors): equal inits across backends."""
        for i, kind, m in self._lora_modules():
            t = tensors[self._gguf_name(i, kind)]
            b = np.asarray(t.b, np.float32)
            if (heads := self._qk_heads(kind)) is not None:
                b = gguf_unpermute_rows(b, heads)
            m.lora_a = mx.array(np.ascontiguousarray(np.asarray(t.a, np.float32).T))
            m.lora_b = mx.array(np.ascontiguousarray(b.T))
        mx.eval(self.model.parameters())
