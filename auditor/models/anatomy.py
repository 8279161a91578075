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
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import ArchitectureError, Remedy

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


@dataclass(frozen=True)
class ConvInfo:
    """A convolution inside a block; ``bn`` is the BatchNorm applied to its output."""

    name: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int
    bn: str | None
    input_shape: tuple[int, int, int]


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
    """

    name: str
    stage: str
    convs: tuple[ConvInfo, ...]
    shortcut: str
    shortcut_convs: tuple[ConvInfo, ...] = ()
    option_a: OptionAInfo | None = None
    input_shape: tuple[int, int, int] = (0, 0, 0)
    output_shape: tuple[int, int, int] = (0, 0, 0)

    @property
    def batchnorm(self) -> bool:
        """True when every residual-branch convolution is followed by BatchNorm."""
        return all(c.bn is not None for c in self.convs)

    @property
    def downsamples(self) -> bool:
        """True when the block changes the spatial size or channels."""
        return self.input_shape != self.output_shape


@dataclass(frozen=True)
class StageSpec:
    """Where to capture a stage's activation.

    ``hook`` is ``"input"`` (forward pre-hook: the module's first input) or
    ``"output"`` (forward hook). ``shape`` excludes the batch axis.
    """

    name: str
    module_path: str
    hook: str
    shape: tuple[int, ...]

    @property
    def location(self) -> str:
        """``module_path:hook``, as stored in HDF5 attributes."""
        return f"{self.module_path}:{self.hook}"


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
                    _pair(module.kernel_size), _pair(module.stride), _pair(module.padding),
                    module.groups, module.bias is not None, inp, out,
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


def _count_convs(module: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in module.modules())


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_TARGETS:
        return all(isinstance(a, fx.Node) for a in node.args[:2])
    return node.op == "call_method" and node.target in ("add", "add_")


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        stack.extend(current.all_input_nodes)
    return seen


def _trace(module: nn.Module) -> fx.GraphModule | None:
    try:
        return fx.symbolic_trace(module)
    except Exception:  # data-dependent control flow: fall back to names
        return None


def _conv_nodes(graph_module: fx.GraphModule, nodes: set[fx.Node]) -> list[fx.Node]:
    modules = dict(graph_module.named_modules())
    return [
        n for n in graph_module.graph.nodes
        if n in nodes and n.op == "call_module" and isinstance(modules.get(n.target), nn.Conv2d)
    ]


def _residual_split(
    graph_module: fx.GraphModule,
) -> tuple[list[fx.Node], list[fx.Node], fx.Node | None] | None:
    """(main-branch conv nodes, shortcut conv nodes, shortcut node) of the last residual add."""
    placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return None
    source = placeholders[0]
    for node in reversed(list(graph_module.graph.nodes)):
        if not _is_add(node):
            continue
        left, right = node.args[0], node.args[1]
        if not (isinstance(left, fx.Node) and isinstance(right, fx.Node)):
            continue
        left_anc, right_anc = _ancestors(left), _ancestors(right)
        if source not in left_anc or source not in right_anc:
            continue
        left_convs = _conv_nodes(graph_module, left_anc)
        right_convs = _conv_nodes(graph_module, right_anc)
        main, short = (left, right) if len(left_convs) >= len(right_convs) else (right, left)
        main_convs = _conv_nodes(graph_module, _ancestors(main))
        short_convs = _conv_nodes(graph_module, _ancestors(short))
        if len(main_convs) < 1:
            continue
        return main_convs, short_convs, short
    return None


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
    needed = _ancestors(short)
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


def _conv_info(
    path: str, module: nn.Conv2d, bn: str | None, shapes: dict[str, tuple]
) -> ConvInfo:
    return ConvInfo(
        path, module.in_channels, module.out_channels, _pair(module.kernel_size),
        _pair(module.stride), _pair(module.padding), module.groups, bn, shapes[path][0],
    )


def _describe_block(
    model_modules: dict[str, nn.Module], path: str, module: nn.Module, shapes: dict[str, tuple]
) -> BlockInfo | None:
    """BlockInfo for ``module`` when it is a residual block; None otherwise."""
    graph_module = _trace(module)
    if graph_module is None:
        return None
    split = _residual_split(graph_module)
    if split is None:
        return None
    main, short_convs, short = split
    sub = dict(module.named_modules())

    def info(node: fx.Node) -> ConvInfo:
        target = str(node.target)
        return _conv_info(f"{path}.{target}", sub[target], _full(path, _bn_after(graph_module, node)), shapes)

    convs = tuple(info(n) for n in main)
    in_shape, out_shape = shapes[path]
    option_a = None
    if short_convs:
        kind = "projection"
    elif short is not None and short.op == "placeholder":
        kind = "identity"
    else:
        function = _shortcut_function(graph_module, short)
        has_params = any(True for _ in function.parameters())
        option_a = None if has_params else _probe_option_a(function, in_shape)
        if option_a is not None and option_a.stride == 1 and option_a.out_channels == in_shape[0]:
            kind, option_a = "identity", None
        else:
            kind = "option_a" if option_a is not None else "other"
    return BlockInfo(
        path, "", convs, kind, tuple(info(n) for n in short_convs), option_a, in_shape, out_shape
    )


def _full(prefix: str, name: str | None) -> str | None:
    return None if name is None else f"{prefix}.{name}"


def _plain_block(path: str, module: nn.Module, shapes: dict[str, tuple]) -> BlockInfo:
    graph_module = _trace(module)
    convs: list[ConvInfo] = []
    if graph_module is not None:
        sub = dict(module.named_modules())
        nodes = set(graph_module.graph.nodes)
        for node in _conv_nodes(graph_module, nodes):
            target = str(node.target)
            convs.append(
                _conv_info(f"{path}.{target}", sub[target], _full(path, _bn_after(graph_module, node)), shapes)
            )
    else:
        for name, child in module.named_modules():
            if isinstance(child, nn.Conv2d):
                convs.append(_conv_info(f"{path}.{name}", child, None, shapes))
    in_shape, out_shape = shapes[path]
    return BlockInfo(path, "", tuple(convs), "none", (), None, in_shape, out_shape)


def _find_blocks(
    module: nn.Module, prefix: str, modules: dict[str, nn.Module], shapes: dict[str, tuple]
) -> list[BlockInfo]:
    blocks: list[BlockInfo] = []
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if _count_convs(child) < 2 or path not in shapes:
            continue
        if isinstance(child, _CONTAINERS):
            blocks.extend(_find_blocks(child, path, modules, shapes))
            continue
        block = _describe_block(modules, path, child, shapes)
        if block is not None:
            blocks.append(block)
            continue
        inner = _find_blocks(child, path, modules, shapes)
        blocks.extend(inner if inner else [_plain_block(path, child, shapes)])
    return blocks


def _with_stage(block: BlockInfo) -> BlockInfo:
    stage = block.name.rpartition(".")[0] or "blocks"
    return BlockInfo(
        block.name, stage, block.convs, block.shortcut, block.shortcut_convs,
        block.option_a, block.input_shape, block.output_shape,
    )


# --------------------------------------------------------------------------- stages


def _stages(
    model: nn.Module, blocks: list[BlockInfo], shapes: dict[str, tuple]
) -> list[StageSpec]:
    if blocks:
        first = blocks[0]
        stages = [StageSpec("stem", first.name, "input", first.input_shape)]
        groups: dict[str, BlockInfo] = {}
        for block in blocks:
            groups[block.stage] = block  # keeps the last block of each group
        for stage, last in groups.items():
            if stage in shapes and stage != "blocks":
                stages.append(StageSpec(stage, stage, "output", shapes[stage][1]))
            else:
                stages.append(StageSpec(stage, last.name, "output", last.output_shape))
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


def _penultimate(model: nn.Module, shapes: dict[str, tuple]) -> StageSpec | None:
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n in shapes]
    if not linears:
        return None
    # The classifier: the last Linear called; its input is the penultimate feature.
    name = linears[-1]
    while True:
        earlier = [n for n in linears if n != name and shapes[n][1] == shapes[name][0]]
        if not earlier:
            break
        name = earlier[-1]
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
