"""A faster LoRA training step on a PEFT-wrapped LLM, with PEFT's parameters, semantics and file format.

`enable_fast_lora(model)` puts fused modules (`internvl.lora.fused_modules`) in the place of the PEFT-wrapped
LLM's LoRA linears, gated MLPs, RMSNorms and (where the class has a seam for it) rotary embedding, and computes
the loss without the logits; what goes where comes from the model's row of the arch table (`internvl.archs`).
It is exact or it refuses: every trainable parameter inside a module it would replace gets its gradient from a
fused node, or it raises naming the parameter (PEFT's `bias="all"` / `"lora_only"`, a trainable base weight or
norm); so do configurations the nodes do not compute (DoRA, a LoRA bias, several adapters, a class without a row
in the table). Modules PEFT trains whole (`modules_to_save`, anywhere) are left to PEFT's own forward, and a norm
is folded into its readers only when the table's readers are all fused LoRA modules. The returned handle's
`restore()` puts every original module back; while swapped, `state_dict` keys, parameters and `save_pretrained`
are PEFT's own.

    model = add_lora(llm, ...)                      # a PeftModel, as for the plain path
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    handle = maybe_enable_fast_lora(model)          # None (and a logged reason) off CUDA or when unsupported
    set_checkpointed_layers(model, CheckpointPlan(recompute_mlp=n))  # internvl.train.checkpointing
    ...                                             # train; save_pretrained as usual
    handle.restore()

Not fused, and why: rotary embedding on transformers' classes (their attention calls its modeling module's
`apply_rotary_pos_emb`; replacing that would change every model of the class in the process), Phi3's packed
gate_up MLP (each of its LoRA linears is fused on its own), MoE experts (PEFT's parameter adapters keep their
forward). Measured figures (one H200): bench/README.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from peft import PeftModel
from peft.tuners.lora import Linear as LoraLinear
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from internvl.archs import LLM_ARCHS, LLMArch, resolve
from internvl.lora.fused_modules import (
    FoldedRMSNorm,
    FusedCausalLMForward,
    FusedGatedMLP,
    FusedLoraLinear,
    FusedRMSNorm,
    FusedRotary,
    adapter_parameters,
)

logger = logging.getLogger(__name__)

FUSED_MODULES = (FusedLoraLinear, FusedGatedMLP, FusedRMSNorm, FoldedRMSNorm, FusedRotary)


@dataclass(frozen=True)
class Swap:
    """One module to put in another's place: `fused` for `original`, the child `name` of `parent`."""

    path: str  # the original's name in the causal LM, for messages
    parent: nn.Module
    name: str
    original: nn.Module
    fused: nn.Module
    produces: tuple[nn.Parameter, ...]  # the parameters the fused module computes gradients for


