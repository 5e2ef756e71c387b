"""The torch backend: the project's own decoder read straight from the GGUF (torch_decoder.py), on CUDA or CPU.

Where the time and memory go, and what this file and the decoder do about it:
- bf16 where the hardware has it (CUDA, CPUs with AVX512-BF16/AMX): frozen matrices stored in bf16, LoRA
  weights, norms and the residual stream in fp32, log-softmax and log-prob sums always in fp32;
- fp32 elsewhere (an AVX2 CPU emulates bf16, 5-50x slower): an F16 GGUF's matrices are stored in fp16 and
  cast for each product, the same numbers in half the memory;
- one row per pair, the shared prompt read once for both answers (batching.pack_pairs), no padding waste;
  attention computed per span of the row, not through a dense mask (torch_decoder.span_attention);
- the 49k-wide output head only at response positions, fused with the log-prob, one pass over the vocabulary
  with an online softmax (torch_head.py);
- each LoRA layer as one node, its scale and sum inside the matmuls (torch_lora.py);
- the MLP's act(gate) * up as one node that keeps two tensors for the backward pass, not three (torch_mlp.py);
- the rotary embedding and RMSNorm as one node each (torch_rotary.py, torch_norm.py): fewer fresh tensors,
  which on CPU land on newly faulted pages after each trim (_return_freed_memory);
- the tensors a training pass keeps for its backward pass written into buffers the next pass reuses
  (torch_buffers.py): on CPU their pages are faulted in once per run, not once per pair;
- no second model for the reference: the adapter is switched off instead;
- the model is filled from the GGUF one tensor at a time: the load peaks at the model plus one tensor;
- optional activation (gradient) checkpointing.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from ..chat import EncodedPair
from ..errors import ModelError, TrainingError
from .backend import Backend, LoraConfig, LoraTensor, PairBatch
from .batching import pack_pairs, pack_sequences
from .dpo import dpo_metrics, dpo_objective, dpo_terms

STATE_TENSORS = "backend.safetensors"
STATE_INDEX = "backend.json"


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, precision: str = "auto", threads: int | None = None, grad_checkpointing: bool = False):
        self.precision = precision
        self.threads = threads
        self.grad_checkpointing = grad_checkpointing

    # -- loading -----------------------------------------------------------------------------

    def load(self, base_gguf: Path, lora: LoraConfig, *, seed: int, device: str = "auto") -> None:
        import torch

        from .torch_buffers import PassBuffers
        from .torch_decoder import Decoder

        if lora.dropout:
            raise TrainingError("The torch backend trains LoRA without dropout; set its dropout to 0.")
        if self.threads:
            torch.set_num_threads(self.threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise TrainingError("--device cuda was asked for, but torch sees no CUDA GPU.")
        self.device = torch.device(device)
        self.bf16 = self.precision == "bf16" or (
            self.precision == "auto"
            and (
                device == "cuda" and torch.cuda.is_bf16_supported() or device == "cpu" and cpu_has_fast_bf16()
            )
        )
        base_gguf = Path(base_gguf)
        # bf16: the frozen matrices are loaded straight into bf16 (half the memory, and no fp32 copy to cast
        # on every pass); fp32 where bf16 is slow or when asked for exact numbers. fp32: the adapted
        # matrices, the embedding and the head are kept in fp16 where that is exact (an F16 GGUF): 270 MB less
        # on the default model, the same numbers; they are cast for each product only.
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        fp16 = frozenset() if self.bf16 else frozenset((*lora.targets, "embd"))
        try:
            decoder = Decoder.from_gguf(base_gguf, dtype, fp16_storage=fp16)
        except (ValueError, KeyError, OSError) as err:
            raise ModelError(f"{base_gguf.name} cannot be read for training: {err}") from err
        self.architecture = decoder.shape.architecture
        decoder.add_lora(lora.targets, lora.rank, lora.alpha, seed)
        decoder.checkpointing = self.grad_checkpointing
        if self.device.type == "cpu":
            n = decoder.shape.n_layers
            decoder.after_layer = {n // 3: _trim_within_pass, 2 * n // 3: _trim_within_pass}
        self.decoder = decoder.to(self.device)
        self._head_weight = decoder.head_weight  # tied models: the embedding matrix itself
        named = decoder.named_parameters()
        self.params = [p for _, p in named]
        self.param_names = [n for n, _ in named]
        self.optimizer = torch.optim.AdamW(self.params, lr=0.0, betas=(0.9, 0.999), weight_decay=0.0)
        self._pass_buffers = PassBuffers()

    # -- forward ------------------------------------------------------------------------------

    def _hidden(self, packed):
        """The decoder's final hidden states of a packed batch, flattened to (rows * columns, dim)."""
        import torch

        dev = self.device
        ids = torch.from_numpy(packed.tokens).to(dev)
        pos = torch.from_numpy(packed.positions).to(dev)
        mask = torch.from_numpy(packed.mask).to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.bf16):
            hidden = self.decoder.hidden(ids, pos, packed.spans, mask)
        return hidden.reshape(-1, hidden.shape[-1])

    def _sequence_logps(self, pairs: list[EncodedPair]):
        """Summed response log-probs of [chosen_0, rejected_0, chosen_1, ...] as a 1-D fp32 tensor.

        One row per pair (batching.pack_pairs): the prompt is read once for both responses, and the output
        head runs only on the states that predict a response token.
        """
        import torch

        from .torch_head import head_logprobs

        packed = pack_pairs(pairs)
        dev = self.device
        rows = self._hidden(packed)[torch.from_numpy(packed.predictors).to(dev)]
        token_lp = head_logprobs(rows, self._head_weight, torch.from_numpy(packed.targets).to(dev))
        sums = torch.zeros(packed.n_sequences, dtype=torch.float32, device=dev)
        return sums.index_add(0, torch.from_numpy(packed.owner).to(dev), token_lp)

    def _other_context_kl(self, pairs: list[EncodedPair]):
        """Each pair's mean per-token KL(reference || policy) over the whole vocabulary on its anchor
        sequence (EncodedPair.anchor_prompt/anchor_response), 0 for pairs without one; and how many have one.

        The reference's distributions come from the same rows with the adapter off, without gradients."""
        import torch

        from .torch_buffers import PassBuffers
        from .torch_head import head_kl

        dev = self.device
        owners = [i for i, e in enumerate(pairs) if e.anchor_prompt]
        out = torch.zeros(len(pairs), dtype=torch.float32, device=dev)
        if not owners:
            return out, 0
        packed = pack_sequences([(pairs[i].anchor_prompt, pairs[i].anchor_response) for i in owners])
        predictors = torch.from_numpy(packed.predictors).to(dev)
        # Nothing of this pass is kept for a backward pass: fresh tensors, not the policy pass's buffers.
        with torch.no_grad(), self.decoder.base_only(), PassBuffers.paused():
            ref_rows = self._hidden(packed)[predictors]
        token_kl = head_kl(self._hidden(packed)[predictors], ref_rows, self._head_weight)
        seq = torch.from_numpy(packed.owner).to(dev)
        lengths = torch.tensor(
            [len(pairs[i].anchor_response) for i in owners], dtype=torch.float32, device=dev
        )
        per_sequence = torch.zeros(len(owners), dtype=torch.float32, device=dev).index_add(0, seq, token_kl)
        return out.index_add(0, torch.tensor(owners, device=dev), per_sequence / lengths), len(owners)

    def logprobs(self, pairs: list[EncodedPair], *, adapter: bool) -> tuple[np.ndarray, np.ndarray]:
        import torch

        with (
            _oom_as_memory_error(),
            torch.no_grad(),
            contextlib.nullcontext() if adapter else self.decoder.base_only(),
        ):
            lp = self._sequence_logps(pairs)
        lp = lp.double().cpu().numpy()
        return lp[0::2], lp[1::2]

    def accumulate(
        self,
        batch: PairBatch,
        *,
        beta: float,
        loss_scale: float,
        sft_weight: float = 0.0,
        kl_weight: float = 0.0,
    ) -> dict[str, float]:
        import torch

        dev = self.device
        extra = {}
        with _oom_as_memory_error():
            if kl_weight > 0:
                # Its own backward pass first: the two graphs are never held at once (a lower peak).
                with self._training_pass():
                    other_kl, n_other = self._other_context_kl(batch.pairs)
                    if n_other:
                        (kl_weight * other_kl.mean() * loss_scale).backward()
                extra["other_kl"] = float(other_kl.detach().sum()) / max(1, n_other)
            with self._training_pass():
                lp = self._sequence_logps(batch.pairs)
                ref_c = torch.tensor(batch.ref_chosen, dtype=torch.float32, device=dev)
                ref_r = torch.tensor(batch.ref_rejected, dtype=torch.float32, device=dev)
                loss, r_c, r_r = dpo_terms(lp[0::2], lp[1::2], ref_c, ref_r, beta, torch)
                n_c = torch.tensor([len(e.chosen) for e in batch.pairs], dtype=torch.float32, device=dev)
                w = (
                    None
                    if batch.weights is None
                    else torch.tensor(batch.weights, dtype=torch.float32, device=dev)
                )
                (dpo_objective(loss, lp[0::2], n_c, sft_weight, w).mean() * loss_scale).backward()
        if self.device.type == "cpu":
            _return_freed_memory()
        metrics = dpo_metrics(*(x.detach().cpu().numpy() for x in (loss, r_c, r_r)))
        metrics["tokens"] = float(sum(len(e.prompt) + len(e.chosen) + len(e.rejected) for e in batch.pairs))
        return {**metrics, **extra}

    def _training_pass(self):
        """A forward + backward pass whose kept tensors reuse the previous pass's buffers (torch_buffers).
        Not with gradient checkpointing, which keeps few tensors and recomputes the rest."""
        if self.grad_checkpointing:
            return contextlib.nullcontext()
        return self._pass_buffers.training_pass()

    def optimizer_step(self, lr: float, *, max_grad_norm: float = 1.0) -> float:
        import torch

        norm = torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    # -- state ------------------------------------------------------------------------------------

    @property
    def ref_source(self) -> str:
        """Name of this backend's reference numbers in the cache: precision changes them."""
        return f"torch:{'bf16' if self.bf16 else 'fp32'}"

    def save(self, directory: Path) -> None:
        """LoRA weights, AdamW moments and steps, RNG states: one safetensors file + a JSON index."""
        import torch
        from safetensors.torch import save_file

        directory = Path(directory)
        tensors = {
            f"param.{n}": p.detach().cpu().contiguous()
            for n, p in zip(self.param_names, self.params, strict=True)
        }
        for i, p in enumerate(self.params):
            st = self.optimizer.state.get(p)
            if st:
                tensors[f"adam.{i}.exp_avg"] = st["exp_avg"].cpu().contiguous()
                tensors[f"adam.{i}.exp_avg_sq"] = st["exp_avg_sq"].cpu().contiguous()
                tensors[f"adam.{i}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1).cpu()
        tensors["rng.cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        save_file(tensors, str(directory / STATE_TENSORS))
        meta = {"backend": self.name, "params": self.param_names, "bf16": self.bf16}
        (directory / STATE_INDEX).write_text(json.dumps(meta))

    def load_state(self, directory: Path) -> None:
        import torch
        from safetensors.torch import load_file

        directory = Path(directory)
        try:
            tensors = load_file(str(directory / STATE_TENSORS))
            meta = json.loads((directory / STATE_INDEX).read_text())
        except Exception as err:  # safetensors raises several types for damaged files
            raise TrainingError(f"The checkpoint {directory} is damaged or incomplete ({err}).") from err
        if meta.get("params") != self.param_names:
            raise TrainingError(
                f"The checkpoint {directory} was written for other LoRA settings or another model."
            )
        for n, p in zip(self.param_names, self.params, strict=True):
            if tensors.get(f"param.{n}") is None or tensors[f"param.{n}"].shape != p.shape:
                raise TrainingError(f"The checkpoint {directory} does not match this model (tensor {n}).")
        state = {}
        for i in range(len(self.params)):
            if f"adam.{i}.step" in tensors:
                state[i] = {
                    "step": tensors[f"adam.{i}.step"].reshape(()),
                    "exp_avg": tensors[f"adam.{i}.exp_avg"].to(self.device),
                    "exp_avg_sq": tensors[f"adam.{i}.exp_avg_sq"].to(self.device),
                }
        with torch.no_grad():
            for n, p in zip(self.param_names, self.params, strict=True):
                p.copy_(tensors[f"param.{n}"].to(self.device))
        sd = self.optimizer.state_dict()
        sd["state"] = state
        self.optimizer.load_state_dict(sd)
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)

    # -- LoRA, in GGUF layout natively -----------------------------------------------------------

    def lora_tensors(self) -> dict[str, LoraTensor]:
        scale = self.decoder.lora_scale
        return {name: LoraTensor(_numpy(a), _numpy(b), scale) for name, (a, b) in self.decoder.lora.items()}

    def lora_gradients(self) -> dict[str, LoraTensor]:
        """The accumulated (not yet applied) gradients of each LoRA pair, in GGUF layout like lora_tensors."""
        scale, out = self.decoder.lora_scale, {}
        for name, (a, b) in self.decoder.lora.items():
            if a.grad is not None and b.grad is not None:
                out[name] = LoraTensor(_numpy(a.grad), _numpy(b.grad), scale)
        return out

    def set_lora_tensors(self, tensors: dict[str, LoraTensor]) -> None:
        """Load LoRA weights given in GGUF layout (the inverse of lora_tensors)."""
        import torch

        with torch.no_grad():
            for name, (a, b) in self.decoder.lora.items():
                a.copy_(torch.from_numpy(np.asarray(tensors[name].a, np.float32)))
                b.copy_(torch.from_numpy(np.asarray(tensors[name].b, np.float32)))


def _return_freed_memory() -> None:
    """Hand the activations freed by a backward pass back to the OS (glibc keeps them otherwise).

    Each pair has its own length, so each step's activations have new sizes; glibc's allocator does not
    reuse the old blocks well and the process grows step after step (measured: +550 MB over 12 pairs of the
    default model; with this call, +200 MB). A few milliseconds per call."""
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes
        import ctypes.util

        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _numpy(t) -> np.ndarray:
    """An fp32 numpy copy of a tensor (.numpy() alone would share memory with a weight the next step changes)."""
    return t.detach().float().cpu().numpy().copy()


def _trim_within_pass(output) -> None:
    """Hand the freed temporaries of the layers so far back to the OS, a third and two thirds of the way
    through the forward pass, and again there in the backward pass (when the layer's output gradient is ready).

    glibc keeps the pages of each freed temporary, and the next layers' temporaries and saved activations
    mostly land on other, released pages, so a forward pass grows by its temporaries on top of what it saves.
    Measured on the default model, 300-token pair, 1 thread: step peak 1.12 GB; trimming at these two layers
    1.08 GB for ~1% more time; after every layer 1.04 GB, but 5% more time (the released pages fault in again).
    The backward pass frees each layer's saved activations while its temporaries land on new pages: it grew
    by 30 MB after the forward pass's peak, 10 MB with these trims."""

    _return_freed_memory()
    if output.requires_grad:
        output.register_hook(lambda _grad: _return_freed_memory())


@contextlib.contextmanager
def _oom_as_memory_error():
    """torch reports running out of memory as RuntimeError (CPU) or OutOfMemoryError: make it MemoryError,
    which the loop turns into a message saying what to lower."""
    try:
        yield
    except RuntimeError as err:
        text = str(err)
        if (
            "out of memory" in text.lower()
            or "can't allocate memory" in text
            or "DefaultCPUAllocator" in text
        ):
            raise MemoryError(text) from err
        raise
