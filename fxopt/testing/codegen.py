"""Python source for a `ModelSpec`: one renderer per block kind, assembled into a module file.

Each renderer turns a block's arguments into ``__init__`` lines and ``forward`` lines that read
and write the running tensor ``x``; the model is built by executing that source, so the code a
failing test prints is exactly the code that ran.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fxopt.testing.spec import BlockSpec, ModelSpec

__all__ = ["Code", "RENDERERS", "render_source"]


@dataclass
class Code:
    """Lines one block contributes to ``__init__`` and ``forward``, and helper classes it needs."""

    init: list[str] = field(default_factory=list)
    forward: list[str] = field(default_factory=list)
    helpers: set[str] = field(default_factory=set)


# name -> (module constructor or None, forward line with {m}: attribute, {v}: variable)
ACTIVATIONS: dict[str, tuple[str | None, str]] = {
    "none": (None, ""),
    "relu": ("nn.ReLU()", "{v} = self.{m}({v})"),
    "relu_inplace": ("nn.ReLU(inplace=True)", "{v} = self.{m}({v})"),
    "relu6": ("nn.ReLU6()", "{v} = self.{m}({v})"),
    "silu": ("nn.SiLU()", "{v} = self.{m}({v})"),
    "hardswish": ("nn.Hardswish()", "{v} = self.{m}({v})"),
    "gelu": ("nn.GELU()", "{v} = self.{m}({v})"),
    "leaky_relu": ("nn.LeakyReLU(0.1)", "{v} = self.{m}({v})"),
    "F.relu": (None, "{v} = F.relu({v})"),
    "relu_": (None, "{v} = {v}.relu_()"),  # in-place method on a fresh tensor
    "sigmoid": (None, "{v} = torch.sigmoid({v})"),
}

HELPERS: dict[str, str] = {
    "DataGate": '''class DataGate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so fxopt keeps it as a leaf."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if x.mean() > 0.1:  # not 0: normalised or ReLU outputs sit right at 0, where rounding decides
            return self.inner(x)
        return x * 0.5
''',
}


def _act(code: Code, attr: str, name: str, var: str = "x") -> None:
    ctor, line = ACTIVATIONS[name]
    if ctor is not None:
        code.init.append(f"self.{attr} = {ctor}")
    if line:
        code.forward.append(line.format(m=attr, v=var))


def _layer(kind: str, c_in: int, c_out: int, k: int = 1) -> str:
    if kind == "conv":
        return f"nn.Conv2d({c_in}, {c_out}, {k}, padding={k // 2})"
    return f"nn.Linear({c_in}, {c_out})"


def _conv(p: str, a: Mapping[str, Any]) -> Code:
    code = Code([
        f"self.{p}_conv = nn.Conv2d({a['c_in']}, {a['c_out']}, {a['k']}, stride={a['stride']}, "
        f"padding={a['k'] // 2}, groups={a['groups']}, bias={a['bias']})"
    ], [f"x = self.{p}_conv(x)"])
    if a["bn"]:
        code.init.append(f"self.{p}_bn = nn.BatchNorm2d({a['c_out']})")
        code.forward.append(f"x = self.{p}_bn(x)")
    _act(code, f"{p}_act", a["act"])
    return code


def _linear(p: str, a: Mapping[str, Any]) -> Code:
    code = Code([f"self.{p}_fc = nn.Linear({a['f_in']}, {a['f_out']}, bias={a['bias']})"], [f"x = self.{p}_fc(x)"])
    if a["bn"]:
        code.init.append(f"self.{p}_bn = nn.BatchNorm1d({a['f_out']})")
        code.forward.append(f"x = self.{p}_bn(x)")
    _act(code, f"{p}_act", a["act"])
    return code


_RESIDUAL_ADD = {
    "add": ["x = x + y"],
    "torch.add": ["x = torch.add(x, y)"],
    "add_": ["y.add_(x)  # in-place add into a fresh tensor", "x = y"],
}


def _residual(p: str, a: Mapping[str, Any]) -> Code:
    c = a["c"]
    if a["layer"] == "conv":
        code = Code([f"self.{p}_conv1 = nn.Conv2d({c}, {c}, 3, padding=1, groups={a['groups']}, bias={not a['bn']})"])
        second = f"nn.Conv2d({c}, {c}, 1)"
    else:
        code = Code([f"self.{p}_fc1 = nn.Linear({c}, {a['hidden']})"])
        second = f"nn.Linear({a['hidden']}, {c})"
    first = "conv1" if a["layer"] == "conv" else "fc1"
    code.forward.append(f"y = self.{p}_{first}(x)")
    if a["bn"]:
        code.init.append(f"self.{p}_bn = nn.BatchNorm2d({c})")
        code.forward.append(f"y = self.{p}_bn(y)")
    _act(code, f"{p}_act", a["act"], "y")
    second_name = "conv2" if a["layer"] == "conv" else "fc2"
    code.init.append(f"self.{p}_{second_name} = {second}")
    code.forward.append(f"y = self.{p}_{second_name}(y)")
    code.forward += _RESIDUAL_ADD[a["add"]]
    return code


def _concat(p: str, a: Mapping[str, Any]) -> Code:
    return Code(
        [
            f"self.{p}_left = nn.Conv2d({a['c_in']}, {a['c1']}, 1)",
            f"self.{p}_right = nn.Conv2d({a['c_in']}, {a['c2']}, 3, padding=1)",
        ],
        [f"a = self.{p}_left(x)", f"b = self.{p}_right(x)", "x = torch.cat([a, b], dim=1)"],
    )


def _split(p: str, a: Mapping[str, Any]) -> Code:
    c, c1, dim = a["c"], a["c1"], a["dim"]
    split = {
        "split": [f"a, b = torch.split(x, [{c1}, {c - c1}], dim={dim})"],
        "chunk": [f"a, b = x.chunk(2, dim={dim})"],
        "slice": [f"a = x[:, :{c1}]", f"b = x[:, {c1}:]"] if dim == 1 else [f"a = x[..., :{c1}]", f"b = x[..., {c1}:]"],
    }[a["variant"]]
    k = 3 if a["layer"] == "conv" else 1
    return Code(
        [f"self.{p}_inner = {_layer(a['layer'], c1, c1, k)}"],
        [*split, f"a = self.{p}_inner(a)", f"x = torch.cat([b, a], dim={dim})"],
    )


_POOLS = {
    "max": ("nn.MaxPool2d(2)", "x = self.{p}_pool(x)"),
    "avg": ("nn.AvgPool2d(2)", "x = self.{p}_pool(x)"),
    "F.max_pool2d": (None, "x = F.max_pool2d(x, 2)"),
    "F.avg_pool2d": (None, "x = F.avg_pool2d(x, kernel_size=2)"),
    "adaptive_avg": ("nn.AdaptiveAvgPool2d(({oh}, {ow}))", "x = self.{p}_pool(x)"),
    "adaptive_max": ("nn.AdaptiveMaxPool2d(({oh}, {ow}))", "x = self.{p}_pool(x)"),
}


def _pool(p: str, a: Mapping[str, Any]) -> Code:
    ctor, line = _POOLS[a["variant"]]
    code = Code(forward=[line.format(p=p)])
    if ctor is not None:
        code.init.append(f"self.{p}_pool = " + ctor.format(oh=a["oh"], ow=a["ow"]))
    return code


def _upsample(p: str, a: Mapping[str, Any]) -> Code:
    variant = a["variant"]
    if variant == "module":
        return Code([f'self.{p}_up = nn.Upsample(scale_factor=2, mode="nearest")'], [f"x = self.{p}_up(x)"])
    if variant == "bilinear":
        return Code(forward=['x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)'])
    if variant == "size":
        return Code(forward=[f'x = F.interpolate(x, size=({a["oh"]}, {a["ow"]}), mode="nearest")'])
    return Code([f"self.{p}_up = nn.ConvTranspose2d({a['c']}, {a['c']}, 2, stride=2)"], [f"x = self.{p}_up(x)"])


def _shared(p: str, a: Mapping[str, Any]) -> Code:
    k = 3 if a["layer"] == "conv" else 1
    code = Code([f"self.{p}_shared = {_layer(a['layer'], a['c'], a['c'], k)}"], [f"x = self.{p}_shared(x)", "x = F.relu(x)"])
    second = f"{p}_shared"
    if a["variant"] == "alias":
        code.init.append(f"self.{p}_alias = self.{p}_shared  # one module under two names")
        second = f"{p}_alias"
    code.forward.append(f"x = self.{second}(x)  # the same weights a second time")
    return code


def _gate(p: str, a: Mapping[str, Any]) -> Code:
    inner = _layer(a["layer"], a["c"], a["c"])
    return Code([f"self.{p}_gate = DataGate({inner})"], [f"x = self.{p}_gate(x)"], {"DataGate"})


_NOOPS = {
    "dropout": ("nn.Dropout(0.1)", "x = self.{p}_noop(x)"),
    "identity": ("nn.Identity()", "x = self.{p}_noop(x)"),
    "F.dropout": (None, "x = F.dropout(x, p=0.1, training=self.training)"),
    "mul_one": (None, "x = x * 1"),
    "add_zero": (None, "x = x + 0"),
    "contiguous": (None, "x = x.contiguous()"),
}


def _noop(p: str, a: Mapping[str, Any]) -> Code:
    ctor, line = _NOOPS[a["variant"]]
    return Code([f"self.{p}_noop = {ctor}"] if ctor else [], [line.format(p=p)])


def _attention2d(p: str, a: Mapping[str, Any]) -> Code:
    c, heads = a["c"], a["heads"]
    d = c // heads
    init = [f"self.{p}_{n} = nn.Linear({c}, {c})" for n in ("q", "k", "v", "proj")]
    forward = ["n, c, h, w = x.shape", "t = x.flatten(2).transpose(1, 2)"]
    forward += [f"{n} = self.{p}_{n}(t).reshape(n, h * w, {heads}, {d}).permute(0, 2, 1, 3)" for n in "qkv"]
    forward += [
        f"attn = torch.matmul(q, k.transpose(-2, -1)) * {d ** -0.5!r}",
        "attn = attn.softmax(dim=-1)",
        f"t = torch.matmul(attn, v).permute(0, 2, 1, 3).reshape(n, h * w, {c})",
        f"t = self.{p}_proj(t)",
        "x = x + t.transpose(1, 2).reshape(n, c, h, w)",
    ]
    return Code(init, forward)


def _self_attention(p: str, a: Mapping[str, Any]) -> Code:
    dim, heads = a["d"], a["heads"]
    d = dim // heads
    code = Code(forward=["n, l, _ = x.shape"])
    src = "x"
    if a["prenorm"]:
        code.init.append(f"self.{p}_norm = nn.LayerNorm({dim})")
        code.forward.append(f"t = self.{p}_norm(x)")
        src = "t"
    if a["variant"] == "fused":
        code.init.append(f"self.{p}_qkv = nn.Linear({dim}, {3 * dim})")
        code.forward.append(f"q, k, v = self.{p}_qkv({src}).chunk(3, dim=-1)")
    else:
        code.init += [f"self.{p}_{n} = nn.Linear({dim}, {dim})" for n in "qkv"]
        code.forward += [f"{n} = self.{p}_{n}({src})" for n in "qkv"]
    code.forward += [f"{n} = {n}.reshape(n, l, {heads}, {d}).transpose(1, 2)" for n in "qkv"]
    code.init.append(f"self.{p}_proj = nn.Linear({dim}, {dim})")
    code.forward += [
        f"attn = (q @ k.transpose(-2, -1)) * {d ** -0.5!r}",
        "attn = torch.softmax(attn, dim=-1)",
        f"t = (attn @ v).transpose(1, 2).reshape(n, l, {dim})",
        f"x = x + self.{p}_proj(t)",
    ]
    return code


def _mha(p: str, a: Mapping[str, Any]) -> Code:
    call = f"self.{p}_mha(t, t, t, need_weights=False)"
    attend = f"t = {call}[0]" if a["variant"] == "index" else f"t, _ = {call}"
    return Code(
        [f"self.{p}_mha = nn.MultiheadAttention({a['d']}, {a['heads']})"],
        ["t = x.transpose(0, 1)  # (L, N, D)", attend, "x = x + t.transpose(0, 1)"],
    )


def _ffn(p: str, a: Mapping[str, Any]) -> Code:
    d, hidden = a["d"], a["hidden"]
    code = Code(
        [f"self.{p}_norm = nn.LayerNorm({d})", f"self.{p}_fc1 = nn.Linear({d}, {hidden})"],
        [f"t = self.{p}_norm(x)", f"t = self.{p}_fc1(t)"],
    )
    _act(code, f"{p}_act", a["act"], "t")
    code.init.append(f"self.{p}_fc2 = nn.Linear({hidden}, {d})")
    code.forward += [f"t = self.{p}_fc2(t)", "x = x + t"]
    return code


def _layernorm(p: str, a: Mapping[str, Any]) -> Code:
    return Code([f"self.{p}_norm = nn.LayerNorm({a['d']})"], [f"x = self.{p}_norm(x)"])


def _merge(p: str, a: Mapping[str, Any]) -> Code:
    aux = _layer(a["layer"], a["c_y"], a["c"])
    dim = 1 if a["layer"] == "conv" else -1
    line = f"x = x + self.{p}_aux(y)" if a["variant"] == "add" else f"x = torch.cat([x, self.{p}_aux(y)], dim={dim})"
    return Code([f"self.{p}_aux = {aux}  # projects the second input"], [line])


RENDERERS: dict[str, Callable[[str, Mapping[str, Any]], Code]] = {
    "conv": _conv,
    "linear": _linear,
    "residual": _residual,
    "concat": _concat,
    "split": _split,
    "pool": _pool,
    "upsample": _upsample,
    "shared": _shared,
    "gate": _gate,
    "noop": _noop,
    "attention2d": _attention2d,
    "self_attention": _self_attention,
    "mha": _mha,
    "ffn": _ffn,
    "layernorm": _layernorm,
    "merge": _merge,
}

_HEAD_POOLS = {
    "adaptive_avg": (["self.head_pool = nn.AdaptiveAvgPool2d(1)"], ["z = self.head_pool(x)"]),
    "adaptive_max": (["self.head_pool = nn.AdaptiveMaxPool2d(1)"], ["z = self.head_pool(x)"]),
    "mean": ([], ["z = x.mean(dim=(2, 3))"]),
    "none": ([], ["z = x"]),
    "tokens_mean": ([], ["z = x.mean(dim=1)"]),
    "first_token": ([], ["z = x[:, 0]"]),
}
_FLATTENS = {
    "torch.flatten": ([], ["z = torch.flatten(z, 1)"]),
    "method": ([], ["z = z.flatten(1)"]),
    "view": ([], ["z = z.view(z.size(0), -1)"]),
    "module": (["self.head_flatten = nn.Flatten()"], ["z = self.head_flatten(z)"]),
    "none": ([], []),
}
_RETURNS = {
    "features": "return x",
    "linear": "return logits",
    "tuple": "return x, logits",
    "dict": 'return {"features": x, "logits": logits}',
}


def render_head(a: Mapping[str, Any]) -> Code:
    """The output lines: the features, a linear head, or a tuple/dict of features and logits."""
    code = Code()
    if a["variant"] != "features":
        for table, key in ((_HEAD_POOLS, "pool"), (_FLATTENS, "flatten")):
            init, forward = table[a[key]]
            code.init += init
            code.forward += forward
        code.init.append(f"self.head_fc = nn.Linear({a['f_in']}, {a['classes']})")
        code.forward.append("logits = self.head_fc(z)")
    code.forward.append(_RETURNS[a["variant"]])
    return code


def render_block(index: int, block: BlockSpec) -> Code:
    """The code of block number `index` (its attributes are prefixed ``b<index>_``)."""
    return RENDERERS[block.kind](f"b{index}", block.params)


_BN_INIT = """    with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
"""


def _indent(lines: list[str], spaces: int) -> str:
    return "\n".join(" " * spaces + line for line in lines)


def render_source(spec: ModelSpec) -> str:
    """The Python source of `spec`: ``class Model`` and ``make_model() -> (model, example_inputs)``.

    Args:
        spec: the drawn architecture.

    Returns:
        A self-contained module source (imports torch only).
    """
    blocks = [render_block(i, b) for i, b in enumerate(spec.blocks)]
    head = render_head(spec.head.params)
    helpers = sorted(set().union(*(b.helpers for b in blocks)))
    init = [line for b in (*blocks, head) for line in b.init]
    forward = [line for b in (*blocks, head) for line in b.forward]
    args = ", ".join(["x", "y"][: len(spec.inputs)])
    shapes = ", ".join(f"torch.randn{(spec.batch, *shape)}" for shape in spec.inputs)
    parts = [
        *("# " + line for line in textwrap.wrap(f"Drawn by fxopt.testing: {spec!r}", 96)),
        "# model, example_inputs = make_model()",
        "import torch",
        "import torch.nn.functional as F",
        "from torch import nn\n\n",
        *(HELPERS[name] + "\n" for name in helpers),
        "class Model(nn.Module):",
        "    def __init__(self):",
        "        super().__init__()",
        _indent(init, 8) if init else "        pass",
        "",
        f"    def forward(self, {args}):",
        _indent(forward, 8),
        "\n",
        "def make_model():",
        '    """The model (seeded weights, eval mode) and its example inputs."""',
        f"    torch.manual_seed({spec.seed})",
        "    model = Model().eval()",
        *([_BN_INIT.rstrip("\n")] if "BatchNorm" in "\n".join(init) else []),
        f"    example_inputs = ({shapes},)",
        "    return model, example_inputs",
    ]
    return "\n".join(parts) + "\n"