class _Plan:
    """What `enable_fast_lora` would swap in one causal LM, and why it cannot (`reasons`)."""

    def __init__(self, llm: nn.Module, row: LLMArch):
        self.llm, self.row = llm, row
        self.swaps: list[Swap] = []
        self.reasons: list[str] = []
        self.taken: set[int] = set()  # ids of modules already placed in a swap
        self.rms_norm = resolve(row.rms_norm_class) if row.rms_norm_class else None
        self.silu = getattr(llm.config, "hidden_act", None) in ("silu", "swish")  # the MLPs' act_fn is built from it
        for wrapper in llm.modules():  # modules_to_save: PEFT trains those modules whole, through their own forward
            if isinstance(wrapper, ModulesToSaveWrapper):
                self.taken.update(id(m) for m in wrapper.modules())
        for i, layer in enumerate(_child(llm, row.decoder_layers) or ()):
            self._plan_layer(f"{row.decoder_layers}.{i}", layer)
        for path, module in llm.named_modules():  # the rest: LoRA linears and norms outside the layers' facts
            if id(module) in self.taken:
                continue
            if type(module) is LoraLinear:
                self._add(path, FusedLoraLinear.of(module), adapter_parameters(module))
            elif self._is_norm(module):
                self._add(path, FusedRMSNorm(module, row.rms_norm))
        self._check_exact()

    def _is_norm(self, module: nn.Module) -> bool:
        return self.rms_norm is not None and type(module) is self.rms_norm

    def _add(self, path: str, fused: nn.Module, produces=()) -> None:
        parent_path, _, name = path.rpartition(".")
        original = self.llm.get_submodule(path)
        self.swaps.append(Swap(path, self.llm.get_submodule(parent_path), name, original, fused, tuple(produces)))
        self.taken.add(id(original))
        if isinstance(fused, (FusedGatedMLP, FusedLoraLinear)):  # their LoRA linears are taken with them
            self.taken.update(id(m) for m in original.modules())

    def _free(self, layer: nn.Module, path: str, kind: type) -> nn.Module | None:
        """The module at `path` in `layer` when it is exactly a `kind` and in no swap yet (nor modules_to_save)."""
        module = _child(layer, path)
        return module if type(module) is kind and id(module) not in self.taken else None

    def _plan_layer(self, prefix: str, layer: nn.Module) -> None:
        mlp = self._gated_mlp(layer)
        folded = {}  # reader path -> the Norm it applies
        for norm_path, readers in self.row.norm_readers:
            norm = self._free(layer, norm_path, self.rms_norm)
            if norm is None:
                continue
            fold = FoldedRMSNorm(norm, self.row.rms_norm)
            if mlp is not None and set(readers) == set(self.row.gated_mlp[:2]):
                folded[mlp] = fold.spec
            elif all(self._free(layer, reader, LoraLinear) is not None for reader in readers):
                folded.update(dict.fromkeys(readers, fold.spec))
            else:  # a reader the norm cannot run inside: the norm runs on its own
                continue
            self._add(f"{prefix}.{norm_path}", fold)
        if mlp is not None:
            original = _child(layer, mlp)
            names = tuple(path.rpartition(".")[2] for path in self.row.gated_mlp)
            produces = [p for name in names for p in adapter_parameters(getattr(original, name))]
            self._add(f"{prefix}.{mlp}", FusedGatedMLP(original, names, folded.get(mlp)), produces)
        for reader, spec in folded.items():
            if reader != mlp:
                lora = _child(layer, reader)
                self._add(f"{prefix}.{reader}", FusedLoraLinear.of(lora, spec), adapter_parameters(lora))
        rotary = None if self.row.rotary is None else _child(layer, self.row.rotary)
        if rotary is not None and id(rotary) not in self.taken:
            self._add(f"{prefix}.{self.row.rotary}", FusedRotary(rotary))

    def _gated_mlp(self, layer: nn.Module) -> str | None:
        """The path of the layer's gated MLP when its three projections are LoRA linears under one parent."""
        if self.row.gated_mlp is None or not self.silu:
            return None
        parents = {path.rpartition(".")[0] for path in self.row.gated_mlp}
        parent = _child(layer, next(iter(parents)))
        if (len(parents) != 1 or parent is None or id(parent) in self.taken
                or not all(self._free(layer, path, LoraLinear) for path in self.row.gated_mlp)):
            return None
        return parents.pop()

    def _check_exact(self) -> None:
        untrained = [f"{swap.path}.{name}" for swap in self.swaps for name, param in swap.original.named_parameters()
                     if param.requires_grad and all(param is not p for p in swap.produces)]
        if untrained:
            self.reasons.append(
                f"{len(untrained)} trainable parameter(s) inside modules the fused path replaces would get no "
                f"gradient from it: {', '.join(untrained[:4])}{' ...' if len(untrained) > 4 else ''} (PEFT's "
                "bias='all' or 'lora_only' trains base biases; freeze them, or train on PEFT's own path)")
        for swap in self.swaps:
            if any(m._forward_hooks or m._forward_pre_hooks for m in swap.original.modules()):
                self.reasons.append(f"{swap.path} carries forward hooks, which its fused module would not run")

    def fused_head(self) -> nn.Linear | None:
        """The head the fused loss uses, or None (with a logged reason) where the model's own loss stays."""
        head = self.llm.get_output_embeddings()
        if not self.row.fused_loss:
            why = "the arch table marks its causal-LM forward as more than decoder, head and loss"
        elif getattr(self.llm.config, "output_router_logits", False):
            why = "output_router_logits adds the router's auxiliary loss"
        elif type(head) is not nn.Linear or head.bias is not None or head.weight.requires_grad:
            why = f"the output head ({type(head).__name__}) is not a frozen bias-free Linear"
        else:
            return head
        logger.info("fast LoRA: the loss is left as it is: %s", why)
        return None


def _child(module: nn.Module, path: str) -> nn.Module | None:
    """The registered submodule at `path`, or None (never through a wrapper's attribute forwarding)."""
    for name in path.split("."):
        module = module._modules.get(name)
        if module is None:
            return None
    return module


def _arch_row(llm: nn.Module) -> tuple[LLMArch | None, str | None]:
    """The arch table's row of `llm`, or None and why."""
    architectures = getattr(llm.config, "architectures", None) or [type(llm).__name__]
    row = LLM_ARCHS.get(architectures[0])
    if row is None:
        return None, (f"{architectures[0]} has no row in internvl.archs, which says what the fused path may replace "
                      f"(rows: {', '.join(sorted(LLM_ARCHS))})")
    if resolve(row.model_class) is not type(llm):
        return None, f"the model is a {type(llm).__name__}, not the table's {row.model_class} for {row.name}"
    return row, None


