"""Hypothesis strategies that draw small, valid models with example inputs.

A draw is an architecture spec (plain data, so hypothesis shrinks it block by block) that is
then built into an ``nn.Module`` from generated source. Shapes are tracked while drawing, so
every block fits its input; sizes stay small so a model runs in milliseconds.

    @given(fxopt.testing.convnets())
    def test_my_pass(drawn):
        model, example_inputs = drawn
        fxopt.testing.check_pass("my_pass", model, example_inputs)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from fxopt.testing.codegen import ACTIVATIONS
from fxopt.testing.reproducer import build_model
from fxopt.testing.spec import BlockSpec, ModelSpec

__all__ = [
    "FEATURES", "attention_blocks", "attention_specs", "convnet_specs", "convnets",
    "model_specs", "models", "mlp_specs", "mlps",
]

State = tuple[int, ...]
Drawer = Callable[..., Any]  # (draw, *state) -> (BlockSpec, new state), wrapped by st.composite

ACTS = tuple(ACTIVATIONS)
_CHANNELS = st.integers(1, 12)
_MAX_SPATIAL = 16


def _block(kind: str, state: State, **args: Any) -> tuple[BlockSpec, State]:
    return BlockSpec.of(kind, **args), state


# --- convnet blocks: state (C, H, W) -----------------------------------------------------------


@st.composite
def _conv(draw: Any, c: int, h: int, w: int) -> tuple[BlockSpec, State]:
    variant = draw(st.sampled_from(["dense", "pointwise", "grouped", "depthwise"]))
    divisors = [g for g in (2, 3, 4) if c % g == 0]
    if variant == "grouped" and not divisors:
        variant = "dense"
    k, groups, c_out = 3, 1, c
    if variant in ("dense", "pointwise"):
        k, c_out = (3 if variant == "dense" else 1), draw(_CHANNELS)
    elif variant == "grouped":
        groups = draw(st.sampled_from(divisors))
        c_out = groups * draw(st.integers(1, 4))
    else:
        groups = c
    stride = draw(st.sampled_from([1, 2])) if min(h, w) >= 6 else 1
    oh, ow = (h - 1) // stride + 1, (w - 1) // stride + 1  # padding k // 2 keeps odd kernels centred
    return _block(
        "conv", (c_out, oh, ow), variant=variant, c_in=c, c_out=c_out, k=k, stride=stride,
        groups=groups, bias=draw(st.booleans()), bn=draw(st.booleans()), act=draw(st.sampled_from(ACTS)),
    )


@st.composite
def _residual(draw: Any, c: int, h: int, w: int) -> tuple[BlockSpec, State]:
    return _block(
        "residual", (c, h, w), layer="conv", c=c, groups=draw(st.sampled_from([1, c])),
        bn=draw(st.booleans()), act=draw(st.sampled_from(ACTS)),
        add=draw(st.sampled_from(["add", "add_", "torch.add"])), hidden=c,
    )


@st.composite
def _concat(draw: Any, c: int, h: int, w: int) -> tuple[BlockSpec, State]:
    c1, c2 = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    return _block("concat", (c1 + c2, h, w), c_in=c, c1=c1, c2=c2)


@st.composite
def _split(draw: Any, *state: int) -> tuple[BlockSpec, State]:
    conv = len(state) == 3
    c = state[0] if conv else state[-1]
    variants = ["split", "slice"] + (["chunk"] if c % 2 == 0 else [])
    variant = draw(st.sampled_from(variants))
    c1 = c // 2 if variant == "chunk" else draw(st.integers(1, c - 1))
    return _block(
        "split", state, variant=variant, layer="conv" if conv else "linear", c=c, c1=c1, dim=1 if conv else -1
    )


@st.composite
def _pool(draw: Any, c: int, h: int, w: int) -> tuple[BlockSpec, State]:
    variants = ["max", "avg", "F.max_pool2d", "F.avg_pool2d"] + (["adaptive_avg", "adaptive_max"] if h % 2 == 0 and w % 2 == 0 else [])
    variant = draw(st.sampled_from(variants))
    return _block("pool", (c, h // 2, w // 2), variant=variant, oh=h // 2, ow=w // 2)


@st.composite
def _upsample(draw: Any, c: int, h: int, w: int) -> tuple[BlockSpec, State]:
    variant = draw(st.sampled_from(["module", "bilinear", "size", "transposed"]))
    return _block("upsample", (c, 2 * h, 2 * w), variant=variant, c=c, oh=2 * h, ow=2 * w)


@st.composite
def _shared(draw: Any, *state: int) -> tuple[BlockSpec, State]:
    conv = len(state) == 3
    c = state[0] if conv else state[-1]
    variant = draw(st.sampled_from(["twice", "alias"]))
    return _block("shared", state, variant=variant, layer="conv" if conv else "linear", c=c)


def _gate(*state: int) -> st.SearchStrategy[tuple[BlockSpec, State]]:
    conv = len(state) == 3
    return st.just(_block("gate", state, layer="conv" if conv else "linear", c=state[0] if conv else state[-1]))


@st.composite
def _noop(draw: Any, *state: int) -> tuple[BlockSpec, State]:
    variant = draw(st.sampled_from(["dropout", "identity", "F.dropout", "mul_one", "add_zero", "contiguous"]))
    return _block("noop", state, variant=variant)


@st.composite
def _attention2d(draw: Any, c: int, h: int, w: int) -> tuple[BlockSpec, State]:
    heads = draw(st.sampled_from([1, 2] if c % 2 == 0 else [1]))
    return _block("attention2d", (c, h, w), c=c, heads=heads)


# --- token / feature blocks: state (F,) for MLPs, (L, D) for attention ------------------------


@st.composite
def _linear(draw: Any, *state: int) -> tuple[BlockSpec, State]:
    f_out = draw(st.integers(1, 16))
    bn = len(state) == 1 and draw(st.booleans())  # BatchNorm1d on (N, F) only
    return _block(
        "linear", (*state[:-1], f_out), f_in=state[-1], f_out=f_out, bias=draw(st.booleans()), bn=bn,
        act=draw(st.sampled_from(ACTS)),
    )


@st.composite
def _residual_mlp(draw: Any, *state: int) -> tuple[BlockSpec, State]:
    return _block(
        "residual", state, layer="linear", c=state[-1], hidden=draw(st.integers(1, 16)), groups=1, bn=False,
        act=draw(st.sampled_from(ACTS)), add=draw(st.sampled_from(["add", "add_", "torch.add"])),
    )


def _layernorm(*state: int) -> st.SearchStrategy[tuple[BlockSpec, State]]:
    return st.just(_block("layernorm", state, d=state[-1]))


@st.composite
def _self_attention(draw: Any, l: int, d: int) -> tuple[BlockSpec, State]:  # noqa: E741
    heads = draw(st.sampled_from([h for h in (1, 2, 4) if d % h == 0]))
    variant = draw(st.sampled_from(["separate", "fused"]))
    return _block("self_attention", (l, d), variant=variant, d=d, heads=heads, prenorm=draw(st.booleans()))


@st.composite
def _mha(draw: Any, l: int, d: int) -> tuple[BlockSpec, State]:  # noqa: E741
    heads = draw(st.sampled_from([h for h in (1, 2, 4) if d % h == 0]))
    return _block("mha", (l, d), variant=draw(st.sampled_from(["index", "unpack"])), d=d, heads=heads)


@st.composite
def _ffn(draw: Any, l: int, d: int) -> tuple[BlockSpec, State]:  # noqa: E741
    return _block("ffn", (l, d), d=d, hidden=draw(st.integers(2, 32)), act=draw(st.sampled_from(["gelu", "relu", "silu"])))


# kind -> (applies to state?, drawer); the first entries are the simplest, which shrinking prefers
CONV_BLOCKS: dict[str, tuple[Callable[[State], bool], Drawer]] = {
    "conv": (lambda s: True, _conv),
    "residual": (lambda s: True, _residual),
    "concat": (lambda s: s[0] <= 16, _concat),
    "split": (lambda s: s[0] >= 2, _split),
    "pool": (lambda s: min(s[1:]) >= 4, _pool),
    "upsample": (lambda s: max(s[1:]) * 2 <= _MAX_SPATIAL, _upsample),
    "shared": (lambda s: True, _shared),
    "gate": (lambda s: True, _gate),
    "noop": (lambda s: True, _noop),
    "attention2d": (lambda s: s[1] * s[2] <= 64, _attention2d),
}
MLP_BLOCKS: dict[str, tuple[Callable[[State], bool], Drawer]] = {
    "linear": (lambda s: True, _linear),
    "residual": (lambda s: True, _residual_mlp),
    "split": (lambda s: s[-1] >= 2, _split),
    "layernorm": (lambda s: True, _layernorm),
    "shared": (lambda s: True, _shared),
    "gate": (lambda s: True, _gate),
    "noop": (lambda s: True, _noop),
}
ATTENTION_BLOCKS: dict[str, tuple[Callable[[State], bool], Drawer]] = {
    "self_attention": (lambda s: True, _self_attention),
    "ffn": (lambda s: True, _ffn),
    "mha": (lambda s: True, _mha),
    "layernorm": (lambda s: True, _layernorm),
    "linear": (lambda s: True, _linear),
    "residual": (lambda s: True, _residual_mlp),
    "split": (lambda s: s[-1] >= 2, _split),
    "shared": (lambda s: True, _shared),
    "gate": (lambda s: True, _gate),
    "noop": (lambda s: True, _noop),
}


def _body(draw: Any, table: dict[str, tuple[Callable[[State], bool], Drawer]], state: State, max_blocks: int) -> tuple[list[BlockSpec], State]:
    blocks = []
    for _ in range(draw(st.integers(min(1, max_blocks), max_blocks))):
        kind = draw(st.sampled_from([k for k, (applies, _) in table.items() if applies(state)]))
        block, state = draw(table[kind][1](*state))
        blocks.append(block)
    return blocks, state


@st.composite
def _second_input(draw: Any, state: State, layer: str) -> tuple[list[BlockSpec], tuple[int, ...], State]:
    """Maybe a second input ``y``, projected and added or concatenated to the stem output."""
    if not draw(st.booleans()):
        return [], (), state
    c_y = draw(st.integers(1, 6))
    variant = draw(st.sampled_from(["add", "cat"]))
    width = state[0] if layer == "conv" else state[-1]
    shape = (c_y, *state[1:]) if layer == "conv" else (*state[:-1], c_y)
    merged = width * (2 if variant == "cat" else 1)
    new_state = (merged, *state[1:]) if layer == "conv" else (*state[:-1], merged)
    return [BlockSpec.of("merge", variant=variant, layer=layer, c_y=c_y, c=width)], shape, new_state


@st.composite
def _head(draw: Any, family: str, state: State) -> BlockSpec:
    variant = draw(st.sampled_from(["features", "linear", "tuple", "dict"]))
    if variant == "features":
        return BlockSpec.of("head", variant=variant)
    classes = draw(st.integers(1, 6))
    if family == "convnet":
        c, h, w = state
        pools = ["adaptive_avg", "adaptive_max", "mean"] + (["none"] if c * h * w <= 256 else [])
        pool = draw(st.sampled_from(pools))
        flatten = "none" if pool == "mean" else draw(st.sampled_from(["torch.flatten", "method", "view", "module"]))
        f_in = c * h * w if pool == "none" else c
    elif family == "attention":
        pool, flatten, f_in = draw(st.sampled_from(["tokens_mean", "first_token"])), "none", state[-1]
    else:
        pool, flatten, f_in = "none", "none", state[-1]
    return BlockSpec.of("head", variant=variant, pool=pool, flatten=flatten, f_in=f_in, classes=classes)


def _finish(draw: Any, family: str, inputs: list[tuple[int, ...]], blocks: list[BlockSpec], state: State) -> ModelSpec:
    head = draw(_head(family, state))
    batch = draw(st.integers(1, 2))
    return ModelSpec(family, batch, tuple(inputs), tuple(blocks), head, seed=draw(st.integers(0, 2**16)))


def _convnet_stem(draw: Any) -> tuple[tuple[int, ...], BlockSpec, State]:
    c_in, h, w = draw(st.integers(1, 4)), draw(st.integers(4, 12)), draw(st.integers(4, 12))
    stem, state = draw(_conv(c_in, h, w))
    return (c_in, h, w), stem, state


def _mlp_stem(draw: Any) -> tuple[tuple[int, ...], BlockSpec, State]:
    f = draw(st.integers(1, 16))
    stem, state = draw(_linear(f))
    return (f,), stem, state


def _attention_stem(draw: Any) -> tuple[tuple[int, ...], BlockSpec, State]:
    length, d_in, d = draw(st.integers(2, 8)), draw(st.integers(1, 8)), draw(st.sampled_from([4, 8, 12, 16]))
    return (length, d_in), BlockSpec.of("linear", f_in=d_in, f_out=d, bias=True, bn=False, act="none"), (length, d)


@dataclass(frozen=True)
class Family:
    """How a family of drawn models starts and grows: (first input shape, stem, state), merge layer, blocks."""

    stem: Callable[[Any], tuple[tuple[int, ...], BlockSpec, State]]
    layer: str  # the layer kind a second input is projected with
    blocks: dict[str, tuple[Callable[[State], bool], Drawer]]


# family -> its stem, second-input layer and block table; one driver (`_specs`) draws them all
FAMILIES: dict[str, Family] = {
    "convnet": Family(_convnet_stem, "conv", CONV_BLOCKS),
    "mlp": Family(_mlp_stem, "linear", MLP_BLOCKS),
    "attention": Family(_attention_stem, "linear", ATTENTION_BLOCKS),
}


@st.composite
def _specs(draw: Any, family: str, max_blocks: int, multi_input: bool) -> ModelSpec:
    kind = FAMILIES[family]
    first_input, stem, state = kind.stem(draw)
    inputs, blocks = [first_input], [stem]
    if multi_input:
        merge, shape, state = draw(_second_input(state, kind.layer))
        blocks += merge
        inputs += [shape] if shape else []
    body, state = _body(draw, kind.blocks, state, max_blocks)
    return _finish(draw, family, inputs, blocks + body, state)


def convnet_specs(*, max_blocks: int = 4, multi_input: bool = True) -> st.SearchStrategy[ModelSpec]:
    """Specs of small convnets: a conv stem, then up to `max_blocks` blocks, then a head."""
    return _specs("convnet", max_blocks, multi_input)


def mlp_specs(*, max_blocks: int = 4, multi_input: bool = True) -> st.SearchStrategy[ModelSpec]:
    """Specs of small MLPs on ``(N, F)`` inputs."""
    return _specs("mlp", max_blocks, multi_input)


def attention_specs(*, max_blocks: int = 3, multi_input: bool = True) -> st.SearchStrategy[ModelSpec]:
    """Specs of small transformer-style models on ``(N, L, D)`` token inputs."""
    return _specs("attention", max_blocks, multi_input)


@st.composite
def _built(draw: Any, specs: st.SearchStrategy[ModelSpec]) -> tuple[Any, tuple[Any, ...]]:
    # not specs.map(build_model): hypothesis would print the call, not the model's source
    return build_model(draw(specs))


def model_specs(**kwargs: Any) -> st.SearchStrategy[ModelSpec]:
    """Specs of any family (convnets, MLPs, attention blocks)."""
    return st.one_of(convnet_specs(**kwargs), mlp_specs(**kwargs), attention_specs(**kwargs))


def convnets(**kwargs: Any) -> st.SearchStrategy[tuple[Any, tuple[Any, ...]]]:
    """``(module, example_inputs)`` of small convnets (see `convnet_specs` for options)."""
    return _built(convnet_specs(**kwargs))


def mlps(**kwargs: Any) -> st.SearchStrategy[tuple[Any, tuple[Any, ...]]]:
    """``(module, example_inputs)`` of small MLPs."""
    return _built(mlp_specs(**kwargs))


def attention_blocks(**kwargs: Any) -> st.SearchStrategy[tuple[Any, tuple[Any, ...]]]:
    """``(module, example_inputs)`` of small attention models (manual attention and nn.MultiheadAttention)."""
    return _built(attention_specs(**kwargs))


def models(**kwargs: Any) -> st.SearchStrategy[tuple[Any, tuple[Any, ...]]]:
    """``(module, example_inputs)`` of any family: the default strategy for pass tests.

    Example:
        >>> from hypothesis import given, settings
        >>> @settings(max_examples=3, database=None)
        ... @given(models())
        ... def runs(drawn):
        ...     model, inputs = drawn
        ...     model(*inputs)
        >>> runs()
    """
    return _built(model_specs(**kwargs))


def _has(kind: str, **match: Any) -> Callable[[ModelSpec], bool]:
    def check(spec: ModelSpec) -> bool:
        return any(
            b.kind == kind and all(b.params.get(k) in (v if isinstance(v, tuple) else (v,)) for k, v in match.items())
            for b in (*spec.blocks, spec.head)
        )

    return check


# Topology features the strategies cover, as predicates on a spec (used by coverage tests).
FEATURES: dict[str, Callable[[ModelSpec], bool]] = {
    "residual add": _has("residual"),
    "in-place add": _has("residual", add="add_"),
    "in-place activation": lambda s: _has("conv", act=("relu_inplace", "relu_"))(s) or _has("residual", act=("relu_inplace", "relu_"))(s),
    "concat": _has("concat"),
    "split": _has("split", variant="split"),
    "chunk": _has("split", variant="chunk"),
    "depthwise conv": lambda s: _has("conv", variant="depthwise")(s) and any(b.params.get("c_in", 1) > 1 for b in s.blocks if b.params.get("variant") == "depthwise"),
    "grouped conv": _has("conv", variant="grouped"),
    "batchnorm": lambda s: _has("conv", bn=True)(s) or _has("linear", bn=True)(s),
    "max pool": _has("pool", variant=("max", "F.max_pool2d")),
    "avg pool": _has("pool", variant=("avg", "F.avg_pool2d")),
    "adaptive pool": lambda s: _has("pool", variant=("adaptive_avg", "adaptive_max"))(s),
    "upsample": _has("upsample", variant=("module", "bilinear", "size")),
    "transposed conv": _has("upsample", variant="transposed"),
    "flatten -> linear": _has("head", flatten=("torch.flatten", "method", "view", "module")),
    "two inputs": lambda s: len(s.inputs) == 2,
    "tuple output": _has("head", variant="tuple"),
    "dict output": _has("head", variant="dict"),
    "shared module": _has("shared"),
    "attention (reshape/permute/matmul)": lambda s: _has("attention2d")(s) or _has("self_attention")(s),
    "nn.MultiheadAttention": _has("mha"),
    "data-dependent control flow": _has("gate"),
    "dropout / identity": _has("noop"),
    "layernorm": lambda s: _has("layernorm")(s) or _has("ffn")(s),
}
