"""What a designer asks of a network: per-layer shapes, parameters, multiply-accumulates,
receptive field and jump, and the seed's checklist as pass/fail checks.

    layers = describe(model)               # one dict per leaf module, in call order
    print(format_summary(layers))          # the table `mnist-cnn summary` prints
    results = run_checks(model, max_params=20_000, require=["batchnorm", "dropout", "fc"])

The receptive field is measured, not derived from kernel sizes, so it holds for
any architecture (branches, custom forwards): on a copy of the network with every
weight made positive and max-pools swapped for average pools of the same window,
every output unit grows with every input pixel it depends on, so the nonzero
gradient of a unit with respect to the input marks exactly its receptive field.
The centre unit's field is measured on a canvas large enough not to clip it, and
the jump (product of strides) is how far the field moves from one unit to the next.

The checks `gap` and `fc` are judged by what one forward computes (head_of), not by which
module classes the network holds: gap, the last feature map averaged to 1x1 (by any module
or a mean in forward; a max pool is not an average); fc, a Linear applied after the last
feature map, as the seed's classifier (a Linear inside a block is not a head).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from mnist_cnn.data.idx import IMAGE_SIZE

CANVAS = 4 * IMAGE_SIZE  # 112 x 112: wide enough that no centre field of a compact CNN is clipped
POSITIVE = 0.1  # added to |weight|: every weight strictly positive
# A traced output equal to the last map's per-channel mean within these (float32, means of up to 28x28
# values) is that mean; a max pool differs from it by the spread of the values, orders of magnitude more.
MEAN_RTOL = 1e-4
MEAN_ATOL = 1e-5
REQUIREMENTS = ("batchnorm", "dropout", "fc", "gap")
OUTPUT = "(output)"  # the network's own output, after any functional ops in its forward


@dataclass
class Check:
    name: str
    ok: bool
    detail: str  # the figure behind the verdict, e.g. "16,426 <= 20,000"


def leaf_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if name and not list(m.children())}


def record_outputs(
    model: nn.Module, x: torch.Tensor
) -> tuple[list[tuple[str, torch.Tensor, torch.Tensor]], torch.Tensor | None]:
    """Run model(x) with a hook on every leaf: [(name, input, output)] in call order
    (first call of each), and the model's output (None when the forward failed)."""
    calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    seen: set[str] = set()
    handles = []
    for name, module in leaf_modules(model).items():

        def hook(mod, inputs, output, name=name):
            if name not in seen and isinstance(output, torch.Tensor) and inputs and isinstance(inputs[0], torch.Tensor):
                seen.add(name)
                calls.append((name, inputs[0], output))

        handles.append(module.register_forward_hook(hook))
    try:
        final = model(x)
    except Exception:  # a head that only fits 28x28 inputs: the layers before it were recorded
        final = None
    finally:
        for h in handles:
            h.remove()
    return calls, final if isinstance(final, torch.Tensor) else None


