"""Anatomy of a CNN: layers with their input shapes, residual blocks, stages.

Works on any ``nn.Module``, not only registered names:

1. one forward pass of a zero input (batch 1, eval mode) records the input and
   output shape of every Conv2d and Linear;
2. residual blocks are the outermost non-container modules with at least two
   convolutions whose traced graph (``torch.fx``) adds the module's input, or a
   function of it, to the result; a module with two or more convolutions and no
   such add (and no blocks inside) is a *plain* block;
3. the shortcut branch of the add is classified: ``identity`` (the input
   itself), ``projection`` (it holds convolutions), ``option_a`` (parameter-free
   subsample + zero channels, recognised by probing it), ``other``;
4. stages are the points before each down-sampling (paper, section 4.4): the
   input of the first block ("stem") and the output of each group of blocks;
   the penultimate features are the input of the last Linear.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import ArchitectureError, Remedy
from ..io.stage_spec import StageSpec
from .block_graph import RULES, Factor, PathLayer, PathReading, ancestry, is_gate_module, read_path, trace_block

__all__ = [
    "LayerInfo",
    "ConvInfo",
    "OptionAInfo",
    "BlockInfo",
    "StageSpec",
    "Anatomy",
    "analyze_anatomy",
]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_ADD_TARGETS = {operator.add, operator.iadd, torch.add}


@dataclass(frozen=True)
class LayerInfo:
    """A Conv2d or Linear layer and the shapes it sees (without the batch axis)."""

    name: str
    kind: str  # "conv" or "linear"
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int
    bias: bool
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    dilation: tuple[int, int] = (1, 1)


@dataclass(frozen=True)
class ConvInfo:
    """A convolution (or a Linear layer applied at every position) inside a block.

    Attributes
    ----------
    bn : str or None
        The BatchNorm applied directly to its output (the report's ``batchnorm``).
    input_shape : tuple of int
        ``(C, H, W)``, channels first also for a per-position Linear layer.
    dilation : tuple of int
    linear : bool
        A Linear layer at every position: a 1x1 convolution with its weight.
    pre, post : tuple of Factor
        The per-channel factors of the linearization folded into it: ``pre`` on
        its input (a pre-activation block's first normalization), ``post`` on
        its output (every factor up to the next layer or the branch's end,
        ``bn`` first when there is one). See :mod:`.block_graph`.
    """

    name: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int
    bn: str | None
    input_shape: tuple[int, int, int]
    dilation: tuple[int, int] = (1, 1)
    linear: bool = False
    pre: tuple[Factor, ...] = ()
    post: tuple[Factor, ...] = ()


@dataclass(frozen=True)
class OptionAInfo:
    """Parameters of a parameter-free subsample + zero-channel shortcut."""

    stride: int
    pad_before: int
    out_channels: int


@dataclass(frozen=True)
class BlockInfo:
    """A residual (or plain) block.

    Attributes
    ----------
    name : str
        Module path (``layer2.0``).
    stage : str
        The group it belongs to (``layer2``).
    convs : tuple of ConvInfo
        Convolutions of the residual branch, in order.
    shortcut : str
        ``identity``, ``projection``, ``option_a``, ``other`` or ``none``.
    shortcut_convs : tuple of ConvInfo
        Convolutions of a projection shortcut.
    option_a : OptionAInfo or None
    input_shape, output_shape : tuple of int
    linearization : tuple of (rule, module paths)
        The rules of :data:`auditor.models.block_graph.RULES` the block's
        linearization applied, and where.
    uncovered : tuple of str
        Parts no rule covers (named, never dropped): the block has no exact
        linear operator and ``condition`` refuses it.
    """

    name: str
    stage: str
    convs: tuple[ConvInfo, ...]
    shortcut: str
    shortcut_convs: tuple[ConvInfo, ...] = ()
    option_a: OptionAInfo | None = None
    input_shape: tuple[int, int, int] = (0, 0, 0)
    output_shape: tuple[int, int, int] = (0, 0, 0)
    linearization: tuple[tuple[str, tuple[str, ...]], ...] = ()
    uncovered: tuple[str, ...] = ()

    @property
    def batchnorm(self) -> bool:
        """True when the branch holds a BatchNorm per convolution, after it (ResNet v1) or before it
        (pre-activation: the BatchNorm before ``conv2`` is folded into ``conv1``'s output)."""
        norms = sum(f.kind == "batchnorm" for c in self.convs for f in (*c.pre, *c.post))
        return bool(self.convs) and norms >= len(self.convs)

    @property
    def downsamples(self) -> bool:
        """True when the block changes the spatial size or channels."""
        return self.input_shape != self.output_shape


@dataclass(frozen=True)
class Anatomy:
    """Everything resdyn needs to know about a network's structure."""

    input_shape: tuple[int, int, int]
    layers: tuple[LayerInfo, ...]
    blocks: tuple[BlockInfo, ...]
    stages: tuple[StageSpec, ...]
    penultimate: StageSpec | None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def layer(self, name: str) -> LayerInfo:
        """The layer with module path ``name``."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def stage(self, name: str) -> StageSpec:
        """The stage (or ``penultimate``) called ``name``."""
        for spec in (*self.stages, *([self.penultimate] if self.penultimate else [])):
            if spec.name == name:
                return spec
        known = ", ".join(s.name for s in self.stages)
        raise ArchitectureError(f"unknown stage {name!r} (stages: {known}, penultimate)")


# --------------------------------------------------------------------------- shapes


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _trace_shapes(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, tuple]:
    """Module path -> (input shape, output shape) of every module, from one forward pass."""
    shapes: dict[str, tuple] = {}
    handles = []

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple, output: Any) -> None:
            if name in shapes:  # a module called twice keeps its first call
                return
            first = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            out = output if isinstance(output, torch.Tensor) else None
            shapes[name] = (
                tuple(first.shape[1:]) if first is not None else None,
                tuple(out.shape[1:]) if out is not None else None,
            )

        return record

    for name, module in model.named_modules():
        handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.inference_mode():
            model(torch.zeros(1, *input_shape))
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ArchitectureError(
            f"the network cannot take input size {input_shape[1]}x{input_shape[2]} "
            f"({type(exc).__name__}: {first[:200]})",
            hint="pass {remedy} with the size the model was trained on", remedy=Remedy("input_size", None),
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _padding(module: nn.Conv2d) -> tuple[int, int]:
    """The padding per axis; ``padding="same"`` (stride 1) as the number it stands for."""
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0, 0)
        kh, kw = _pair(module.kernel_size)
        dh, dw = _pair(module.dilation)
        return (dh * (kh - 1) // 2, dw * (kw - 1) // 2)
    return _pair(module.padding)


def _layers(model: nn.Module, shapes: dict[str, tuple]) -> tuple[LayerInfo, ...]:
    layers = []
    for name, module in model.named_modules():
        if name not in shapes:
            continue
        inp, out = shapes[name]
        if isinstance(module, nn.Conv2d):
            layers.append(
                LayerInfo(
                    name, "conv", module.in_channels, module.out_channels,
                    _pair(module.kernel_size), _pair(module.stride), _padding(module),
                    module.groups, module.bias is not None, inp, out, _pair(module.dilation),
                )
            )
        elif isinstance(module, nn.Linear):
            layers.append(
                LayerInfo(
                    name, "linear", module.in_features, module.out_features, (1, 1),
                    (1, 1), (0, 0), 1, module.bias is not None, inp, out,
                )
            )
    return tuple(layers)


# --------------------------------------------------------------------------- blocks


def _count_layers(module: nn.Module) -> tuple[int, int]:
    """(convolutions, convolutions + Linear layers) inside ``module``."""
    convs = sum(isinstance(m, nn.Conv2d) for m in module.modules())
    return convs, convs + sum(isinstance(m, nn.Linear) for m in module.modules())


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_TARGETS:
        return all(isinstance(a, fx.Node) for a in node.args[:2])
    return node.op == "call_method" and node.target in ("add", "add_")


class _ChildrenAsLeaves(fx.Tracer):
    """Traces only a module's own forward: its children are calls, not inlined."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return "." not in module_qualified_name or super().is_leaf_module(m, module_qualified_name)


def _adds_own_input(module: nn.Module) -> bool:
    """True when the module's own forward adds (a function of) its input to its output.

    Its children are not looked into: a stage that runs residual blocks is
    not itself a block, although its first input reaches every add inside.
    """
    try:
        graph = _ChildrenAsLeaves().trace(module)
    except Exception:
        return True  # cannot tell: let the full trace decide
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return False
    source = placeholders[0]
    return any(
        _is_add(node) and all(source in ancestry(a) for a in node.args[:2])
        for node in graph.nodes
    )


def _residual_add(graph_module: fx.GraphModule) -> tuple[fx.Node, fx.Node] | None:
    """(the last add whose both operands depend on the block input, that input)."""
    placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return None
    source = placeholders[0]
    for node in reversed(list(graph_module.graph.nodes)):
        if _is_add(node) and all(source in ancestry(a) for a in node.args[:2]):
            return node, source
    return None


def _conv_nodes(graph_module: fx.GraphModule, nodes: set[fx.Node]) -> list[fx.Node]:
    modules = dict(graph_module.named_modules())
    return [
        n for n in graph_module.graph.nodes
        if n in nodes and n.op == "call_module" and isinstance(modules.get(n.target), nn.Conv2d)
    ]


def _bn_after(graph_module: fx.GraphModule, conv: fx.Node) -> str | None:
    modules = dict(graph_module.named_modules())
    for user in conv.users:
        if user.op == "call_module" and isinstance(
            modules.get(user.target), (nn.BatchNorm2d, nn.SyncBatchNorm)
        ):
            return str(user.target)
    return None


def _shortcut_function(graph_module: fx.GraphModule, short: fx.Node) -> fx.GraphModule:
    """A GraphModule computing only the shortcut branch."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    needed = ancestry(short)
    for node in graph_module.graph.nodes:
        if node in needed:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[short])
    return fx.GraphModule(graph_module, graph)


def _probe_option_a(function: nn.Module, input_shape: tuple[int, int, int]) -> OptionAInfo | None:
    """Recognise subsample-by-s + zero channels by applying the shortcut to a ramp."""
    channels, height, width = input_shape
    probe = torch.arange(1, channels * height * width + 1, dtype=torch.float64).reshape(
        1, channels, height, width
    )
    try:
        with torch.inference_mode():
            out = function.double()(probe)
    except Exception:
        return None
    if out.dim() != 4:
        return None
    out_channels, out_h = out.shape[1], out.shape[2]
    if out_h == 0 or height % out_h:
        return None
    stride = height // out_h
    sub = probe[:, :, ::stride, ::stride]
    for pad_before in range(out_channels - channels + 1):
        window = out[:, pad_before : pad_before + channels]
        rest = torch.cat([out[:, :pad_before], out[:, pad_before + channels :]], dim=1)
        if window.shape == sub.shape and torch.equal(window, sub) and not rest.any():
            return OptionAInfo(stride, pad_before, int(out_channels))
    return None


def _conv_info(path: str, module: nn.Conv2d, bn: str | None, shapes: dict[str, tuple]) -> ConvInfo:
    """ConvInfo of a convolution found by ancestry (where a branch is not one chain): its BatchNorm after it."""
    return ConvInfo(
        path, module.in_channels, module.out_channels, _pair(module.kernel_size),
        _pair(module.stride), _padding(module), module.groups, bn, shapes[path][0],
        _pair(module.dilation), post=() if bn is None else (Factor("batchnorm", bn),),
    )


def _layer_info(layer: PathLayer, module: nn.Module, shapes: dict[str, tuple]) -> ConvInfo:
    """ConvInfo of a layer that :func:`read_path` placed, with its factors."""
    bn = layer.post[0].path if layer.post and layer.post[0].kind == "batchnorm" else None
    shape = shapes[layer.path][0]
    if isinstance(module, nn.Linear):  # channels last: (H, W, C)
        return ConvInfo(
            layer.path, module.in_features, module.out_features, (1, 1), (1, 1), (0, 0), 1, bn,
            (shape[2], shape[0], shape[1]), (1, 1), True, layer.pre, layer.post,
        )
    return ConvInfo(
        layer.path, module.in_channels, module.out_channels, _pair(module.kernel_size), _pair(module.stride),
        _padding(module), module.groups, bn, shape, _pair(module.dilation), False, layer.pre, layer.post,
    )


def _full(prefix: str, name: str | None) -> str | None:
    return None if name is None else f"{prefix}.{name}"


_DROP_CLASSES = ("StochasticDepth", "DropPath", "DropBlock2d")


def _linearization(module: nn.Module, path: str, *readings: PathReading) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The rules applied on the block's branches, in :data:`RULES` order, with the modules."""
    applied: dict[str, list[str]] = {}
    for reading in readings:
        for rule, paths in reading.applied.items():
            applied.setdefault(rule, []).extend(p for p in paths if p not in applied[rule])
    # stochastic depth and dropout leave no node in an eval-mode trace: name them from the modules
    for name, child in module.named_modules():
        if type(child).__name__ in _DROP_CLASSES or isinstance(child, (nn.Dropout, nn.Dropout2d)):
            full = _full(path, name) if name else path
            if full not in applied.setdefault("dropout", []):
                applied["dropout"].append(full)
    return tuple((rule, tuple(applied[rule])) for rule in RULES if applied.get(rule))


def _describe_block(
    model_modules: dict[str, nn.Module], path: str, module: nn.Module, shapes: dict[str, tuple]
) -> BlockInfo | None:
    """BlockInfo for ``module`` when it is a residual block; None otherwise."""
    if not _adds_own_input(module):
        return None
    in_shape, out_shape = shapes[path]
    graph_module = trace_block(module, in_shape)
    if graph_module is None:
        return None
    found = _residual_add(graph_module)
    if found is None:
        return None
    add, source = found
    operands = list(add.args[:2])
    readings = [read_path(graph_module, operand, source, path) for operand in operands]
    sub = dict(module.named_modules())
    convs_of = [_conv_nodes(graph_module, ancestry(operand)) for operand in operands]
    # the main branch: the operand with more layers (convolutions by ancestry when a walk stops early)
    weight = [max(len(r.layers), len(c)) for r, c in zip(readings, convs_of)]
    main_index = 0 if weight[0] >= weight[1] else 1
    main, short = readings[main_index], readings[1 - main_index]
    short_node = operands[1 - main_index]
    if not convs_of[main_index] and not main.layers:
        return None

    def by_ancestry(node: fx.Node) -> ConvInfo:
        target = str(node.target)
        return _conv_info(f"{path}.{target}", sub[target], _full(path, _bn_after(graph_module, node)), shapes)

    if main.reached_input and not main.uncovered:
        convs = tuple(_layer_info(layer, model_modules[layer.path], shapes) for layer in main.layers)
    else:
        convs = tuple(by_ancestry(n) for n in convs_of[main_index])
    option_a = None
    uncovered = list(main.uncovered)
    if short.reached_input and not short.uncovered and short.layers:
        kind = "projection"
        short_convs = tuple(_layer_info(layer, model_modules[layer.path], shapes) for layer in short.layers)
    elif short.reached_input and not short.uncovered and not short.leading:
        kind, short_convs = "identity", ()
    else:
        short_convs = tuple(by_ancestry(n) for n in convs_of[1 - main_index])
        if short_convs:
            kind = "projection"
        elif short_node.op == "placeholder":
            kind = "identity"
        else:
            function = _shortcut_function(graph_module, short_node)
            has_params = any(True for _ in function.parameters())
            option_a = None if has_params else _probe_option_a(function, in_shape)
            if option_a is not None and option_a.stride == 1 and option_a.out_channels == in_shape[0]:
                kind, option_a = "identity", None
            else:
                kind = "option_a" if option_a is not None else "other"
    return BlockInfo(
        path, "", convs, kind, short_convs, option_a, in_shape, out_shape,
        _linearization(module, path, main, short), tuple(uncovered),
    )


def _plain_block(
    model_modules: dict[str, nn.Module], path: str, module: nn.Module, shapes: dict[str, tuple]
) -> BlockInfo:
    in_shape, out_shape = shapes[path]
    graph_module = trace_block(module, in_shape)
    convs: tuple[ConvInfo, ...] = ()
    linearization: tuple[tuple[str, tuple[str, ...]], ...] = ()
    uncovered: tuple[str, ...] = ()
    if graph_module is not None:
        output = next(n for n in graph_module.graph.nodes if n.op == "output")
        source = next((n for n in graph_module.graph.nodes if n.op == "placeholder"), None)
        reading = read_path(graph_module, output.args[0], source, path)
        if reading.reached_input and not reading.uncovered:
            convs = tuple(_layer_info(layer, model_modules[layer.path], shapes) for layer in reading.layers)
        else:
            sub = dict(module.named_modules())
            convs = tuple(
                _conv_info(f"{path}.{n.target}", sub[str(n.target)], _full(path, _bn_after(graph_module, n)), shapes)
                for n in _conv_nodes(graph_module, set(graph_module.graph.nodes))
            )
            uncovered = tuple(reading.uncovered) or ("its output does not follow one chain of layers from its input",)
        linearization = _linearization(module, path, reading)
    else:
        convs = tuple(
            _conv_info(f"{path}.{name}", child, None, shapes)
            for name, child in module.named_modules() if isinstance(child, nn.Conv2d)
        )
        uncovered = ("it cannot be traced symbolically (torch.fx)",)
    return BlockInfo(path, "", convs, "none", (), None, in_shape, out_shape, linearization, uncovered)


def _find_blocks(
    module: nn.Module, prefix: str, modules: dict[str, nn.Module], shapes: dict[str, tuple]
) -> list[BlockInfo]:
    blocks: list[BlockInfo] = []
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        convs, layers = _count_layers(child)
        if convs < 1 or layers < 2 or path not in shapes or shapes[path][0] is None:
            continue
        if isinstance(child, _CONTAINERS):
            blocks.extend(_find_blocks(child, path, modules, shapes))
            continue
        block = _describe_block(modules, path, child, shapes)
        if block is not None:
            blocks.append(block)
            continue
        if is_gate_module(child, shapes[path][0]):
            continue  # a squeeze-and-excitation gate: part of the block around it
        inner = _find_blocks(child, path, modules, shapes)
        blocks.extend(inner if inner else [_plain_block(modules, path, child, shapes)])
    return blocks


def _with_stage(block: BlockInfo) -> BlockInfo:
    return replace(block, stage=block.name.rpartition(".")[0] or "blocks")


# --------------------------------------------------------------------------- stages


def _stage_point(model: nn.Module, block: BlockInfo, shapes: dict[str, tuple]) -> StageSpec:
    """The stage that ends with ``block``: named by its group when the block ends the group."""
    group = block.stage
    container = dict(model.named_modules()).get(group) if group != "blocks" else None
    children = list(container.named_children()) if container is not None else []
    if children and f"{group}.{children[-1][0]}" == block.name and group in shapes:
        return StageSpec(group, group, "output", shapes[group][1])
    return StageSpec(block.name, block.name, "output", block.output_shape)


def _stages(
    model: nn.Module, blocks: list[BlockInfo], shapes: dict[str, tuple]
) -> list[StageSpec]:
    if blocks:
        # the input of the first block, then the last block before each change of resolution
        # (a down-sampling block, or down-sampling layers between blocks) and the last block
        first = blocks[0]
        stages = [StageSpec("stem", first.name, "input", first.input_shape)]
        for block, following in zip(blocks, [*blocks[1:], None]):
            if following is None or following.output_shape[1:] != block.output_shape[1:]:
                stages.append(_stage_point(model, block, shapes))
        return stages
    # No blocks: the last top-level 4-D output before the spatial size shrinks.
    outputs = [
        (name, shapes[name][1])
        for name, _ in model.named_children()
        if name in shapes and shapes[name][1] is not None and len(shapes[name][1]) == 3
        and shapes[name][1][1:] != (1, 1)  # globally pooled features are not a stage
    ]
    stages = []
    for (name, shape), (_, following) in zip(outputs, outputs[1:] + [(None, (0, 0, 0))]):
        if following[1] < shape[1] or following[2] < shape[2]:
            stages.append(StageSpec(name, name, "output", shape))
    return stages


def _is_classifier_layer(module: nn.Module, shape: tuple | None) -> bool:
    """A Linear layer, or a 1x1 convolution on pooled (1 x 1) features (timm's conv heads)."""
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and shape is not None and len(shape) == 3
            and tuple(shape[1:]) == (1, 1) and _pair(module.kernel_size) == (1, 1))


def _penultimate(model: nn.Module, shapes: dict[str, tuple]) -> StageSpec | None:
    modules = dict(model.named_modules())
    linears = [n for n, m in modules.items() if n in shapes and _is_classifier_layer(m, shapes[n][0])]
    if not linears:
        return None
    # The classifier: the last Linear (or pooled 1x1 convolution) called; its input is the penultimate
    # feature, unless an earlier Linear feeds it (an MLP head): then that one's, going back in module order.
    index = len(linears) - 1
    name = linears[index]
    while True:
        earlier = [i for i in range(index) if isinstance(modules[linears[i]], nn.Linear)
                   and shapes[linears[i]][1] == shapes[name][0]]
        if not earlier:
            break
        index = earlier[-1]
        name = linears[index]
    return StageSpec("penultimate", name, "input", shapes[name][0])


def analyze_anatomy(model: nn.Module, input_shape: tuple[int, int, int]) -> Anatomy:
    """Describe the layers, residual blocks and stages of ``model``.

    Parameters
    ----------
    model : nn.Module
        In eval mode.
    input_shape : tuple of int
        ``(channels, height, width)`` of one input.

    Raises
    ------
    ArchitectureError
        When the network cannot run on ``input_shape``.
    """
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ArchitectureError(f"input shape must be (C, H, W) with positive sizes, got {input_shape}")
    model.eval()
    shapes = _trace_shapes(model, tuple(input_shape))
    modules = dict(model.named_modules())
    blocks = [_with_stage(b) for b in _find_blocks(model, "", modules, shapes)]
    notes = []
    if not blocks:
        notes.append("no residual or plain blocks found; stages found by tracing shapes")
    return Anatomy(
        tuple(input_shape),
        _layers(model, shapes),
        tuple(blocks),
        tuple(_stages(model, blocks, shapes)),
        _penultimate(model, shapes),
        tuple(notes),
    )
