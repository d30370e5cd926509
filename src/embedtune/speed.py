"""What makes training and encoding fast on a GPU. Each lever is a knob that can be turned off, and each one
that can run on a CPU is tested there against the plain path (tests/test_speed.py).

- `dtype` (train, evaluate): what the weights and activations are.
    auto      bf16 on a GPU that has it, else fp32.
    bf16      bf16 weights and activations. Train, without DeepSpeed: the optimizer keeps fp32 master weights
              and Adam states (`MasterWeightAdamW`), rounded into the bf16 weights after every step; with
              DeepSpeed: its bf16 mode (which keeps fp32 masters itself).
    autocast  fp32 weights, matmuls in bf16 under `torch.autocast` (norms, residuals and the activations
              between them stay fp32: more memory traffic and casts; what train did before `dtype` existed).
    fp32      everything fp32.
    fp16      evaluate only (GPUs without bf16): fp16 weights. Train refuses it (it needs loss scaling).
- `torch_compile` (train): regional `torch.compile`: each layer of the backbone's repeated block (decoder /
  encoder layer) compiled in place, so the state dict keeps its keys and compile time is that of one layer
  (the layers share the compiled code). Compiled with dynamic shapes: one graph serves every padded length
  and batch size, so recompiles stay bounded whatever the data (`pad_to_multiple_of` narrows the lengths
  further). auto: on for CUDA, except under ZeRO-3, whose parameter-gathering hooks run inside each layer;
  a layer that fails to compile then runs eager (`on`: the error fails the run).
- `deepspeed` (train): auto is none for one process, zero3 for more (`resolve_deepspeed`): on one GPU ZeRO-3
  has nothing to shard and turns the regional compile off, so the commonest run (a one-GPU pipeline task) gets
  compile and the fused AdamW on master weights instead.
- `length_buckets` (train): a batch's texts are sorted by length and cut into this many forward passes, each
  padded to its own longest text (`bucket_cuts` picks the cuts that minimise the padded tokens: with 2,
  queries and documents land apart). Every text is encoded on its own (attention never crosses texts), so
  the outputs, the loss and the gradients are those of one padded pass. auto (0): 2 on CUDA, 1 on CPU,
  where a second pass over short texts cost more than the padding it saved (MiniLM, STS-B pairs: ~1.3x
  slower step with 2, measured on this 2-core machine).
- `pad_to_multiple_of` (train): padded lengths rounded up to a multiple (fewer distinct shapes).
- `use_liger_kernel` (train): Liger's fused RMSNorm, RoPE and SwiGLU kernels (`apply_liger_kernel`).
- `padding_free` (train): the texts of each forward pass packed into one row (`features.pack`), positions
  restarting per text, pooled straight from the packed output (`resolve_padding_free`).
"""

from __future__ import annotations

import contextlib
import resource
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from embedtune.errors import EmbedtuneError
from embedtune.features import Features, cut, lengths, round_up, take
from embedtune.knobs import DEEPSPEED, DTYPES, SWITCHES  # noqa: F401  (the knob table)

TORCH_DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "autocast": torch.float32,
}


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise EmbedtuneError(f"{name}: {value!r} is not one of {' | '.join(choices)}")


def resolve_dtype(dtype: str, cuda: bool | None = None) -> str:
    """`auto` -> bf16 on a CUDA device that supports it, else fp32; any other value as it is (checked)."""
    check_choice("dtype", dtype, DTYPES)
    if dtype != "auto":
        return dtype
    if cuda is None:
        cuda = torch.cuda.is_available()
    return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"


def autocast(dtype: str, device: torch.device | str):
    """The context `dtype` computes under: bf16 autocast for `autocast`, else nothing."""
    if dtype != "autocast":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


