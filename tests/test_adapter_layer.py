"""MoELoRALinear: forward vs the naive per-token/per-expert loop, gradients vs finite differences,
router losses vs their definitions, base layer types, state_dict reallocation, capture hook."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

from layermoe.adapters import MoELoRALinear, collect_router_losses

from .test_adapter_helpers import layer_reference, randomize  # noqa: F401


def make_layer(d_in=12, d_out=10, experts=4, rank=3, top_k=None, seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out).to(dtype)
    layer = MoELoRALinear(base, experts=experts, rank=rank, top_k=top_k, lora_alpha=6.0, **kw)
    randomize(layer, seed)
    return layer


@pytest.mark.parametrize("path", ["dense", "grouped"])
@pytest.mark.parametrize("top_k", [None, 1, 2, 4])
def test_forward_matches_naive_loop(top_k, path):
    layer = make_layer(top_k=top_k).eval()
    layer.path = path
    x = torch.randn(3, 5, 12)
    with torch.no_grad():
        got = layer(x) - layer.base_layer(x)
    expected = layer_reference(layer, x)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    experts=st.integers(1, 6),
    rank=st.integers(1, 5),
    k=st.integers(1, 6),
    tokens=st.integers(1, 7),
    seed=st.integers(0, 1000),
)
def test_forward_matches_naive_loop_random_shapes(experts, rank, k, tokens, seed):
    layer = make_layer(d_in=7, d_out=5, experts=experts, rank=rank, top_k=k, seed=seed).eval()
    layer.path = "grouped" if seed % 2 else "dense"
    x = torch.randn(tokens, 7, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        got = layer(x) - layer.base_layer(x)
    torch.testing.assert_close(got.double(), layer_reference(layer, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("top_k, path", [(None, "dense"), (2, "dense"), (1, "grouped")])
def test_gradients_match_finite_differences(top_k, path):
    layer = make_layer(d_in=5, d_out=4, experts=3, rank=2, top_k=top_k, dtype=torch.float64).eval()
    layer.path = path
    params = [layer.lora_A, layer.lora_B, layer.lora_router_weight, layer.lora_router_bias]
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)

    # parameters enter as explicit inputs so gradcheck perturbs them too
    def functional(x, A, B, W, b):
        return torch.func.functional_call(
            layer, {"lora_A": A, "lora_B": B, "lora_router_weight": W, "lora_router_bias": b}, (x,)
        )

    inputs = (x, *[p.detach().clone().requires_grad_(True) for p in params])
    assert torch.autograd.gradcheck(functional, inputs, eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.fixture
def native_bf16(monkeypatch):
    """Pretend the CPU has (True) or lacks (False) native bf16, whatever this machine has."""

    def set_native(value: bool) -> None:
        monkeypatch.setattr("layermoe.adapters.layer._native_bf16_cpu", lambda: value)

    return set_native


def test_auto_path_choice(native_bf16):
    native_bf16(True)
    layer = make_layer(experts=8, top_k=2)
    assert not layer.use_grouped() and layer.compute_dtype() == torch.float32  # fp32: dense
    low = make_layer(experts=8, top_k=2, dtype=torch.bfloat16)
    # native bf16: computed in bf16, densely (the grouped path measured slower there)
    assert not low.use_grouped() and low.compute_dtype() == torch.bfloat16
    low.path = "grouped"
    assert low.use_grouped()  # an explicit path is kept
    low.capture_hook = lambda module, tensors: None
    assert not low.use_grouped()  # scoring needs every expert's hidden activations
    low.path = "auto"
    assert not make_layer(experts=4, top_k=None, dtype=torch.bfloat16).use_grouped()
    # emulated bf16: the adapter computes in float32, densely; never under a capture hook or an explicit path
    native_bf16(False)
    low.capture_hook = None
    assert low.compute_dtype() == torch.float32 and not low.use_grouped()
    low.capture_hook = lambda module, tensors: None
    assert low.compute_dtype() == torch.bfloat16
    low.capture_hook, low.path = None, "dense"
    assert low.compute_dtype() == torch.bfloat16
    assert make_layer(experts=8, top_k=2, dtype=torch.float16).use_grouped()  # fp16 unchanged


@pytest.mark.parametrize("top_k", [None, 2])
def test_float32_compute_of_bf16_layer_matches_float32_reference(native_bf16, top_k):
    """On a CPU without native bf16 the bf16 layer computes its adapter in float32: output and parameter
    gradients equal a float32 copy of the same (bf16-valued) parameters, up to the final bf16 roundings."""
    native_bf16(False)
    layer = make_layer(experts=4, rank=3, top_k=top_k, dtype=torch.bfloat16).eval()
    reference = copy.deepcopy(layer).float()
    reference.path = "dense"
    x = torch.randn(5, 12).to(torch.bfloat16)
    weights = torch.randn(5, 10)
    (layer(x).float() * weights).sum().backward()
    (reference(x.float()) * weights).sum().backward()
    delta = layer(x).double() - layer.base_layer(x).double()
    torch.testing.assert_close(delta, layer_reference(reference, x.float()).double(), atol=2e-2, rtol=1e-2)
    for name, param in layer.named_parameters():
        if param.requires_grad:
            assert param.grad.dtype == torch.bfloat16
            expected = dict(reference.named_parameters())[name].grad
            torch.testing.assert_close(param.grad.float(), expected, atol=1e-2, rtol=1e-2)


def test_grouped_bf16_close_to_dense_float64(native_bf16):
    native_bf16(True)
    layer = make_layer(experts=6, rank=4, top_k=2, dtype=torch.bfloat16).eval()
    layer.path = "grouped"
    assert layer.use_grouped()
    x = torch.randn(6, 12).to(torch.bfloat16)
    with torch.no_grad():
        got = (layer(x) - layer.base_layer(x)).double()
    torch.testing.assert_close(got, layer_reference(layer, x), atol=3e-2, rtol=3e-2)


def test_single_expert_has_no_router_and_is_plain_lora():
    layer = make_layer(experts=1, rank=4).eval()
    names = {n for n, _ in layer.named_parameters()}
    assert "lora_router_weight" not in names and "lora_router_bias" not in names
    x = torch.randn(6, 12)
    with torch.no_grad():
        delta = layer(x) - layer.base_layer(x)
    expected = (6.0 / 4) * x @ layer.lora_A.detach().T @ layer.lora_B.detach().T
    torch.testing.assert_close(delta, expected, atol=1e-6, rtol=1e-5)


def test_init_is_identity_and_lora_like():
    torch.manual_seed(0)
    base = nn.Linear(64, 32)
    layer = MoELoRALinear(base, experts=4, rank=8)
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), base(x))
    assert torch.count_nonzero(layer.lora_B) == 0
    assert (
        torch.count_nonzero(layer.lora_router_weight) == 0
        and torch.count_nonzero(layer.lora_router_bias) == 0
    )
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) bound for fan_in 64
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.5 * bound
    assert not any(p.requires_grad for p in base.parameters())
    assert layer.lora_shape.dtype == torch.int64 and layer.lora_shape.tolist() == [4, 8]


def test_router_losses_match_definitions():
    layer = make_layer(experts=4, rank=2, top_k=2, router_aux_loss_coef=0.3, router_z_loss_coef=0.05).train()
    model = nn.Sequential(layer)
    x = torch.randn(2, 9, 12)
    layer(x)
    losses = collect_router_losses(model)
    assert losses.loss.requires_grad
    losses = losses._replace(
        loss=losses.loss.detach(), aux_loss=losses.aux_loss.detach(), z_loss=losses.z_loss.detach()
    )
    logits = (x.reshape(-1, 12) @ layer.lora_router_weight.T + layer.lora_router_bias).detach().double()
    probs = torch.softmax(logits, -1)
    top2 = probs.topk(2, dim=-1).indices
    f = torch.stack([(top2 == e).any(-1).double().sum() for e in range(4)]) / (top2.numel())
    aux = 4 * (f * probs.mean(0)).sum()
    z = (torch.logsumexp(logits, -1) ** 2).mean()
    assert math.isclose(float(losses.aux_loss), 0.3 * float(aux), rel_tol=1e-5)
    assert math.isclose(float(losses.z_loss), 0.05 * float(z), rel_tol=1e-5)
    assert math.isclose(float(losses.loss), 0.3 * float(aux) + 0.05 * float(z), rel_tol=1e-5)
    torch.testing.assert_close(losses.load["0"].double(), f)
    # popped: a second collect without a forward returns zero
    assert float(collect_router_losses(model).loss) == 0.0


def test_no_router_stats_in_eval_or_no_grad():
    layer = make_layer(router_aux_loss_coef=1.0)
    model = nn.Sequential(layer)
    layer.eval()
    layer(torch.randn(3, 12))
    layer.train()
    with torch.no_grad():
        layer(torch.randn(3, 12))
    assert float(collect_router_losses(model).loss) == 0.0


def test_routing_mass_tracks_mean_gate_probability():
    layer = make_layer(experts=3, routing_mass_decay=0.5).train()
    x = torch.randn(20, 12)
    layer(x)
    probs = torch.softmax(x @ layer.lora_router_weight.detach().T + layer.lora_router_bias.detach(), -1).mean(
        0
    )
    torch.testing.assert_close(layer.lora_routing_mass, 0.5 * torch.full((3,), 1 / 3) + 0.5 * probs)


def test_conv1d_base_matches_linear_reference():
    torch.manual_seed(0)
    base = Conv1D(10, 12)  # nf=d_out=10, nx=d_in=12, weight (d_in, d_out)
    layer = MoELoRALinear(base, experts=3, rank=2, top_k=2, lora_alpha=6.0).eval()
    randomize(layer)
    assert layer.in_features == 12 and layer.out_features == 10
    x = torch.randn(4, 12)
    with torch.no_grad():
        got = layer(x) - (x @ base.weight + base.bias)
    torch.testing.assert_close(got.double(), layer_reference(layer, x), atol=1e-5, rtol=1e-5)


def test_state_dict_reallocates_fresh_layer():
    source = make_layer(experts=5, rank=3)
    with torch.no_grad():
        source.lora_routing_mass.copy_(torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15]))
    state = source.state_dict()
    fresh = MoELoRALinear(nn.Linear(12, 10), experts=2, rank=8, lora_alpha=6.0)
    result = fresh.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    assert (fresh.experts, fresh.rank) == (5, 3)
    x = torch.randn(4, 12)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), source(x))
    torch.testing.assert_close(fresh.lora_routing_mass, source.lora_routing_mass)
    # and down to a single expert: the router disappears
    single = make_layer(experts=1, rank=2)
    fresh.load_state_dict(single.state_dict())
    assert fresh.lora_router_weight is None and fresh.lora_A.shape == (2, 12)
    # a layer cast after construction re-allocates in its current dtype
    fresh.double()
    fresh.load_state_dict(state)
    assert fresh.lora_A.dtype == torch.float64 and fresh.lora_router_weight.dtype == torch.float64


def test_capture_hook_sees_live_tensors():
    layer = make_layer(experts=3, rank=2).train()
    seen = {}

    def hook(module, tensors):
        seen.update(tensors)
        tensors["expert_hidden"].retain_grad()

    layer.capture_hook = hook
    x = torch.randn(4, 12)
    out = layer(x)
    assert seen["output"] is out and seen["x"] is x
    assert seen["expert_hidden"].shape == (4, 3 * 2) and seen["router_logits"].shape == (4, 3)
    torch.testing.assert_close(seen["expert_hidden"], x @ layer.lora_A.T)
    out.sum().backward()
    # dL/dA = (dL/d expert_hidden)^T x: per-sample gradients can be rebuilt from the captured tensors
    torch.testing.assert_close(layer.lora_A.grad, seen["expert_hidden"].grad.T @ x, atol=1e-5, rtol=1e-5)


def test_bad_layer_arguments_raise():
    with pytest.raises(ValueError, match="experts"):
        MoELoRALinear(nn.Linear(4, 4), experts=-1)
    with pytest.raises(ValueError, match="top_k"):
        MoELoRALinear(nn.Linear(4, 4), experts=2, top_k=0)
    with pytest.raises(TypeError, match="cannot wrap"):
        MoELoRALinear(nn.Conv2d(3, 3, 1))


def _bnb():
    return pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")


def test_4bit_base_trains_on_cpu():
    bnb = _bnb()
    torch.manual_seed(0)
    dense = nn.Linear(32, 16)
    base = bnb.nn.Linear4bit(32, 16, compute_dtype=torch.float32, quant_type="nf4")
    base.load_state_dict(dense.state_dict())
    base = base.to("cpu")
    layer = MoELoRALinear(base, experts=2, rank=4, top_k=None)
    assert layer.lora_A.dtype == torch.float32
    x = torch.randn(64, 32)
    target = dense(x).detach() + 0.5 * torch.tanh(x[:, :16])
    params = [p for p in layer.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(p) for n, p in layer.named_parameters() if n.startswith("lora_")}
    optimizer = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = (layer(x) - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0]


def test_8bit_base_forward_matches_reference():
    bnb = _bnb()
    torch.manual_seed(0)
    dense = nn.Linear(32, 16)
    base = bnb.nn.Linear8bitLt(32, 16, has_fp16_weights=False)
    base.load_state_dict(dense.state_dict())
    base = base.to("cpu")
    layer = MoELoRALinear(base, experts=3, rank=2, top_k=2, lora_alpha=4.0).eval()
    randomize(layer)
    x = torch.randn(5, 32)
    with torch.no_grad():
        got = layer(x) - base(x)
    torch.testing.assert_close(got.double(), layer_reference(layer, x), atol=1e-5, rtol=1e-5)
    out = layer(x).sum()
    out.backward()
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0
