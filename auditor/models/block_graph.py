"""A block's traced graph read as a linear operator: its layers, the diagonals between them, its rules.

resdyn conditions every block under one linearization, the paper's
"nonlinearity as identity" carried over to the parts of today's residual
networks (the rules of :data:`RULES`):

- every activation (ReLU, ReLU6, GELU, SiLU, Hardswish, ...) is the identity;
- BatchNorm is its eval-mode affine map, a per-channel scale
  ``gamma / sqrt(var + eps)``;
- LayerNorm (channels first or last) and GroupNorm are their affine part
  ``gamma`` (the normalization itself is the identity);
- a squeeze-and-excitation gate ``x * g(x)`` is 1 (the product is ``x``);
- layer scale (a learned per-channel factor) is kept, a diagonal;
- dropout and stochastic depth are the identity (eval mode);
- convolutions (depthwise, grouped, dilated) and Linear layers applied at every
  position (a 1x1 convolution) are kept exactly.

Under these rules every block is a chain of convolutions with per-channel
factors between them, plus a shortcut: translation invariant, so the
per-frequency method of :mod:`auditor.analysis.conditioning` is exact.

:func:`read_path` walks one branch of a block's graph from its end back to the
block's input and returns what it found in forward order; anything it cannot
place under a rule (attention, a product of two full-size functions of the
input, a pooling inside a branch, a convolution class with its own forward) is
named in ``uncovered``, never dropped.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = [
    "RULES",
    "Factor",
    "PathReading",
    "BlockTracer",
    "trace_block",
    "read_path",
    "is_gate_module",
    "ancestry",
]

# rule key -> what it does, as the report names it (JSON ``linearization[].rule``)
RULES: dict[str, str] = {
    "activation": "activations as identity",
    "batchnorm": "BatchNorm as its eval-mode affine map",
    "layernorm": "LayerNorm as its affine part (normalization as identity)",
    "groupnorm": "GroupNorm as its affine part (normalization as identity)",
    "gate": "squeeze-and-excitation gates as 1",
    "scale": "layer scale kept (a diagonal)",
    "dropout": "dropout and stochastic depth as identity",
    "per_position_linear": "Linear layers at every position as 1x1 convolutions",
}

_BATCHNORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)
_ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.Mish, nn.PReLU, nn.Softplus,
)
_DROPOUTS = (nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.AlphaDropout)
_ACTIVATION_FUNCTIONS = {
    F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu,
    F.celu, F.selu, F.mish, F.softplus, F.sigmoid, F.tanh, torch.relu, torch.relu_, torch.sigmoid,
    torch.tanh, torch.nn.functional.hardtanh,
}
_ACTIVATION_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "hardswish", "gelu", "silu",
}
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout2d, F.dropout1d}
# functions that libraries wrap as leaves of torch.fx (torchvision.ops.stochastic_depth)
_DROPOUT_FUNCTION_NAMES = {"stochastic_depth", "drop_path"}
_LAYOUT_METHODS = {"permute", "contiguous", "clone"}
_LAYOUT_FUNCTIONS = {torch.permute, torch.clone}
_MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul}
_MUL_METHODS = {"mul", "mul_"}


@dataclass(frozen=True)
class Factor:
    """A per-channel factor of the linearization.

    Attributes
    ----------
    kind : str
        ``"batchnorm"`` (module path: eval affine scale), ``"layernorm"`` /
        ``"groupnorm"`` (module path: its ``weight``), ``"scale"`` (parameter
        or buffer path: a learned per-channel factor).
    path : str
        Module or parameter path in the whole model.
    """

    kind: str
    path: str


@dataclass(frozen=True)
class PathLayer:
    """A convolution or per-position Linear on a branch, with the factors around it.

    Its input shape is the caller's to find (the traced shapes are a probe's).

    ``pre`` act on its input (only for the branch's first layer: factors
    between the block input and it); ``post`` act on its output (the factors
    up to the next layer, or to the branch's end).
    """

    path: str
    linear: bool
    pre: tuple[Factor, ...] = ()
    post: tuple[Factor, ...] = ()


@dataclass
class PathReading:
    """What :func:`read_path` found on one branch, in forward order."""

    layers: list[PathLayer] = field(default_factory=list)
    leading: list[Factor] = field(default_factory=list)  # factors when the branch has no layer
    applied: dict[str, list[str]] = field(default_factory=dict)
    uncovered: list[str] = field(default_factory=list)
    reached_input: bool = False

    def note(self, rule: str, path: str) -> None:
        paths = self.applied.setdefault(rule, [])
        if path not in paths:
            paths.append(path)


class BlockTracer(fx.Tracer):
    """torch.fx tracer that keeps normalizations (timm's ``BatchNormAct2d``, ``LayerNorm2d``) whole.

    Their subclasses live outside ``torch.nn``, so the default tracer would
    inline them into bare ``F.batch_norm`` calls that no longer name a module.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.LayerNorm, nn.GroupNorm, *_BATCHNORMS)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


# Shapes are propagated on an input of this many pixels per side, whatever the block's real size
# (which operand of a product is the smaller gate does not depend on it, as long as the map is not
# already 1 x 1; the layers' real input shapes come from the whole network's forward pass): a
# CIFAR ResNet-56's blocks 1.3 -> 0.5 s.
_PROBE_SIDE = 8


def trace_block(module: nn.Module, input_shape: tuple[int, ...]) -> fx.GraphModule | None:
    """The module's graph with every node's output shape (``node.meta['shape']``), or None.

    The shapes are those of a probe input with the block's channels and
    :data:`_PROBE_SIDE` pixels per side (the real size where the block cannot
    run on that). None when the module cannot be traced symbolically
    (data-dependent control flow) or does not run on a zero input.
    """
    try:
        graph = BlockTracer().trace(module)
        graph_module = fx.GraphModule(module, graph)
    except Exception:
        return None
    probe = (*input_shape[:-2], _PROBE_SIDE, _PROBE_SIDE)
    for shape in dict.fromkeys([probe, tuple(input_shape)]):
        if _propagate(graph_module, shape):
            return graph_module
    return None


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph, recording each node's output shape in ``node.meta["shape"]``."""

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if isinstance(value, torch.Tensor):
            n.meta["shape"] = tuple(value.shape)
        return value


def _propagate(graph_module: fx.GraphModule, input_shape: tuple[int, ...]) -> bool:
    """Run the graph on zeros (further inputs None), recording each node's output shape; False when it does not run."""
    inputs = sum(node.op == "placeholder" for node in graph_module.graph.nodes)
    try:
        with torch.inference_mode():
            _ShapeRecorder(graph_module).run(torch.zeros(1, *input_shape), *([None] * (inputs - 1)))
    except Exception:
        return False
    return True


def _shape(node: Any) -> tuple[int, ...] | None:
    return node.meta.get("shape") if isinstance(node, fx.Node) else None


def ancestry(node: fx.Node) -> set[fx.Node]:
    """``node`` and every node it is computed from."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return seen


def _depends_on(node: fx.Node, source: fx.Node) -> bool:
    return source in ancestry(node)


def _constant_path(node: fx.Node) -> str | None:
    """The one parameter or buffer a constant operand is computed from (reshapes of it)."""
    found = [str(n.target) for n in ancestry(node) if n.op == "get_attr"]
    return found[0] if len(found) == 1 else None


def _scope(node: fx.Node) -> str | None:
    """The module path (relative to the traced block) a call_function node was recorded in."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    last = list(stack.values())[-1]
    name = last[0] if isinstance(last, tuple) else str(last)
    return name or None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (name or prefix)


def _is_activation(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        module = modules.get(str(node.target))
        return isinstance(module, _ACTIVATION_MODULES)
    if node.op == "call_function":
        return node.target in _ACTIVATION_FUNCTIONS
    return node.op == "call_method" and node.target in _ACTIVATION_METHODS


def _has_own_forward(module: nn.Module, base: type[nn.Module]) -> bool:
    return type(module).forward is not base.forward


def read_path(graph_module: fx.GraphModule, end: fx.Node, source: fx.Node, prefix: str) -> PathReading:
    """Read one branch of a block, from ``end`` back to the block input ``source``.

    Parameters
    ----------
    graph_module : fx.GraphModule
        From :func:`trace_block` (nodes carry their shapes).
    end : fx.Node
        The branch's last node (an operand of the residual add, or the output).
    source : fx.Node
        The block's input placeholder.
    prefix : str
        The block's module path, prepended to every name reported.

    Returns
    -------
    PathReading
        Layers in forward order with their factors, the rules applied (rule ->
        module paths) and what no rule covers (the walk stops there).
    """
    modules = dict(graph_module.named_modules())
    reading = PathReading()
    found: list[tuple[str, fx.Node, nn.Module]] = []  # layers, end first
    pending: list[Factor] = []  # factors after the layer found last (in reverse order)
    after: dict[int, list[Factor]] = {}
    node: Any = end
    while isinstance(node, fx.Node):
        if node is source:
            reading.reached_input = True
            break
        target = str(node.target)
        path = _join(prefix, target)
        if node.op == "call_module":
            module = modules[target]
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                base = nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Linear
                if _has_own_forward(module, base):
                    reading.uncovered.append(f"{path} ({type(module).__name__}: a {base.__name__} with its own forward)")
                    return reading
                after[len(found)] = list(reversed(pending))
                pending = []
                found.append((path, node, module))
            elif isinstance(module, _BATCHNORMS):
                pending.append(Factor("batchnorm", path))
                reading.note("batchnorm", path)
                if not isinstance(getattr(module, "act", nn.Identity()), nn.Identity):
                    reading.note("activation", path)  # timm's BatchNormAct2d
            elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
                kind = "groupnorm" if isinstance(module, nn.GroupNorm) else "layernorm"
                pending.append(Factor(kind, path))
                reading.note(kind, path)
            elif _is_activation(node, modules):
                reading.note("activation", path)
            elif isinstance(module, _DROPOUTS):
                reading.note("dropout", path)
            elif not isinstance(module, nn.Identity):
                reading.uncovered.append(_uncovered_part(node, modules, prefix))
                return reading
            node = node.args[0] if node.args else None
            continue
        if _is_activation(node, modules):
            reading.note("activation", _join(prefix, _scope(node) or node.name))
            node = node.args[0]
            continue
        if node.op == "call_function" and (
            node.target in _DROPOUT_FUNCTIONS or getattr(node.target, "__name__", "") in _DROPOUT_FUNCTION_NAMES
        ):
            reading.note("dropout", _join(prefix, _scope(node) or node.name))
            node = node.args[0]
            continue
        if (node.op == "call_method" and node.target in _LAYOUT_METHODS) or (
            node.op == "call_function" and node.target in _LAYOUT_FUNCTIONS
        ):
            node = node.args[0]
            continue
        if (node.op == "call_function" and node.target in _MUL_FUNCTIONS) or (
            node.op == "call_method" and node.target in _MUL_METHODS
        ):
            step = _read_product(node, source, prefix, pending, reading)
            if step is None:
                return reading
            node = step
            continue
        reading.uncovered.append(_uncovered_part(node, modules, prefix))
        return reading
    if not reading.reached_input:
        return reading
    # forward order; factors after layer i are pending-at-time-of-finding layer i-1 ...
    leading = list(reversed(pending))
    layers = []
    count = len(found)
    for index, (path, node, module) in enumerate(reversed(found)):
        position = count - 1 - index  # index in `found` (end first)
        post = tuple(after[position])
        pre = tuple(leading) if index == 0 else ()
        linear = isinstance(module, nn.Linear)
        shape = _shape(node.args[0])
        if shape is None or len(shape) != 4:  # a Linear on pooled features, say
            reading.uncovered.append(f"{path} ({type(module).__name__} on a {len(shape or ())}-D input)")
            return reading
        if linear:
            reading.note("per_position_linear", path)
        layers.append(PathLayer(path, linear, pre, post))
    reading.layers = layers
    reading.leading = leading if not layers else []
    return reading


_KNOWN_MODULES = (nn.Conv2d, nn.Linear, nn.LayerNorm, nn.GroupNorm, nn.Identity, *_BATCHNORMS,
                  *_ACTIVATION_MODULES, *_DROPOUTS)


def _uncovered_part(node: fx.Node, modules: dict[str, nn.Module], prefix: str) -> str:
    """The part to name where the walk stops: the first module of no known kind the branch runs
    up to that node (an attention layer, say), else the operation itself (a reshape, a pooling)."""
    before = ancestry(node)
    found = [n for n in node.graph.nodes if n in before  # in graph order: the first such module
             and n.op == "call_module" and not isinstance(modules.get(str(n.target)), _KNOWN_MODULES)]
    if found:
        first = str(found[0].target)
        return f"{_join(prefix, first)} ({type(modules[first]).__name__})"
    what = getattr(node.target, "__name__", str(node.target))
    return f"{_join(prefix, _scope(node) or node.name)} ({what})"


def _read_product(node: fx.Node, source: fx.Node, prefix: str, pending: list[Factor],
                  reading: PathReading) -> fx.Node | None:
    """The data operand of a product, after noting the other as a scale or a gate; None if neither."""
    left, right = node.args[0], node.args[1]
    where = _join(prefix, _scope(node) or node.name)
    if not isinstance(left, fx.Node) or not isinstance(right, fx.Node):
        reading.uncovered.append(f"{where} (multiplication by a number)")
        return None
    data, other = (left, right) if _depends_on(left, source) else (right, left)
    if not _depends_on(data, source):
        reading.uncovered.append(f"{where} (a product that does not involve the block input)")
        return None
    if not _depends_on(other, source):
        parameter = _constant_path(other)
        if parameter is None:
            reading.uncovered.append(f"{where} (multiplication by a computed constant)")
            return None
        pending.append(Factor("scale", _join(prefix, parameter)))
        reading.note("scale", _join(prefix, parameter))
        return data
    data_shape, other_shape = _shape(data), _shape(other)
    out_shape = _shape(node)
    if data_shape != out_shape:
        data, other = other, data
        data_shape, other_shape = other_shape, data_shape
    if data_shape != out_shape or other_shape is None or _numel(other_shape) >= _numel(data_shape):
        reading.uncovered.append(f"{where} (a product of two functions of the input)")
        return None
    reading.note("gate", _join(prefix, _scope(node) or ""))
    return data


def _numel(shape: tuple[int, ...] | None) -> int:
    out = 1
    for size in shape or ():
        out *= int(size)
    return out


def is_gate_module(module: nn.Module, input_shape: tuple[int, ...]) -> bool:
    """True for a squeeze-and-excitation style module: its output is its input times a smaller gate."""
    graph_module = trace_block(module, input_shape)
    if graph_module is None:
        return False
    output = next((n for n in graph_module.graph.nodes if n.op == "output"), None)
    result = output.args[0] if output is not None else None
    if not isinstance(result, fx.Node):
        return False
    is_mul = (result.op == "call_function" and result.target in _MUL_FUNCTIONS) or (
        result.op == "call_method" and result.target in _MUL_METHODS
    )
    if not is_mul or len(result.args) < 2:
        return False
    shapes = [_shape(a) for a in result.args[:2]]
    placeholders = [a for a in result.args[:2] if isinstance(a, fx.Node) and a.op == "placeholder"]
    return bool(placeholders) and None not in shapes and _numel(shapes[0]) != _numel(shapes[1])