def _peft_reasons(model: nn.Module) -> list[str]:
    """Why the PEFT configuration is outside what the fused nodes compute; empty when it is not."""
    if not isinstance(model, PeftModel):
        return [f"{type(model).__name__} is not a PeftModel (wrap it with internvl.lora.inject.add_lora first)"]
    reasons = []
    if len(model.peft_config) != 1 or len(model.active_adapters) != 1:
        reasons.append(f"needs exactly one adapter, found {sorted(model.peft_config)}")
    config = model.peft_config[model.active_adapters[0]]
    if getattr(config, "peft_type", None) is None or config.peft_type.value != "LORA":
        return reasons + [f"needs a LoRA adapter, found {config.peft_type}"]
    for option in ("use_dora", "lora_bias", "fan_in_fan_out"):
        if getattr(config, option, False):
            reasons.append(f"{option}=True is not supported")
    lora_modules = [m for m in model.modules() if type(m) is LoraLinear]
    if not lora_modules:
        reasons.append("no LoRA nn.Linear layers to accelerate")
    for module in lora_modules:
        if module.lora_variant or not isinstance(module.get_base_layer(), nn.Linear):
            reasons.append(f"{type(module.get_base_layer()).__name__} base layer or LoRA variant in a LoRA layer")
            break
    if any(isinstance(m, FUSED_MODULES) for m in model.modules()) or "forward" in vars(model.get_base_model()):
        reasons.append("the fast path is already enabled on this model: restore() its handle first")
    return reasons


def _plan(model: nn.Module) -> tuple[_Plan | None, list[str]]:
    reasons = _peft_reasons(model)
    if reasons:
        return None, reasons
    row, why = _arch_row(model.get_base_model())
    if row is None:
        return None, [why]
    plan = _Plan(model.get_base_model(), row)
    return plan, plan.reasons


def unsupported_reasons(model: nn.Module) -> list[str]:
    """Why `enable_fast_lora` cannot run on `model`; empty when it can."""
    return _plan(model)[1]


class FastLoRA:
    """The handle `enable_fast_lora` returns: what it put where, and `restore()` to put the originals back.

    Also a context manager: `with enable_fast_lora(model): ...` restores on exit.
    """

    KINDS = {FusedLoraLinear: "lora_linears", FusedGatedMLP: "gated_mlps", FusedRMSNorm: "rms_norms",
             FoldedRMSNorm: "folded_norms", FusedRotary: "rotary"}

    def __init__(self, model: PeftModel, swaps: list[Swap], head: nn.Linear | None):
        self.model = model
        self._swaps = swaps
        self._llm = model.get_base_model()
        self.counts = dict.fromkeys([*self.KINDS.values(), "fused_loss"], 0)
        for swap in swaps:
            setattr(swap.parent, swap.name, swap.fused)
            self.counts[self.KINDS[type(swap.fused)]] += 1
            if isinstance(swap.fused, FusedGatedMLP):
                self.counts["lora_linears"] += 3
        if head is not None:
            self._llm.forward = FusedCausalLMForward(self._llm, head)  # see FusedCausalLMForward for why
            self.counts["fused_loss"] = 1

    @property
    def swapped(self) -> dict[str, nn.Module]:
        """The modules in place now, by their paths in the causal LM (empty once restored)."""
        return {swap.path: swap.fused for swap in self._swaps}

    def restore(self) -> None:
        """Put every original module back, and the causal LM's own forward."""
        for swap in reversed(self._swaps):
            if isinstance(swap.fused, FusedLoraLinear):
                swap.fused.hand_back(swap.original)
            setattr(swap.parent, swap.name, swap.original)
        self._swaps = []
        if isinstance(vars(self._llm).get("forward"), FusedCausalLMForward):
            del self._llm.forward

    def __enter__(self) -> FastLoRA:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def __repr__(self) -> str:
        swapped = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in self.counts.items())
        return f"FastLoRA({swapped})"


def enable_fast_lora(model: PeftModel) -> FastLoRA:
    """Put the fused modules in a PEFT-LoRA-wrapped causal LM; returns the handle that puts the originals back.

    Raises ValueError naming every reason when the model is outside what the fused path computes exactly.
    LoRA layers of other kinds (embeddings, target parameters) keep PEFT's forward; the loss is fused only when
    the output head is a frozen bias-free `nn.Linear`.
    """
    plan, reasons = _plan(model)
    if reasons:
        raise ValueError("Fast LoRA cannot accelerate this model: " + "; ".join(reasons))
    return FastLoRA(model, plan.swaps, plan.fused_head())


def maybe_enable_fast_lora(model: nn.Module) -> FastLoRA | None:
    """`enable_fast_lora` where it helps (CUDA, a supported configuration); otherwise None and a logged reason."""
    device = next(model.parameters()).device
    reasons = [f"parameters are on {device}, the fused path is for CUDA"] if device.type != "cuda" else []
    reasons = reasons or unsupported_reasons(model)
    if reasons:
        logger.warning("Fast LoRA off, training runs PEFT's own layers: %s", "; ".join(reasons))
        return None
    return enable_fast_lora(model)
