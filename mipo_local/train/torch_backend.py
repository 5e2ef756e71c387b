"""The torch backend: transformers models fed from the GGUF (torch_load.py) + PEFT LoRA, on CUDA or CPU.

Where the time and memory go, and what this file does about it:
- bf16 where the hardware has it (CUDA, CPUs with AVX512-BF16/AMX): frozen matrices stored in bf16, LoRA
  weights, norms and the residual stream in fp32, log-softmax and log-prob sums always in fp32;
- fp32 elsewhere (an AVX2 CPU emulates bf16, 5-50x slower): an F16 GGUF's matrices are stored in fp16 and
  cast for each product, the same numbers in half the memory (torch_load.py);
- one row per pair, the shared prompt read once for both answers (batching.pack_pairs), no padding waste;
  attention computed per span of the row, not through a dense mask (torch_attention.py);
- the 49k-wide output head only at response positions, fused with the log-prob, one pass over the vocabulary
  with an online softmax (torch_head.py);
- each LoRA layer as one node, its scale and sum inside the matmuls (torch_lora.py);
- the MLP's act(gate) * up as one node that keeps two tensors for the backward pass, not three (torch_mlp.py);
- the rotary embedding and the llama-style RMSNorm as one node each (torch_rotary.py, torch_norm.py): fewer
  fresh tensors, which on CPU land on newly faulted pages after each trim (_return_freed_memory);
- the tensors a training pass keeps for its backward pass written into buffers the next pass reuses
  (torch_buffers.py): on CPU their pages are faulted in once per run, not once per pair;
- no second model for the reference: the adapter is switched off instead;
- the model is filled from the GGUF one tensor at a time (torch_load.py): the load peaks at the model plus
  one tensor, not at transformers' model + full fp32 state dict;
- optional activation (gradient) checkpointing.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from pathlib import Path

import numpy as np

from .. import gguf_io
from ..chat import EncodedPair
from ..errors import ModelError, TrainingError
from ..gguf_io import gguf_permute_rows, gguf_unpermute_rows
from .backend import Backend, LoraConfig, LoraTensor, PairBatch
from .batching import pack_pairs, pack_sequences
from .dpo import dpo_metrics, dpo_objective, dpo_terms

HF_PROJ = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}
STATE_TENSORS = "backend.safetensors"
STATE_INDEX = "backend.json"
_MODULE = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)$")


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
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
        from transformers.utils import logging as hf_logging

        from .torch_attention import use_pair_attention
        from .torch_buffers import PassBuffers
        from .torch_load import load_causal_lm
        from .torch_lora import fuse_lora_linears
        from .torch_mlp import fuse_gated_mlps
        from .torch_norm import fuse_rms_norms
        from .torch_rotary import use_fused_rotary

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
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
        reader = gguf_io.open_reader(base_gguf)  # opened once: the vocabulary makes every open cost ~0.7 s
        info = gguf_io.read_info(base_gguf, reader=reader)
        self.architecture = info.architecture
        self.n_head = int(info.arch_key("attention.head_count"))
        self.n_head_kv = int(info.arch_key("attention.head_count_kv") or self.n_head)
        # bf16: the frozen weights are loaded straight into bf16 (half the memory, and no fp32 copy for
        # autocast to cast on every pass); fp32 where bf16 is slow or when asked for exact numbers.
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        # fp32: the adapted matrices, the embedding and the head are kept in fp16 where that is exact (an F16
        # GGUF): 270 MB less on the default model, the same numbers; they are cast for each product only.
        # (torch_lora computes them; PEFT's own dropout path would not cast them.)
        fp16 = ()
        if not self.bf16 and lora.dropout == 0:
            fp16 = (*(f"{HF_PROJ[t]}.weight" for t in lora.targets), "embed_tokens.weight", "lm_head.weight")
        try:
            model = load_causal_lm(base_gguf, dtype, reader=reader, fp16_storage=fp16)
        except (ValueError, KeyError, NotImplementedError, OSError) as err:
            raise ModelError(
                f"transformers cannot load {base_gguf.name} ({info.architecture}) for training: {err}"
            ) from err
        model.config.use_cache = False
        use_pair_attention(model)
        if self.bf16:
            _keep_residual_stream_fp32(model)
        elif model.get_input_embeddings().weight.dtype == torch.float16:
            model.get_input_embeddings().register_forward_hook(lambda _m, _inputs, out: out.float())
        fuse_gated_mlps(model)
        use_fused_rotary(model)
        fuse_rms_norms(model)
        torch.manual_seed(seed)
        self.lora = lora
        config = PeftLoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=[HF_PROJ[t] for t in lora.targets],
            bias="none",
        )
        # PEFT keeps the LoRA weights in fp32 even on a bf16 base (autocast_adapter_dtype). It also asks
        # transformers a deprecated question, whose warning is no concern of the user's.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.model = get_peft_model(model, config, autocast_adapter_dtype=True)
        if self.bf16:  # PEFT would upcast LoRA's bf16 input to fp32 for autocast to cast it straight back
            for module in self.model.modules():
                if hasattr(module, "cast_input_dtype_enabled"):
                    module.cast_input_dtype_enabled = False
        fuse_lora_linears(self.model)
        inner = self.model.get_base_model()
        self._decoder = inner.model
        if self.device.type == "cpu":
            layers = self._decoder.layers
            for i in (len(layers) // 3, 2 * len(layers) // 3):
                layers[i].register_forward_hook(_trim_within_pass)
        self._head_weight = inner.lm_head.weight.detach()  # tied models: the embedding matrix itself
        inner.lm_head = torch.nn.Identity()  # the head runs on response rows only (_sequence_logps)
        self._softcap = float(getattr(model.config, "final_logit_softcapping", None) or 0.0)
        sliding = "sliding_attention" in (getattr(model.config, "layer_types", None) or ())
        self._window = int(model.config.sliding_window or 0) if sliding else 0
        if self.grad_checkpointing:
            # Non-reentrant checkpointing lets gradients reach LoRA through frozen embeddings.
            kwargs = {"use_reentrant": False}
            if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
                inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.model.to(self.device)
        self.model.eval()  # one mode for every module (PEFT's wrapper starts in train mode): _set_training
        self._head_weight = self._head_weight.to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.param_names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=0.0, betas=(0.9, 0.999), weight_decay=0.0)
        self._pass_buffers = PassBuffers()

    # -- forward ------------------------------------------------------------------------------

    def _hidden(self, packed):
        """The decoder's final hidden states of a packed batch, flattened to (rows * columns, dim)."""
        import torch

        dev = self.device
        ids = torch.from_numpy(packed.tokens).to(dev)
        pos = torch.from_numpy(packed.positions).to(dev)
        mask = torch.from_numpy(packed.mask).to(dev)[:, None]
        if self._window:  # local-attention layers (gemma3, some qwen) see only the last `window` positions
            near = (pos[:, :, None] - pos[:, None, :]) < self._window
            mask = {"full_attention": mask, "sliding_attention": mask & near[:, None]}
            spans = {}  # windowed layers take the masks (torch_attention covers full attention only)
        else:
            spans = {"pair_spans": packed.spans}
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.bf16):
            hidden = self._decoder(input_ids=ids, position_ids=pos, attention_mask=mask, **spans)
        hidden = hidden.last_hidden_state
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
        token_lp = head_logprobs(
            rows, self._head_weight, torch.from_numpy(packed.targets).to(dev), self._softcap
        )
        sums = torch.zeros(packed.n_sequences, dtype=torch.float32, device=dev)
        return sums.index_add(0, torch.from_numpy(packed.owner).to(dev), token_lp)

    def _other_context_kl(self, pairs: list[EncodedPair]):
        """Each pair's mean per-token KL(reference || policy) over the whole vocabulary on its anchor
        sequence (EncodedPair.anchor_prompt/anchor_response), 0 for pairs without one; and how many have one.

        The reference's distributions come from the same rows with the adapter off, without gradients."""
        import torch

        from .torch_buffers import PassBuffers
        from .torch_head import head_kl
        from .torch_lora import adapters_off

        dev = self.device
        owners = [i for i, e in enumerate(pairs) if e.anchor_prompt]
        out = torch.zeros(len(pairs), dtype=torch.float32, device=dev)
        if not owners:
            return out, 0
        packed = pack_sequences([(pairs[i].anchor_prompt, pairs[i].anchor_response) for i in owners])
        predictors = torch.from_numpy(packed.predictors).to(dev)
        # Nothing of this pass is kept for a backward pass: fresh tensors, not the policy pass's buffers.
        with torch.no_grad(), adapters_off(), PassBuffers.paused():
            ref_rows = self._hidden(packed)[predictors]
        token_kl = head_kl(self._hidden(packed)[predictors], ref_rows, self._head_weight, self._softcap)
        seq = torch.from_numpy(packed.owner).to(dev)
        lengths = torch.tensor(
            [len(pairs[i].anchor_response) for i in owners], dtype=torch.float32, device=dev
        )
        per_sequence = torch.zeros(len(owners), dtype=torch.float32, device=dev).index_add(0, seq, token_kl)
        return out.index_add(0, torch.tensor(owners, device=dev), per_sequence / lengths), len(owners)

    def logprobs(self, pairs: list[EncodedPair], *, adapter: bool) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from .torch_lora import adapters_off

        self._set_training(False)
        with _oom_as_memory_error(), torch.no_grad(), contextlib.nullcontext() if adapter else adapters_off():
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

        self._set_training(True)
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

    def _set_training(self, training: bool) -> None:
        """train() / eval() only when the mode changes: each call walks the model's ~2500 modules (17 ms on
        the default model), and the loop asks for a mode on every micro-batch."""
        if self.model.training != training:
            self.model.train(training)

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

    # -- GGUF layout ------------------------------------------------------------------------------

    def _lora_modules(self):
        """(GGUF base-tensor name, target kind, PEFT LoRA layer) for every adapted projection."""
        short = {v: k for k, v in HF_PROJ.items()}
        for name, module in self.model.named_modules():
            m = _MODULE.search(name)
            if m and hasattr(module, "lora_A") and "default" in module.lora_A:
                kind = short[m.group(2)]
                yield gguf_io.tensor_name(gguf_io.LORA_TARGET_TENSORS[kind], int(m.group(1))), kind, module

    def _to_gguf_rows(self, kind: str, b: np.ndarray) -> np.ndarray:
        """transformers un-permuted llama's q/k rows when loading; permute b's rows back (GGUF order)."""
        if self.architecture == "llama" and kind in ("q", "k"):
            return gguf_permute_rows(b, self.n_head if kind == "q" else self.n_head_kv)
        return b

    def _from_gguf_rows(self, kind: str, b: np.ndarray) -> np.ndarray:
        if self.architecture == "llama" and kind in ("q", "k"):
            return gguf_unpermute_rows(b, self.n_head if kind == "q" else self.n_head_kv)
        return b

    def lora_tensors(self) -> dict[str, LoraTensor]:
        out = {}
        for target, kind, module in self._lora_modules():
            a = module.lora_A["default"].weight.detach().float().cpu().numpy()
            b = module.lora_B["default"].weight.detach().float().cpu().numpy()
            scale = float(module.scaling["default"])
            # Copies: .numpy() shares memory with the live weights, which the next step changes in place.
            out[target] = LoraTensor(a.copy(), np.array(self._to_gguf_rows(kind, b), order="C"), scale)
        return out

    def lora_gradients(self) -> dict[str, LoraTensor]:
        """The accumulated (not yet applied) gradients of each LoRA pair, in GGUF layout like lora_tensors."""
        out = {}
        for target, kind, module in self._lora_modules():
            ga, gb = module.lora_A["default"].weight.grad, module.lora_B["default"].weight.grad
            if ga is None or gb is None:
                continue
            b = gb.detach().float().cpu().numpy()
            out[target] = LoraTensor(
                ga.detach().float().cpu().numpy().copy(),
                np.array(self._to_gguf_rows(kind, b), order="C"),
                float(module.scaling["default"]),
            )
        return out

    def set_lora_tensors(self, tensors: dict[str, LoraTensor]) -> None:
        """Load LoRA weights given in GGUF layout (the inverse of lora_tensors), e.g. for parity tests."""
        import torch

        with torch.no_grad():
            for target, kind, module in self._lora_modules():
                t = tensors[target]
                b = np.ascontiguousarray(self._from_gguf_rows(kind, np.asarray(t.b, np.float32)))
                module.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(t.a, np.float32)))
                module.lora_B["default"].weight.copy_(torch.from_numpy(b))


