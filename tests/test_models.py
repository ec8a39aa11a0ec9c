"""The seed network against the seed notebook's own four checks, and more."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mnist_cnn.device import seed_everything
from mnist_cnn.networks.builtin import MODELS, SeedNet, build_model, count_parameters


def test_seed_parameter_count_is_16426_and_under_20k():
    model = build_model("seed")
    assert count_parameters(model) == 16_426
    assert count_parameters(model) < 20_000


def test_batchnorm_follows_six_of_the_seven_convolutions():
    layers = [m for m in build_model("seed").modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    convs = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
    assert len(convs) == 7
    followed = [i for i in convs if i + 1 < len(layers) and isinstance(layers[i + 1], nn.BatchNorm2d)]
    assert len(followed) == 6
    # the one without BN is the 1x1 squeeze (32 -> 8)
    lone = layers[next(i for i in convs if i not in followed)]
    assert lone.kernel_size == (1, 1) and (lone.in_channels, lone.out_channels) == (32, 8)


def test_dropout_is_present_with_p_0_1():
    drops = [m for m in build_model("seed").modules() if isinstance(m, nn.Dropout)]
    assert [d.p for d in drops] == [0.1]


def test_head_is_two_linear_layers_without_global_average_pooling():
    from mnist_cnn.networks.summary import head_of

    head = head_of(build_model("seed"))  # traces every op: modules, GlobalAvgPool and x.mean alike
    assert (head.pooled, head.last_map, head.linear) == (None, "16x2x2", [(64, 40), (40, 10)])


def test_output_is_n_by_10_and_log_softmax_gives_log_probabilities():
    from mnist_cnn.data.contract import Normalized

    model = build_model("seed").eval()
    x = torch.rand(5, 1, 28, 28)
    logits = model((x - 0.1307) / 0.3081)
    assert logits.shape == (5, 10)
    out = Normalized(model)(x)  # [0, 1] images in: normalization and log-softmax around the network
    assert torch.allclose(out, torch.log_softmax(logits, dim=1), atol=1e-6)
    assert torch.allclose(out.exp().sum(dim=1), torch.ones(5), atol=1e-5)
    # a network that already returns log-probabilities gets the same answer (log_softmax is idempotent)
    assert torch.allclose(torch.log_softmax(out, dim=1), out, atol=1e-6)


def test_registry_builds_fresh_models_and_refuses_unknown_names():
    assert MODELS["seed"] is SeedNet
    assert build_model("seed") is not build_model("seed")
    with pytest.raises(KeyError):
        build_model("no-such-model")


def test_tiny_has_at_most_8000_parameters_and_the_same_contract():
    model = build_model("tiny").eval()
    assert count_parameters(model) == 7_578 <= 8_000
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_tiny_widths_are_a_model_arg(synthetic_dir):
    from mnist_cnn.errors import ConfigError
    from mnist_cnn.networks.reference import create, locate

    wider = create(locate("tiny"), 10, {"widths": [8, 12, 16, 16, 18]})
    # 9 * (1*8 + 8*12 + 12*16 + 16*16 + 16*18) conv weights + 2 * 70 BatchNorm + 18 * 10 + 10 head
    assert count_parameters(wider) == 7_890
    assert wider(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ConfigError, match="widths must be five positive channel counts"):
        create(locate("tiny"), 10, {"widths": [8, 12]})


@pytest.mark.parametrize("widths, count", [((12, 18, 24), 15_802), ((8, 12, 16), 7_154), ((10, 20, 24), 16_360)])
def test_vgg_widths_are_scalar_model_args_and_its_size_follows_the_formula(widths, count):
    from mnist_cnn.networks.reference import create, locate

    w1, w2, w3 = widths
    model = create(locate("vgg"), 10, {"w1": w1, "w2": w2, "w3": w3})
    formula = 9 * (w1 + w1 * w1 + w1 * w2 + w2 * w2 + w2 * w3 + w3 * w3) + 4 * (w1 + w2 + w3) + 10 * w3 + 10
    assert count_parameters(model) == formula == count
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def family_size(w, d, squeeze, head, classes=10):
    """The family's parameters by hand: 3x3 convs (bias-free) and BatchNorm per stage, the squeeze, the head."""
    total, c = 0, 1
    for width, depth in zip(w, d):
        for _ in range(depth):
            total += 9 * c * width + 2 * width
            c = width
    if squeeze:
        total += c * squeeze + 2 * squeeze
        c = squeeze
    return total + (c if head == "gap" else 9 * c) * classes + classes


@pytest.mark.parametrize(
    "w, d, squeeze, head",
    [
        ((12, 18, 24), (2, 2, 2), 0, "gap"),
        ((8, 16, 24), (1, 2, 3), 0, "gap"),
        ((16, 16, 32), (2, 2, 1), 8, "fc"),
        ((8, 8, 8), (1, 1, 1), 4, "gap"),
    ],
)
def test_family_choices_are_scalar_model_args_and_its_size_follows_the_formula(w, d, squeeze, head):
    from mnist_cnn.networks.reference import create, locate

    args = {"w1": w[0], "w2": w[1], "w3": w[2], "d1": d[0], "d2": d[1], "d3": d[2], "squeeze": squeeze, "head": head}
    model = create(locate("family"), 10, args)
    assert count_parameters(model) == family_size(w, d, squeeze, head)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == sum(d)


