"""The torch backend: transformers' GGUF loader + PEFT LoRA, on CUDA or CPU.

Speed choices: bf16 autocast where the hardware has fast bf16 (CUDA, CPUs with AVX512-BF16/AMX), the
49k-wide output head applied only at response positions, log-softmax and sums in fp32, no second model
for the reference (the adapter is switched off instead).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from .. import gguf_io
from ..chat import EncodedPair
from ..errors import ModelError, TrainingError
from .backend import Backend, LoraConfig, LoraTensor, PairBatch
from .batching import pack_pairs
from .dpo import dpo_metrics, dpo_terms

HF_PROJ = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}
_MODULE = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)$")


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def gguf_permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order: the permutation convert_hf_to_gguf applies to HF's q/k weights.

    Applied to LoRA's b (out x rank) it maps an HF-layout delta to the GGUF layout.
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


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
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

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
        info = gguf_io.read_info(base_gguf)
        self.architecture = info.architecture
        self.n_head = int(info.arch_key("attention.head_count"))
        self.n_head_kv = int(info.arch_key("attention.head_count_kv") or self.n_head)
        os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF conversion draws its own bars
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(base_gguf.parent),
                gguf_file=base_gguf.name,
                dtype=torch.float32,
                attn_implementation="sdpa",
            )
        except (ValueError, KeyError, NotImplementedError, OSError) as err:
            raise ModelError(
                f"transformers cannot load {base_gguf.name} ({info.architecture}) for training: {err}"
            ) from err
        model.config.use_cache = False
        torch.manual_seed(seed)
        self.lora = lora
        config = PeftLoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=[HF_PROJ[t] for t in lora.targets],
            bias="none",
        )
        self.model = get_peft_model(model, config)
        inner = self.model.get_base_model()
        self._decoder = inner.model
        head = inner.lm_head.weight.detach()
        if self.bf16:
            # The frozen matrices are stored in bf16: autocast would cast them on every pass anyway, and
            # would keep a bf16 copy of each alive for the backward pass. Embeddings, norms and LoRA stay fp32.
            for module in self._decoder.modules():
                if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad:
                    module.weight.data = module.weight.data.to(torch.bfloat16)
            head = head.to(torch.bfloat16)  # a copy when tied to the (fp32) embeddings
        self._head_weight = head
        inner.lm_head = torch.nn.Identity()  # the head runs on response rows only (_sequence_logps)
        self._softcap = float(getattr(model.config, "final_logit_softcapping", None) or 0.0)
        if self.grad_checkpointing:
            # Non-reentrant checkpointing lets gradients reach LoRA through frozen embeddings.
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.to(self.device)
        self._head_weight = self._head_weight.to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.param_names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=0.0, betas=(0.9, 0.999), weight_decay=0.0)

    # -- forward ------------------------------------------------------------------------------

    def _sequence_logps(self, pairs: list[EncodedPair]):
        """Summed response log-probs of [chosen_0, rejected_0, chosen_1, ...] as a 1-D fp32 tensor.

        One packed row per call (batching.pack_pairs): the prompt is read once for both responses, no
        padding, and the output head runs only on the rows that predict a response token.
        """
        import torch
        import torch.nn.functional as F

        packed = pack_pairs(pairs)
        dev = self.device
        ids = torch.from_numpy(packed.tokens).to(dev)[None]
        pos = torch.from_numpy(packed.positions).to(dev)[None]
        mask = torch.from_numpy(packed.mask).to(dev)[None, None]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.bf16):
            hidden = self._decoder(input_ids=ids, position_ids=pos, attention_mask=mask).last_hidden_state[0]
            logits = F.linear(hidden[torch.from_numpy(packed.predictors).to(dev)], self._head_weight)
        logits = logits.float()
        if self._softcap:
            logits = self._softcap * torch.tanh(logits / self._softcap)
        token_lp = -F.cross_entropy(logits, torch.from_numpy(packed.targets).to(dev), reduction="none")
        sums = torch.zeros(packed.n_sequences, dtype=torch.float32, device=dev)
        return sums.index_add(0, torch.from_numpy(packed.owner).to(dev), token_lp)

    def logprobs(self, pairs: list[EncodedPair], *, adapter: bool) -> tuple[np.ndarray, np.ndarray]:
        import torch

        self.model.eval()
        with torch.no_grad():
            if adapter:
                lp = self._sequence_logps(pairs)
            else:
                with self.model.disable_adapter():
                    lp = self._sequence_logps(pairs)
        lp = lp.double().cpu().numpy()
        return lp[0::2], lp[1::2]

    def accumulate(self, batch: PairBatch, *, beta: float, loss_scale: float) -> dict[str, float]:
        import torch

        self.model.train()
        lp = self._sequence_logps(batch.pairs)
        ref_c = torch.tensor(batch.ref_chosen, dtype=torch.float32, device=self.device)
        ref_r = torch.tensor(batch.ref_rejected, dtype=torch.float32, device=self.device)
        loss, r_c, r_r = dpo_terms(lp[0::2], lp[1::2], ref_c, ref_r, beta, torch)
        (loss.mean() * loss_scale).backward()
        metrics = dpo_metrics(
            loss.detach().cpu().numpy(), r_c.detach().cpu().numpy(), r_r.detach().cpu().numpy()
        )
        metrics["tokens"] = float(
            sum(2 * len(e.prompt) + len(e.chosen) + len(e.rejected) for e in batch.pairs)
        )
        return metrics

    def optimizer_step(self, lr: float, *, max_grad_norm: float = 1.0) -> float:
        import torch

        norm = torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    # -- state ------------------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        tensors = {
            f"param.{n}": p.detach().cpu().contiguous()
            for n, p in zip(self.param_names, self.params, strict=True)
        }
        steps = {}
        for i, p in enumerate(self.params):
            st = self.optimizer.state.get(p)
            if st:
                tensors[f"adam.{i}.exp_avg"] = st["exp_avg"].cpu().contiguous()
                tensors[f"adam.{i}.exp_avg_sq"] = st["exp_avg_sq"].cpu().contiguous()
                steps[i] = float(st["step"])
        save_file(tensors, str(directory / "backend.safetensors"))
        (directory / "backend.json").write_text(json.dumps({"backend": self.name, "adam_steps": steps}))

    def load_state(self, directory: Path) -> None:
        import torch
        from safetensors.torch import load_file

        directory = Path(directory)
        try:
            tensors = load_file(str(directory / "backend.safetensors"))
            meta = json.loads((directory / "backend.json").read_text())
        except Exception as err:
            raise TrainingError(f"The checkpoint {directory} is damaged or incomplete ({err}).") from err
        with torch.no_grad():
            for n, p in zip(self.param_names, self.params, strict=True):
                if f"param.{n}" not in tensors:
                    raise TrainingError(
                        f"The checkpoint {directory} does not match this model (missing {n})."
                    )
                p.copy_(tensors[f"param.{n}"].to(self.device))
        state = {}
        for key, step in meta["adam_steps"].items():
            i = int(key)
            state[i] = {
                "step": torch.tensor(step),
                "exp_avg": tensors[f"adam.{i}.exp_avg"].to(self.device),
                "exp_avg_sq": tensors[f"adam.{i}.exp_avg_sq"].to(self.device),
            }
        sd = self.optimizer.state_dict()
        sd["state"] = state
        self.optimizer.load_state_dict(sd)

    # -- export ----------------------------------------------------------------------------------

    def lora_tensors(self) -> dict[str, LoraTensor]:
        short = {v: k for k, v in HF_PROJ.items()}
        out = {}
        for name, module in self.model.named_modules():
            m = _MODULE.search(name)
            if not m or not hasattr(module, "lora_A") or "default" not in module.lora_A:
                continue
            layer, proj = int(m.group(1)), m.group(2)
            a = module.lora_A["default"].weight.detach().float().cpu().numpy()
            b = module.lora_B["default"].weight.detach().float().cpu().numpy()
            kind = short[proj]
            if self.architecture == "llama" and kind in ("q", "k"):
                b = gguf_permute_rows(b, self.n_head if kind == "q" else self.n_head_kv)
            target = gguf_io.tensor_name(gguf_io.LORA_TARGET_TENSORS[kind], layer)
            out[target] = LoraTensor(a.copy(), np.ascontiguousarray(b), float(module.scaling["default"]))
        return out

    def set_lora_tensors(self, tensors: dict[str, LoraTensor]) -> None:
        """Load LoRA weights given in GGUF layout (the inverse of lora_tensors); used for parity tests."""
        import torch

        short = {v: k for k, v in HF_PROJ.items()}
        with torch.no_grad():
            for name, module in self.model.named_modules():
                m = _MODULE.search(name)
                if not m or not hasattr(module, "lora_A") or "default" not in module.lora_A:
                    continue
                kind = short[m.group(2)]
                t = tensors[gguf_io.tensor_name(gguf_io.LORA_TARGET_TENSORS[kind], int(m.group(1)))]
                b = t.b
                if self.architecture == "llama" and kind in ("q", "k"):
                    b = gguf_unpermute_rows(b, self.n_head if kind == "q" else self.n_head_kv)
                module.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(t.a, np.float32)))
                module.lora_B["default"].weight.copy_(torch.from_numpy(np.ascontiguousarray(b, np.float32)))


def gguf_unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of gguf_permute_rows (GGUF q/k row order back to HF's)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