# ------------------------------------------------------------------------------------------------ train dtype
@dataclass(frozen=True)
class Precision:
    """What train does for a `dtype` knob, decided once (`resolve`) and passed down as plain values."""

    dtype: str  # bf16 | autocast | fp32 (auto resolved)
    load: torch.dtype  # what the weights are loaded in
    trainer_bf16: bool  # the HF Trainer's bf16: autocast without DeepSpeed, DeepSpeed's bf16 mode with it
    master_weights: bool  # bf16 without DeepSpeed: AdamW on fp32 master weights (`MasterWeightAdamW`)

    @classmethod
    def resolve(cls, dtype: str, deepspeed: str, cuda: bool | None = None) -> Precision:
        """Under DeepSpeed the weights load in fp32 and DeepSpeed's bf16 mode casts them, keeping the fp32
        copies as its master weights: `bf16` and `autocast` are the same thing there. fp16 is refused."""
        resolved = resolve_dtype(dtype, cuda)
        if resolved == "fp16":
            raise EmbedtuneError("dtype: fp16 training needs loss scaling; use bf16, autocast or fp32")
        if deepspeed != "none":
            return cls(resolved, torch.float32, trainer_bf16=resolved != "fp32", master_weights=False)
        bf16 = resolved == "bf16"
        return cls(
            resolved,
            torch.bfloat16 if bf16 else torch.float32,
            trainer_bf16=resolved == "autocast",
            master_weights=bf16,
        )


def resolve_deepspeed(setting: str, processes: int) -> str:
    """`auto`: none for one process (nothing to shard, and the regional compile stays on), zero3 for more."""
    check_choice("deepspeed", setting, DEEPSPEED)
    if setting != "auto":
        return setting
    return "zero3" if processes > 1 else "none"


def flash_attention_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def resolve_padding_free(setting: str, decoder: bool, cuda: bool | None = None) -> tuple[bool, str | None]:
    """(pack the texts?, attention implementation to load the backbone with, or None for the default sdpa).

    on: packed (a decoder only: an encoder attends both ways over the whole row); flash-attention 2's varlen
    kernels when installed on CUDA, else sdpa with the block-diagonal mask transformers builds from the
    positions (on CPU that costs more than padding: every text attends over the whole row's scores, masked).
    auto: on where it pays, a decoder on CUDA with flash-attention installed; off elsewhere.
    """
    check_choice("padding_free", setting, SWITCHES)
    cuda = torch.cuda.is_available() if cuda is None else cuda
    flash = cuda and flash_attention_installed()
    if setting == "off" or (setting == "auto" and not (decoder and flash)):
        return False, None
    if not decoder:
        raise EmbedtuneError("padding_free: on needs a decoder backbone (Qwen2/Qwen3, Llama, Mistral, Gemma)")
    return True, "flash_attention_2" if flash else None


# ------------------------------------------------------------------------------------------------ liger
LIGER_SWITCHES = {
    "auto": "auto",
    "on": "on",
    "off": "off",
    "true": "on",
    "false": "off",
}  # + ms-swift's booleans


def apply_liger_kernel(model: nn.Module, setting: str, cuda: bool | None = None) -> bool:
    """Liger's fused kernels (RMSNorm, RoPE, SwiGLU) swapped into an HF model of a family Liger covers
    (Qwen2/Qwen3, Llama, Mistral, Gemma, ...; its `MODEL_TYPE_TO_APPLY_LIGER_FN`), in place, before LoRA wraps
    the linear layers (Liger's SwiGLU still calls them). `setting`: on (refused without liger-kernel or for a
    family it does not cover) | off | auto (on with CUDA when liger-kernel is installed and covers the model).
    Its RoPE is patched module-wide (every model of that family in the process), so it runs on CUDA only.
    Returns whether the kernels are in."""
    import importlib.util
    import inspect

    mode = LIGER_SWITCHES.get(str(setting).lower())
    if mode is None:
        raise EmbedtuneError(f"use_liger_kernel: {setting!r} is not one of auto | on | off")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    installed = importlib.util.find_spec("liger_kernel") is not None
    if mode == "off" or (mode == "auto" and not (cuda and installed)):
        return False
    if not installed:
        raise EmbedtuneError(
            "use_liger_kernel: on needs liger-kernel (pip install liger-kernel; the GPU image has it)"
        )
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(inner.config, "model_type", "")
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply is None:
        if mode == "on":
            raise EmbedtuneError(f"use_liger_kernel: Liger has no kernels for model type {model_type!r}")
        return False
    wanted = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
              "fused_linear_cross_entropy": False, "model": inner}  # fmt: skip
    params = inspect.signature(apply).parameters
    apply(**{k: v for k, v in wanted.items() if k in params})
    return True