def test_family_at_its_defaults_computes_what_vgg_does():
    vgg, family = build_model("vgg"), build_model("family")
    assert count_parameters(family) == count_parameters(vgg) == 15_802
    family.load_state_dict(dict(zip(family.state_dict(), vgg.state_dict().values())))
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(family.eval()(x), vgg.eval()(x))


@pytest.mark.parametrize(
    "args, message",
    [({"d2": 0}, "widths and depths must be positive"), ({"head": "mlp"}, "head must be one of gap, fc")],
)
def test_family_refuses_impossible_choices(args, message):
    from mnist_cnn.errors import ConfigError
    from mnist_cnn.networks.reference import create, locate

    with pytest.raises(ConfigError, match=message):
        create(locate("family"), 10, args)


# Modules whose CUDA backward has no deterministic kernel: --deterministic would crash on them.
NONDETERMINISTIC_ON_CUDA = (
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveAvgPool3d,
    nn.MaxPool3d,
    nn.FractionalMaxPool2d,
    nn.ReflectionPad2d,
    nn.ReplicationPad2d,
    nn.Upsample,
)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_registered_models_use_no_module_without_a_deterministic_cuda_backward(name):
    model = build_model(name)
    assert not [m for m in model.modules() if isinstance(m, NONDETERMINISTIC_ON_CUDA)]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.numerics
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_registered_models_train_with_deterministic_algorithms(name, device):
    """Two optimizer steps under torch.use_deterministic_algorithms(True) (what --deterministic sets):
    no kernel refuses, and the same steps from the same start give bitwise the same weights."""

    def two_steps() -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = build_model(name).to(device).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        x = torch.randn(8, 1, 28, 28, device=device, generator=torch.Generator(device).manual_seed(1))
        y = torch.arange(8, device=device) % 10
        for _ in range(2):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
        assert torch.isfinite(loss)
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    seed_everything(0, deterministic=True)  # what --deterministic sets, CUBLAS_WORKSPACE_CONFIG included
    try:
        first, second = two_steps(), two_steps()
    finally:
        torch.use_deterministic_algorithms(False)
    torch.manual_seed(0)
    start = build_model(name).state_dict()
    assert any(not torch.equal(first[k], start[k]) for k in start)  # it trained
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_global_average_pool_equals_adaptive_average_pool():
    from mnist_cnn.networks.builtin import GlobalAvgPool

    x = torch.randn(4, 16, 6, 6)
    assert torch.allclose(GlobalAvgPool()(x), nn.AdaptiveAvgPool2d(1)(x).flatten(1), atol=1e-6)


def test_the_documented_family_space_builds_networks_of_every_choice():
    """docs/family-space.toml: every key is a family model arg and every corner of it builds."""
    import optuna

    from mnist_cnn.config import load_config
    from mnist_cnn.networks.reference import config_network_size
    from mnist_cnn.tuning.study import read_space

    base = load_config("seed", {"model": "family"})
    space = read_space(str(Path(__file__).resolve().parents[1] / "docs" / "family-space.toml"), base)
    assert {p.key.removeprefix("model_args.") for p in space} == {"w1", "w2", "w3", "d1", "d2", "d3", "squeeze", "head"}
    for corner in ("low", "high"):
        values = {
            p.key: (p.choices[-1 if corner == "high" else 0] if p.choices else int(getattr(p, corner))) for p in space
        }
        trial = optuna.trial.FixedTrial(values)
        args = {p.key.removeprefix("model_args."): p.suggest(trial) for p in space}
        assert config_network_size("family", "mnist", args) > 0


# --- bounds on a network, checked on the meta device before it is built (issue 34) ------------------------------


@pytest.mark.parametrize(
    "name, num_classes, model_args, message",
    [
        ("seed", 200_000_000, {}, "num_classes must be 1..1,000 (MAX_CLASSES), got 200000000"),
        ("seed", 0, {}, "num_classes must be 1..1,000 (MAX_CLASSES), got 0"),
        ("tiny", 10, {"widths": [8, 12, 16, 1000, 100_000]}, "past the bound of 100,000,000 (MAX_PARAMETERS)"),
        ("vgg", 10, {"w1": 10**12}, "past the bound of 100,000,000 (MAX_PARAMETERS)"),
        ("family", 10, {"d2": 10**9, "w2": 1}, "more than 2,000 parameter tensors (MAX_PARAMETER_TENSORS)"),
        ("vgg", 10, {"w1": 2**70}, "cannot build it: TypeError"),  # past the int64 sizes torch takes
    ],
)
def test_a_network_past_a_bound_is_refused_before_it_is_built(name, num_classes, model_args, message):
    from mnist_cnn.errors import ConfigError
    from mnist_cnn.networks.reference import create, locate

    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        create(locate(name), num_classes, model_args)
    assert "\n" not in str(info.value)


def test_building_on_the_meta_device_first_draws_nothing_from_the_seeded_generator():
    """create() builds each network twice (meta, then real): the real one's weights are still the seed's."""
    from mnist_cnn.networks.reference import create, locate

    torch.manual_seed(3)
    direct = SeedNet()
    torch.manual_seed(3)
    created = create(locate("seed"), 10)
    assert all(torch.equal(a, b) for a, b in zip(direct.state_dict().values(), created.state_dict().values()))
