"""`MoELoRALinear`: a frozen base layer plus a routed mixture of LoRA experts.

output = base(x) + sum_e gate_e(x) * (lora_alpha / rank) * B_e A_e dropout(x)

with the layer's own lora_alpha: it starts at the config's and a rank change that keeps the scaling
(`keep_scaling`) moves it with the rank; the `lora_layer_alpha` buffer carries it through state dicts.

All experts' A factors are stacked into one (E*r, d_in) matrix and all B factors into one (d_out, E*r)
matrix, so the default forward is two matmuls with the gates applied to the r-blocks in between: no
Python loop over experts, and the same cost as a plain LoRA of rank E*r plus a tiny router. The layout
of the parameters is a contract (docs/architecture.md): the scoring code and the resize operations
address expert e as rows / columns [e*r, (e+1)*r).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layermoe.layout import CAPACITY_MINIMUM, effective_top_k, is_int_at_least
from layermoe.precision import cpu_has_native_bf16

from .base import BaseInfo, base_info
from .config import LAYER_SETTINGS, check_layer_settings
from .grouped import grouped_lora_output
from .router import compute_gates, router_statistics

CaptureHook = Callable[["MoELoRALinear", dict[str, Any]], None]

#: read once per process: /proc/cpuinfo does not change, and forward must not read a file
_native_bf16_cpu = functools.cache(cpu_has_native_bf16)


def lora_init_A(
    rows: int,
    d_in: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """LoRA's A init (kaiming_uniform with a=sqrt(5), as nn.Linear and peft use): never zero.

    A `generator` (on `device`) draws from it instead of the global RNG: surgery passes each layer's
    own (`surgery.layer_generator`), the scoring probe of 0-expert layers a seeded one.
    """
    weight = torch.empty(rows, d_in, device=device, dtype=dtype)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    return weight


def gate_expert_hidden(
    expert_hidden: torch.Tensor, logits: torch.Tensor | None, rank: int, scaling: float, top_k: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gating of `MoELoRALinear.gated_hidden` for any (experts, rank): resize reports call it on
    planned tensors, so a report measures the forward's own computation."""
    if logits is None:
        return expert_hidden * scaling, None
    gates, probs = compute_gates(logits, top_k)
    weights = (gates * scaling).to(expert_hidden.dtype)
    lead, experts = expert_hidden.shape[:-1], logits.shape[-1]
    hidden = expert_hidden.view(*lead, experts, rank) * weights.unsqueeze(-1)
    return hidden.view(*lead, experts * rank), probs


def alpha_value(value: Any) -> float | None:
    """The float of a saved `lora_layer_alpha` (one finite number > 0), or None when it is not one."""
    tensor = torch.as_tensor(value)
    if tensor.numel() != 1 or tensor.dtype == torch.bool or tensor.is_complex():
        return None
    number = float(tensor.reshape(()).item())
    return number if math.isfinite(number) and number > 0 else None