def macs(module: nn.Module, out: torch.Tensor) -> int:
    """Multiply-accumulates for one image: convolutions and linear layers (the rest is negligible)."""
    per_image = out[0].numel() if out.dim() > 1 else out.numel()
    if isinstance(module, nn.Conv2d):
        k = module.kernel_size[0] * module.kernel_size[1]
        return per_image * (module.in_channels // module.groups) * k
    if isinstance(module, nn.Linear):
        return per_image * module.in_features
    return 0


def positive_probe(model: nn.Module) -> nn.Module:
    """A float64 copy in eval mode whose every output unit increases with every input pixel it sees."""
    probe = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for p in probe.parameters():
            p.copy_(p.abs() + POSITIVE)
        for m in probe.modules():
            if (
                isinstance(m, nn.modules.batchnorm._BatchNorm)
                and m.running_mean is not None
                and m.running_var is not None
            ):  # both are buffers, or both None (no running stats)
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
    for parent in probe.modules():  # a max-pool passes gradient to one pixel; an average pool to all
        for child_name, child in parent.named_children():
            if isinstance(child, nn.MaxPool2d):
                setattr(
                    parent,
                    child_name,
                    nn.AvgPool2d(child.kernel_size, child.stride, child.padding, ceil_mode=child.ceil_mode),
                )
            elif isinstance(child, nn.AdaptiveMaxPool2d):
                setattr(parent, child_name, nn.AdaptiveAvgPool2d(child.output_size))
    return probe


def field_box(grad: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(top, left, height, width) of the nonzero region of a (H, W) gradient."""
    rows = torch.nonzero(grad.abs().sum(1)).flatten()
    cols = torch.nonzero(grad.abs().sum(0)).flatten()
    if rows.numel() == 0:
        return None
    return int(rows[0]), int(cols[0]), int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def receptive_fields(model: nn.Module, size: int) -> dict[str, dict[str, Any]]:
    """Per leaf: the centre unit's receptive field (side, pixels) and the jump, on a size x size input."""
    probe = positive_probe(model)
    x = torch.ones(1, 1, size, size, dtype=torch.float64, requires_grad=True)
    calls, final = record_outputs(probe, x)
    if final is not None:
        calls.append((OUTPUT, x, final))
    fields = {}
    for name, _, out in calls:
        if out.dim() == 4:
            h, w = out.shape[2] // 2, out.shape[3] // 2
            units = [out[0, :, h, w].sum()] + ([out[0, :, h, w + 1].sum()] if w + 1 < out.shape[3] else [])
        else:  # flattened: every unit of the layer together
            units = [out.sum()]
        boxes = [field_box(torch.autograd.grad(u, x, retain_graph=True)[0][0, 0]) for u in units]
        if boxes[0] is None:
            continue
        fields[name] = {
            "rf": max(boxes[0][2], boxes[0][3]),
            "jump": boxes[1][1] - boxes[0][1] if len(boxes) > 1 and boxes[1] else None,
        }
    return fields


def describe(model: nn.Module) -> list[dict[str, Any]]:
    """One row per leaf module in call order: name, type, output shape (one image), parameters,
    MACs, receptive field on the 28x28 input and, where a wider canvas shows it unclipped, its
    full size and the jump."""
    model = copy.deepcopy(model).cpu().float().eval()
    modules = leaf_modules(model)
    with torch.no_grad():
        calls, final = record_outputs(model, torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.float32))
    # The caller checked the input contract (a forward on 28x28), so the forward above did not fail.
    assert final is not None, "the network failed on a 28x28 image"
    on_image = receptive_fields(model, IMAGE_SIZE)
    wide = receptive_fields(model, CANVAS)
    rows = []
    for name, out in [(name, out) for name, _, out in calls] + [(OUTPUT, final)]:
        m = modules.get(name, model)
        image_rf = on_image.get(name, {}).get("rf")
        full = wide.get(name) if out.dim() == 4 else None  # a flat layer's field on the canvas means nothing
        rows.append(
            {
                "layer": name,
                "type": type(m).__name__,
                "output": list(out.shape[1:]),
                "params": 0 if name == OUTPUT else sum(p.numel() for p in m.parameters(recurse=False)),
                "macs": 0 if name == OUTPUT else macs(m, out),
                "rf": full["rf"] if full else image_rf,  # unclipped where measurable, else within the image
                "rf_in_image": image_rf,
                "jump": full["jump"] if full else None,
            }
        )
    return rows


def totals(model: nn.Module, rows: list[dict[str, Any]]) -> dict[str, Any]:
    last_spatial = next((r for r in reversed(rows) if len(r["output"]) == 3), None)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "macs": sum(r["macs"] for r in rows),
        "rf_last_feature_map": last_spatial["rf"] if last_spatial else None,
        "rf_output_in_image": rows[-1]["rf_in_image"] if rows else None,
    }  # the (output) row


def format_summary(model: nn.Module, rows: list[dict[str, Any]], title: str) -> str:
    lines = [title, f"{'layer':<22} {'type':<18} {'output':<14} {'params':>8} {'MACs':>10} {'RF':>4} {'jump':>4}"]
    for r in rows:
        shape = "x".join(str(d) for d in r["output"])
        jump = "" if r["jump"] is None else str(r["jump"])
        rf = "" if r["rf"] is None else str(r["rf"])
        lines.append(
            f"{r['layer']:<22} {r['type']:<18} {shape:<14} {r['params']:>8,} {r['macs']:>10,} {rf:>4} {jump:>4}"
        )
    t = totals(model, rows)
    lines += [
        f"Total params: {t['params']:,} ({t['trainable']:,} trainable)",
        f"Multiply-accumulates per image: {t['macs']:,}",
        f"Receptive field of the last feature map: {t['rf_last_feature_map']} x {t['rf_last_feature_map']} "
        f"pixels; the output sees {t['rf_output_in_image']} x {t['rf_output_in_image']} of the "
        f"{IMAGE_SIZE} x {IMAGE_SIZE} image",
    ]
    return "\n".join(lines) + "\n"


def summary_text(model: nn.Module, title: str) -> str:
    return format_summary(model, describe(model), title)


