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
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mnist_cnn.data.idx import IMAGE_SIZE

CANVAS = 4 * IMAGE_SIZE  # 112 x 112: wide enough that no centre field of a compact CNN is clipped
POSITIVE = 0.1  # added to |weight|: every weight strictly positive
GAP_MODULES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
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


def has_gap(model: nn.Module) -> bool:
    """A global average pool: a known module, a parameter-free layer that turns an HxW map
    (H, W > 1) into one value per channel, or a forward that returns the spatial mean of
    its last feature map (x.mean(dim=(2, 3)))."""
    if any(isinstance(m, GAP_MODULES) for m in model.modules()):
        return True
    probe = copy.deepcopy(model).cpu().float().eval()
    leaves = leaf_modules(probe)
    with torch.no_grad():
        calls, final = record_outputs(probe, torch.rand(2, 1, IMAGE_SIZE, IMAGE_SIZE))
    for name, inp, out in calls:
        if (
            inp.dim() == 4
            and inp.shape[2] * inp.shape[3] > 1
            and not list(leaves[name].parameters())
            and out[0].numel() == inp.shape[1]
        ):
            return True
    maps = [out for _, _, out in calls if out.dim() == 4 and out.shape[2] * out.shape[3] > 1]
    return (
        final is not None
        and bool(maps)
        and maps[-1].shape[:2] == final.shape
        and torch.allclose(maps[-1].mean(dim=(2, 3)), final, atol=1e-5)
    )


def run_checks(model: nn.Module, max_params: int | None, require: list[str]) -> list[Check]:
    checks = []
    params = sum(p.numel() for p in model.parameters())
    if max_params is not None:
        ok = params <= max_params
        checks.append(Check("parameters", ok, f"{params:,} {'<=' if ok else '>'} {max_params:,}"))
    modules = list(model.modules())
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
        elif what == "fc":
            fcs = [m for m in modules if isinstance(m, nn.Linear)]
            shapes = ", ".join(f"{m.in_features}->{m.out_features}" for m in fcs)
            checks.append(
                Check(
                    "fc", bool(fcs), f"{len(fcs)} Linear layer{'s' * (len(fcs) != 1)}" + (f" ({shapes})" if fcs else "")
                )
            )
        elif what == "gap":
            found = has_gap(model)
            checks.append(Check("gap", found, "global average pooling " + ("found" if found else "not found")))
    return checks