def _keep_residual_stream_fp32(model) -> None:
    """On a bf16-loaded model: norms back to fp32 and the embedding's output upcast, so the residual
    stream (and every norm) runs in fp32 while the matrices stay bf16. The embedding table stays bf16:
    tied models share it with the output head, which autocast runs in bf16 anyway."""
    import torch

    from . import torch_buffers

    for module in model.modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Embedding):
            continue
        for param in module.parameters(recurse=False):
            param.data = param.data.float()
    model.get_input_embeddings().register_forward_hook(lambda _m, _inputs, out: out.float())
    # The norms whose output only feeds matmuls hand it over in bf16: autocast would cast it to bf16 anyway,
    # once per consumer (q, k, v and their LoRA paths), and keep every copy alive for the backward pass.
    for layer in model.model.layers:
        sandwich = hasattr(
            layer, "pre_feedforward_layernorm"
        )  # gemma: post_attention_layernorm feeds the residual
        for name in (
            "input_layernorm",
            "pre_feedforward_layernorm" if sandwich else "post_attention_layernorm",
        ):
            norm = getattr(layer, name)
            norm.keeps_output = False  # its fp32 output is a temporary; the bf16 copy is what is kept
            norm.register_forward_hook(
                lambda _m, _inputs, out: torch_buffers.empty(out.shape, torch.bfloat16, out.device).copy_(out)
            )


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


def _trim_within_pass(_module, _inputs, output) -> None:
    """Hand the freed temporaries of the layers so far back to the OS, a third and two thirds of the way
    through the forward pass, and again there in the backward pass (when the layer's output gradient is ready).

    glibc keeps the pages of each freed temporary, and the next layers' temporaries and saved activations
    mostly land on other, released pages, so a forward pass grows by its temporaries on top of what it saves.
    Measured on the default model, 300-token pair, 1 thread: step peak 1.12 GB; trimming at these two layers
    1.08 GB for ~1% more time; after every layer 1.04 GB, but 5% more time (the released pages fault in again).
    The backward pass frees each layer's saved activations while its temporaries land on new pages: it grew
    by 30 MB after the forward pass's peak, 10 MB with these trims."""
    import torch

    _return_freed_memory()
    if isinstance(output, tuple):
        output = output[0]
    if isinstance(output, torch.Tensor) and output.requires_grad:
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