class MoELoRALinear(nn.Module):
    """Wraps a frozen `nn.Linear`, GPT-2 `Conv1D` or bitsandbytes 4/8-bit linear with MoE-LoRA experts.

    Parameters (names are a contract): `lora_A` (E*r, d_in), `lora_B` (d_out, E*r), and when E > 1
    `lora_router_weight` (E, d_in) and `lora_router_bias` (E,). With E = 0 (a block left without
    capacity) all four are None: the layer is the frozen base, keeps its rank for when experts come back,
    and stays wrapped so a resize or a `load_state_dict` can give it experts again. Buffers: `lora_shape` = [E, r] (int64,
    persistent: a freshly built layer re-allocates itself to the incoming shape before loading a
    state_dict, so resized checkpoints load with plain `load_state_dict`), `lora_routing_mass` (E,),
    a running average of the gate probabilities seen in training (which expert to split or drop), and
    `lora_layer_alpha` (float64 scalar, persistent): the layer's own `lora_alpha`, which may differ from
    the config's (`config_lora_alpha`) after a rank change that kept the scaling. A state dict without
    it (written before it existed) loads with the config's alpha.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        experts: int = 1,
        rank: int = 8,
        top_k: int | None = None,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        router_aux_loss_coef: float = 0.0,
        router_z_loss_coef: float = 0.0,
        router_init_std: float = 0.0,
        routing_mass_decay: float = 0.99,
    ) -> None:
        arguments = locals()  # before anything else is bound: exactly the constructor's arguments
        super().__init__()
        for name, value in (("experts", experts), ("rank", rank)):
            low = CAPACITY_MINIMUM[name]
            if not is_int_at_least(value, low):
                raise ValueError(f"MoELoRALinear.{name} must be an int >= {low}, got {value!r}")
        check_layer_settings("MoELoRALinear", **{name: arguments[name] for name in LAYER_SETTINGS})
        self.info: BaseInfo = base_info(base_layer)
        self.base_layer = base_layer
        for param in base_layer.parameters():
            param.requires_grad_(False)
        self.in_features = self.info.in_features
        self.out_features = self.info.out_features
        self.top_k = top_k
        #: the config's alpha, what the layer was built with; `lora_alpha` is the layer's current one
        self.config_lora_alpha = float(lora_alpha)
        self._lora_alpha = self.config_lora_alpha
        self.lora_dropout_p = float(lora_dropout)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.router_aux_loss_coef = float(router_aux_loss_coef)
        self.router_z_loss_coef = float(router_z_loss_coef)
        self.router_init_std = float(router_init_std)
        self.routing_mass_decay = float(routing_mass_decay)
        self.capture_hook: CaptureHook | None = None
        self.path = "auto"  # "auto" | "dense" | "grouped"; see use_grouped
        self._router_stats: dict[str, torch.Tensor] | None = None
        self.experts = experts
        self.rank = rank
        self.register_buffer(
            "lora_shape", torch.tensor([experts, rank], dtype=torch.int64, device=self.info.device)
        )
        # float64: exact for any alpha a rank ratio makes; forward reads the Python float, never this
        self.register_buffer(
            "lora_layer_alpha",
            torch.tensor(self.config_lora_alpha, dtype=torch.float64, device=self.info.device),
        )
        self.register_buffer(
            "lora_routing_mass",
            torch.full((experts,), 1.0 / max(experts, 1), dtype=torch.float32, device=self.info.device),
        )
        self.register_parameter("lora_A", None)
        self.register_parameter("lora_B", None)
        self.register_parameter("lora_router_weight", None)
        self.register_parameter("lora_router_bias", None)
        self.reset_lora_parameters(experts, rank)

    # ------------------------------------------------------------------ shape and parameters
    @property
    def lora_alpha(self) -> float:
        """The layer's own alpha (the config's unless a rank change kept the scaling); persisted in the
        `lora_layer_alpha` buffer, so checkpoints, adapter artifacts and peft exports keep it."""
        return self._lora_alpha

    @lora_alpha.setter
    def lora_alpha(self, value: float) -> None:
        value = float(value)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"MoELoRALinear.lora_alpha must be a finite number > 0, got {value!r}")
        self._lora_alpha = value
        # a new tensor, not an in-place fill: snapshots that rebind buffers (rewire rollback) restore it
        device = self.lora_layer_alpha.device
        self.lora_layer_alpha = torch.tensor(value, dtype=torch.float64, device=device)

    @property
    def scaling(self) -> float:
        """lora_alpha / rank: the factor every expert's B_e A_e is multiplied by."""
        return self._lora_alpha / self.rank

    @property
    def has_adapter(self) -> bool:
        """False for a layer with 0 experts: no adapter parameters, forward = the frozen base."""
        return self.experts > 0

    def adapter_placement(self) -> tuple[torch.device, torch.dtype]:
        """Device and dtype of the adapter parameters (of the ones they would have, with 0 experts)."""
        if self.lora_A is not None:
            return self.lora_A.device, self.lora_A.dtype
        # no parameter to follow a later .to(): read the base again, as the constructor did
        info = base_info(self.base_layer)
        return info.device, info.dtype

    @property
    def effective_top_k(self) -> int | None:
        """None when routing is dense (no top_k or top_k >= experts)."""
        return effective_top_k(self.top_k, self.experts)

    def reset_lora_parameters(self, experts: int, rank: int) -> None:
        """Fresh LoRA init for shape (experts, rank): A kaiming, B zero, router small or zero, bias zero."""
        device, dtype = self.adapter_placement()  # follows the model if it was moved or cast
        A = B = None
        if experts > 0:
            A = lora_init_A(experts * rank, self.in_features, device=device, dtype=dtype)
            B = torch.zeros(self.out_features, experts * rank, device=device, dtype=dtype)
        router_w = router_b = None
        if experts > 1:
            router_w = torch.zeros(experts, self.in_features, device=device, dtype=dtype)
            if self.router_init_std > 0:
                router_w.normal_(0.0, self.router_init_std)
            router_b = torch.zeros(experts, device=device, dtype=dtype)
        mass = torch.full((experts,), 1.0 / max(experts, 1), dtype=torch.float32, device=device)
        self.install(experts, rank, A, B, router_w, router_b, mass)

    def install(
        self,
        experts: int,
        rank: int,
        A: torch.Tensor | None,
        B: torch.Tensor | None,
        router_weight: torch.Tensor | None,
        router_bias: torch.Tensor | None,
        routing_mass: torch.Tensor,
        keep: frozenset[str] = frozenset(),
        lora_alpha: float | None = None,
    ) -> None:
        """Swap in new tensors (already built and checked); names in `keep` keep their Parameter object.

        Only called once every tensor exists, so a failing resize never leaves a half-changed layer.
        With experts = 0, A and B are None (the layer has no adapter). `lora_alpha`: the layer's new
        alpha (None keeps it).
        """
        if experts == 0:
            if A is not None or B is not None or router_weight is not None or router_bias is not None:
                raise ValueError("install: a layer with 0 experts has no lora_A/lora_B/router tensors")
        elif A is None or B is None:
            raise ValueError(f"install: experts={experts} needs lora_A and lora_B")
        elif A.shape != (experts * rank, self.in_features) or B.shape != (self.out_features, experts * rank):
            raise ValueError(
                f"install: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not match experts={experts}, "
                f"rank={rank}, d_in={self.in_features}, d_out={self.out_features}"
            )
        if (router_weight is None) != (experts <= 1) or (router_bias is None) != (experts <= 1):
            raise ValueError(f"install: a router is needed exactly when experts > 1 (experts={experts})")
        if router_weight is not None and (
            router_weight.shape != (experts, self.in_features) or router_bias.shape != (experts,)
        ):
            raise ValueError("install: router weight/bias shapes do not match experts and d_in")
        if lora_alpha is not None and not (math.isfinite(lora_alpha) and lora_alpha > 0):
            raise ValueError(f"install: lora_alpha must be a finite number > 0, got {lora_alpha!r}")
        requires_grad = self.lora_A.requires_grad if self.lora_A is not None else True
        new = {"lora_A": A, "lora_B": B, "lora_router_weight": router_weight, "lora_router_bias": router_bias}
        for name, tensor in new.items():
            if name in keep:
                continue
            param = None if tensor is None else nn.Parameter(tensor.detach(), requires_grad=requires_grad)
            self.register_parameter(name, param)
        self.lora_shape = torch.tensor([experts, rank], dtype=torch.int64, device=self.lora_shape.device)
        self.lora_routing_mass = routing_mass.detach().to(torch.float32).clone()
        self.experts = experts
        self.rank = rank
        if lora_alpha is not None:
            self.lora_alpha = lora_alpha

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> MoELoRALinear:
        # A cast of the model (`.half()`, bf16-true precision) would round the alpha in its buffer: it
        # stays the exact float64 of the Python value on whatever device the cast moved it to.
        super()._apply(fn, recurse)
        buffer = self.lora_layer_alpha
        if buffer.dtype != torch.float64:
            self.lora_layer_alpha = torch.tensor(self._lora_alpha, dtype=torch.float64, device=buffer.device)
        return self

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Re-allocate to the incoming [experts, rank] first: a model rebuilt from its default config
        # then loads a resized model's weights with plain load_state_dict.
        shape = state_dict.get(prefix + "lora_shape")
        if shape is not None:
            values = torch.as_tensor(shape).reshape(-1).tolist()
            if len(values) != 2 or values[0] < 0 or values[1] < 1:
                error_msgs.append(
                    f"{prefix}lora_shape must be [experts, rank] with experts >= 0 and rank >= 1, got {values}"
                )
                return
            experts, rank = int(values[0]), int(values[1])
            if (experts, rank) != (self.experts, self.rank):
                self.reset_lora_parameters(experts, rank)
        alpha_key = prefix + "lora_layer_alpha"
        incoming = state_dict.get(alpha_key)
        alpha = None
        if incoming is not None:
            alpha = alpha_value(incoming)
            if alpha is None:
                error_msgs.append(f"{alpha_key} must be one finite number > 0, got {incoming!r}")
                return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if alpha is not None:
            self.lora_alpha = alpha
        elif shape is not None:
            # a whole layer's state written before layers kept their alpha: it trained with the config's
            self.lora_alpha = self.config_lora_alpha
            if alpha_key in missing_keys:
                missing_keys.remove(alpha_key)

    # ------------------------------------------------------------------ forward
    def router_logits(self, x: torch.Tensor) -> torch.Tensor | None:
        """Router logits (..., E) for adapter-dtype input x, or None with a single expert."""
        if self.lora_router_weight is None:
            return None
        return F.linear(x, self.lora_router_weight, self.lora_router_bias)

    def _project(
        self, lora_x: torch.Tensor, lora_input: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A projections (..., E*r) and router logits (..., E), in lora_x's dtype.

        Without dropout both read the same input, so the router rows ride along in the A matmul: one
        pass over x forward and one grad-input matmul backward instead of two (x is the big operand).
        """
        dtype = lora_x.dtype
        A = self.lora_A.to(dtype)
        if self.lora_router_weight is None:
            return F.linear(lora_input, A), None
        bias = self.lora_router_bias.to(dtype)
        if lora_input is lora_x:
            fused = F.linear(lora_x, torch.cat([self.lora_A, self.lora_router_weight]).to(dtype))
            expert_hidden, logits = fused.split([self.experts * self.rank, self.experts], dim=-1)
            return expert_hidden, logits + bias
        return F.linear(lora_input, A), F.linear(lora_x, self.lora_router_weight.to(dtype), bias)

    def compute_dtype(self) -> torch.dtype:
        """dtype the adapter's matmuls run in: its parameters' dtype, except bf16 parameters on a CPU
        without native bf16 (AVX2-only), where `path="auto"` computes the adapter in float32.

        There bf16 matmuls are emulated and the adapter's thin (tokens x E*r) products cost far more
        than their flops; in float32 the adapter costs what peft's bf16 LoRA of the same total rank
        costs (benchmarks/adapter_forward.py). Gradients still reach the bf16 parameters through the
        casts. Never with a capture_hook: scoring reads the layer in its own dtype.
        """
        dtype = self.lora_A.dtype
        if (
            self.path == "auto"
            and dtype == torch.bfloat16
            and self.lora_A.device.type == "cpu"
            and self.capture_hook is None
            and not _native_bf16_cpu()
        ):
            return torch.float32
        return dtype

    def use_grouped(self) -> bool:
        """Whether forward computes only the selected experts (tokens grouped by expert).

        `path="auto"` picks it for top-k routing with k <= E/2 when the adapter computes in fp16 on CPU
        (emulated there: matmuls slow relative to indexing); everywhere else the dense path (two
        matmuls, no loop) is faster. bf16 never takes it automatically: on a CPU without native bf16
        the adapter computes in float32 instead (`compute_dtype`), and on a CPU with native bf16
        (avx512_bf16) benchmarks/adapter_forward.py measured the grouped path 1.3-2x slower than the
        dense one (d=576 and 4096, E=4/8, top-2). Never with a capture_hook, which needs every
        expert's hidden activations.
        """
        top_k = self.effective_top_k
        if self.path == "dense" or top_k is None or self.capture_hook is not None:
            return False
        if self.path == "grouped":
            return True
        emulated = self.compute_dtype() == torch.float16 or (
            self.compute_dtype() == torch.bfloat16 and not _native_bf16_cpu()
        )
        return emulated and self.lora_A.device.type == "cpu" and 2 * top_k <= self.experts

    def gated_hidden(
        self, expert_hidden: torch.Tensor, logits: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What lora_B multiplies, (..., E*r): each expert's r columns of ``expert_hidden`` times its gate
        and the scaling; and the router probabilities (None with one expert).

        Gates are computed in float32 (or wider) from the logits, then cast to the adapter dtype. The
        per-sample gradient capture calls this too, so scoring sees exactly the forward's computation.
        """
        return gate_expert_hidden(expert_hidden, logits, self.rank, self.scaling, self.top_k)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.lora_A is None:  # 0 experts: the frozen base (base-scope scoring still sees it)
            if self.capture_hook is not None:
                empty = {"lora_input": None, "expert_hidden": None, "router_logits": None}
                self.capture_hook(self, {"x": x, **empty, "output": result})
            return result
        if self.info.four_bit:
            # bitsandbytes 4-bit may return a view of an internal buffer that autograd must not see
            # modified (peft does the same defensive clone)
            result = result.clone()
        lead = x.shape[:-1]
        lora_x = x.to(self.compute_dtype())
        if self.use_grouped():
            return self._grouped_forward(result, lora_x.reshape(-1, self.in_features), lead)
        # the tensors given to capture_hook keep x's leading shape and are the ones used downstream
        lora_input = self.lora_dropout(lora_x)
        expert_hidden, logits = self._project(lora_x, lora_input)
        hidden, probs = self.gated_hidden(expert_hidden, logits)
        if probs is not None:
            self._record_router_stats(logits, probs, self.effective_top_k)
        hidden = hidden.reshape(-1, self.experts * self.rank)
        flat_result = result.reshape(-1, self.out_features)
        if flat_result.dtype == hidden.dtype:
            # the add rides in the GEMM (beta=1): no separate pass over the (N, d_out) output
            output = torch.addmm(flat_result, hidden, self.lora_B.t()).view(*lead, self.out_features)
        else:
            output = result + F.linear(hidden, self.lora_B.to(hidden.dtype)).to(result.dtype).view(
                result.shape
            )
        if self.capture_hook is not None:
            self.capture_hook(
                self,
                {
                    "x": x,
                    "lora_input": lora_input,
                    "expert_hidden": expert_hidden,
                    "router_logits": logits,
                    "output": output,
                },
            )
        return output

    def _grouped_forward(self, result: torch.Tensor, lora_x: torch.Tensor, lead: torch.Size) -> torch.Tensor:
        logits = F.linear(lora_x, self.lora_router_weight, self.lora_router_bias)
        output, probs = grouped_lora_output(
            result.reshape(-1, self.out_features),
            self.lora_dropout(lora_x),
            self.lora_A,
            self.lora_B,
            logits,
            self.experts,
            self.rank,
            self.effective_top_k,
            self.scaling,
        )
        self._record_router_stats(logits, probs, self.effective_top_k)
        return output.view(*lead, self.out_features)

    # ------------------------------------------------------------------ router statistics
    def _record_router_stats(self, logits: torch.Tensor, probs: torch.Tensor, top_k: int | None) -> None:
        if not (self.training and torch.is_grad_enabled()):
            return
        aux, z_loss, load = router_statistics(logits, probs, top_k)
        self._router_stats = {
            "aux_loss": self.router_aux_loss_coef * aux,
            "z_loss": self.router_z_loss_coef * z_loss,
            "load": load.detach(),
        }
        with torch.no_grad():
            mean_probs = probs.detach().reshape(-1, self.experts).mean(dim=0)
            decay = self.routing_mass_decay
            self.lora_routing_mass.mul_(decay).add_(mean_probs.float(), alpha=1.0 - decay)

    def pop_router_stats(self) -> dict[str, torch.Tensor] | None:
        """Weighted aux loss, weighted z-loss and load of the last training forward; cleared on read."""
        stats, self._router_stats = self._router_stats, None
        return stats

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, experts={self.experts}, "
            f"rank={self.rank}, top_k={self.top_k}, lora_alpha={self.lora_alpha}"
        )