def resolve_buckets(length_buckets: int, cuda: bool | None = None) -> int:
    """`length_buckets` 0 (auto): 2 on CUDA, 1 on CPU; any other value as it is."""
    if length_buckets > 0:
        return length_buckets
    return 2 if (torch.cuda.is_available() if cuda is None else cuda) else 1


def check_train_knobs(
    precision: Precision, optim: str, torch_compile: str, length_buckets: int, pad_to_multiple_of: int
) -> None:
    """Refuse train speed knobs that cannot work, before anything is loaded (the dtype: `Precision.resolve`)."""
    check_choice("torch_compile", torch_compile, SWITCHES)  # also for callers that build no TrainConfig
    if precision.master_weights and optim not in ("adamw_torch", "adamw_torch_fused"):
        raise EmbedtuneError(
            f"optim: {optim!r}: dtype bf16 without DeepSpeed keeps fp32 master weights in AdamW; "
            "use adamw_torch or adamw_torch_fused (or dtype autocast)"
        )


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW whose parameters are fp32 copies ("master weights") of a model's low-precision parameters.

    The model computes in bf16 (no casts, bf16 activations); `step` converts the bf16 gradients to fp32,
    updates the fp32 masters and Adam states (an update far below a bf16 weight's resolution still adds up
    in its master) and rounds the masters into the model's weights. fp32 parameters (a LoRA adapter on a
    bf16 base) are their own masters. `state_dict` carries the masters, so a resumed run continues from the
    exact fp32 values, not from their bf16 rounding. `fused=True` (CUDA, and recent CPUs builds) runs the
    update as one fused kernel.

    Gradients themselves are bf16 (on the model's parameters), and so is their sum over gradient
    accumulation micro-batches or gradient-cache chunks; `dtype autocast` accumulates in fp32.
    """

    def __init__(self, param_groups, **kwargs):
        self.pairs: list[tuple[nn.Parameter, torch.Tensor]] = []
        groups = []
        for group in param_groups:
            masters = []
            for p in group["params"]:
                master = p if p.dtype == torch.float32 else p.detach().float().requires_grad_(True)
                self.pairs.append((p, master))
                masters.append(master)
            groups.append({**group, "params": masters})
        super().__init__(groups, **kwargs)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise EmbedtuneError("MasterWeightAdamW.step takes no closure")
        for p, master in self.pairs:
            if master is not p:
                master.grad = None if p.grad is None else p.grad.float()
        super().step()
        for p, master in self.pairs:
            if master is not p:
                p.copy_(master)
                master.grad = None

    def zero_grad(self, set_to_none: bool = True):
        for p, master in self.pairs:
            p.grad = None
            master.grad = None

    def state_dict(self):
        state = super().state_dict()
        state["master_weights"] = [master.detach() for _, master in self.pairs]
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        masters = state_dict.pop("master_weights", None)
        super().load_state_dict(state_dict)
        if masters is not None:
            with torch.no_grad():
                for (p, master), saved in zip(self.pairs, masters, strict=True):
                    master.copy_(saved)
                    if master is not p:
                        p.copy_(saved)


def peak_memory_gb() -> float:
    """Peak memory of this process: allocated GPU memory under CUDA, else the resident set size."""
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # Linux: KiB


# ------------------------------------------------------------------------------------------------ compile
def compile_enabled(setting: str, deepspeed: str = "none", cuda: bool | None = None) -> bool:
    """`compile` on / off / auto (on for CUDA unless ZeRO-3)."""
    check_choice("compile", setting, SWITCHES)
    if setting != "auto":
        return setting == "on"
    if cuda is None:
        cuda = torch.cuda.is_available()
    return cuda and deepspeed != "zero3"


def regional_compile(model: nn.Module, setting: str, deepspeed: str = "none") -> int:
    """`compile_layers` when `setting` (`torch_compile`) enables it under `deepspeed`; how many layers."""
    if not compile_enabled(setting, deepspeed):
        return 0
    return compile_layers(model, strict=setting == "on")


def repeated_layers(model: nn.Module) -> nn.ModuleList | None:
    """The model's stack of layers: its biggest `ModuleList` whose children are all of one class
    (`layers` of Qwen3 / ModernBERT, `encoder.layer` of BERT), found through any LoRA wrapper."""
    best = None
    for module in model.modules():
        same_class = isinstance(module, nn.ModuleList) and len({type(m) for m in module}) == 1
        if same_class and (best is None or len(module) > len(best)):
            best = module
    return best


def compile_layers(model: nn.Module, strict: bool = True) -> int:
    """Regional compile: every layer of the repeated block compiled in place (`nn.Module.compile`: the state
    dict keeps its keys), dynamic shapes. Returns how many layers (0: no repeated block found).

    `strict` False (`torch_compile auto`): a layer torch cannot compile runs eager, with torch's warning,
    instead of failing the run (`torch._dynamo.config.suppress_errors`, process-wide)."""
    layers = repeated_layers(model)
    if layers is None:
        return 0
    if not strict:
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


# ------------------------------------------------------------------------------------------------ padding
def bucket_cuts(sorted_lengths, k: int) -> list[int]:
    """Boundaries [0, c1, ..., n] cutting ascending lengths into exactly min(k, n) non-empty groups with the
    fewest padded tokens (sum over groups of count x longest). Dynamic programming, O(k n^2) in numpy."""
    s = np.asarray(sorted_lengths, dtype=np.float64)
    n = len(s)
    k = max(1, min(k, n))
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    back = []
    for _ in range(k):
        cur, arg = np.full(n + 1, np.inf), np.zeros(n + 1, dtype=np.int64)
        for j in range(1, n + 1):
            cost = best[:j] + (j - np.arange(j)) * s[j - 1]  # last group = texts i..j-1
            i = int(np.argmin(cost))
            cur[j], arg[j] = cost[i], i
        back.append(arg)
        best = cur
    cuts = [n]
    for arg in reversed(back):
        cuts.append(int(arg[cuts[-1]]))
    return cuts[::-1]


def encode_in_buckets(forward, features: Features, k: int, multiple: int = 0):
    """`forward(features)` of a right-padded batch of T texts run as exactly `k` passes over length-sorted
    groups, each cut to its own longest text (rounded up to `multiple`); outputs back in the input order.

    Always `k` passes, also when there are fewer than `k` texts (the missing passes re-encode text 0 and add
    zero times their output): every rank runs the same number of passes (`embedtune.distributed`).
    """
    if k <= 1:
        return forward(features)
    real = lengths(features)
    order = torch.argsort(real, stable=True)
    sorted_lengths = real[order].tolist()
    cuts = bucket_cuts(sorted_lengths, k)
    padded = features["attention_mask"].shape[1]
    outs = []
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        width = min(round_up(max(int(sorted_lengths[b - 1]), 1), multiple), padded)
        outs.append(forward(cut(take(features, order[a:b]), width)))
    out = torch.cat(outs)[torch.argsort(order)]
    for _ in range(k - len(outs)):  # stand-ins: same pass count on every rank, no effect on the result
        out = out + 0 * forward(cut(take(features, slice(0, 1)), max(int(real[0]), 1))).sum()
    return out