class OpTrace(TorchFunctionMode):
    """Every tensor the torch ops of one forward return, in call order, copied (an in-place op
    would change it later), and for each Linear op its weight's (out, in) shape."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[tuple[torch.Tensor, tuple[int, int] | None]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.outputs.append((out.detach().clone(), linear_shape(func, args, kwargs or {})))
        return out


def linear_shape(func: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[int, int] | None:
    """(out, in) of the weight of a Linear op (F.linear is what nn.Linear runs); None for any other op."""
    if func is not F.linear:
        return None
    weight = args[1] if len(args) > 1 else kwargs.get("weight")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    return int(weight.shape[0]), int(weight.shape[1])


@dataclass
class Head:
    """What a network does after its last feature map, as one forward shows it (head_of)."""

    pooled: str | None  # "CxHxW" of the last spatial map when it is averaged to one value per channel
    last_map: str | None  # "CxHxW" of the last map with more than one pixel
    linear: list[tuple[int, int]]  # (in, out) of each Linear op after the last (N, C, H, W) tensor
    elsewhere: list[tuple[int, int]]  # (in, out) of the Linear ops before it


def head_of(model: nn.Module) -> Head:
    """Run a copy of the network on a random batch, tracing every torch op (module or functional):
    the last 4-D output of more than one pixel is the last feature map; it is globally average-pooled
    when a later op returns its per-channel mean, (N, C) or (N, C, 1, 1), as AdaptiveAvgPool2d(1),
    an AvgPool2d over the whole map, GlobalAvgPool and x.mean(dim=(2, 3)) do and a max pool does not.
    The head is what follows the last 4-D tensor of any size."""
    probe = copy.deepcopy(model).cpu().float().eval()
    x = torch.rand(2, 1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    trace = OpTrace()
    try:
        with torch.no_grad(), trace:
            probe(x)
    except Exception:  # the caller checks the contract; a failing forward has no head to speak of
        return Head(None, None, [], [(w[1], w[0]) for _, w in trace.outputs if w])
    outs = [out for out, _ in trace.outputs]
    maps = [i for i, out in enumerate(outs) if out.dim() == 4]
    spatial = [i for i in maps if out_pixels(outs[i]) > 1]
    pooled = last_map = None
    if spatial:
        last = outs[spatial[-1]]
        last_map = "x".join(map(str, last.shape[1:]))
        mean = last.mean(dim=(2, 3))  # (N, C)
        if any(is_mean(out, mean) for out in outs[spatial[-1] + 1 :]):
            pooled = last_map
    head_from = maps[-1] if maps else -1
    linears = [(i, (w[1], w[0])) for i, (_, w) in enumerate(trace.outputs) if w is not None]
    return Head(pooled, last_map, [w for i, w in linears if i > head_from], [w for i, w in linears if i <= head_from])


def out_pixels(out: torch.Tensor) -> int:
    return out.shape[2] * out.shape[3]


def is_mean(out: torch.Tensor, mean: torch.Tensor) -> bool:
    """Whether `out` is `mean`, one value per (image, channel), as (N, C) or (N, C, 1, 1)."""
    if not (out.dim() == 2 or (out.dim() == 4 and out_pixels(out) == 1)):
        return False
    flat = out.flatten(1)
    return flat.shape == mean.shape and torch.allclose(flat, mean, rtol=MEAN_RTOL, atol=MEAN_ATOL)


def run_checks(model: nn.Module, max_params: int | None, require: list[str]) -> list[Check]:
    checks = []
    params = sum(p.numel() for p in model.parameters())
    if max_params is not None:
        ok = params <= max_params
        checks.append(Check("parameters", ok, f"{params:,} {'<=' if ok else '>'} {max_params:,}"))
    modules = list(model.modules())
    head = head_of(model) if {"fc", "gap"} & set(require) else None
    for what in require:
        if what == "batchnorm":
            n = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules)
            checks.append(Check("batchnorm", n > 0, f"{n} BatchNorm layer{'s' * (n != 1)}"))
        elif what == "dropout":
            ps = [m.p for m in modules if isinstance(m, nn.modules.dropout._DropoutNd)]
            checks.append(
                Check(
                    "dropout",
                    bool(ps),
                    f"{len(ps)} Dropout layer{'s' * (len(ps) != 1)}"
                    + (f" (p={', '.join(f'{p:g}' for p in ps)})" if ps else ""),
                )
            )
        elif what == "fc" and head is not None:
            checks.append(Check("fc", bool(head.linear), fc_detail(head)))
        elif what == "gap" and head is not None:
            checks.append(Check("gap", head.pooled is not None, gap_detail(head)))
    return checks


def fc_detail(head: Head) -> str:
    """'2 Linear layers at the head (64->40, 40->10)', and where a failing network has its Linear layers."""
    n = len(head.linear)
    text = f"{n} Linear layer{'s' * (n != 1)} at the head" + (f" ({shapes(head.linear)})" if n else "")
    if not n and head.elsewhere:
        text += f"; {len(head.elsewhere)} before the last feature map ({shapes(head.elsewhere)})"
    return text


def gap_detail(head: Head) -> str:
    if head.pooled is not None:
        return "global average pooling found"
    if head.last_map is None:
        return "global average pooling not found: no feature map of more than one pixel"
    return f"global average pooling not found: the last feature map ({head.last_map}) is not averaged to 1x1"


def shapes(linear: list[tuple[int, int]]) -> str:
    return ", ".join(f"{i}->{o}" for i, o in linear)
