"""The training loop on small synthetic data: learning, schedules, determinism."""

import pytest
import torch
from torch import nn

from conftest import training_setup, write_synthetic
from mnist_cnn.config import OptimConfig, load_config
from mnist_cnn.data.splits import load_dataset, to_device
from mnist_cnn.errors import ConfigError, TrainingError
from mnist_cnn.networks.builtin import build_model
from mnist_cnn.training.loop import fit_one
from mnist_cnn.training.state import lr_factor

CPU = torch.device("cpu")


def small_run(folder, **overrides):
    cfg = load_config(
        "seed",
        {"epochs": 2, "batch_size": 32, "run.device": "cpu", "run.progress": False, "run.verify": False, **overrides},
    )
    data, state = training_setup(folder, cfg)
    rows = list(fit_one(state, data, cfg))
    return state, rows


def test_fit_learns_synthetic_digits(synthetic_dir):
    state, rows = small_run(synthetic_dir, epochs=3)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["test_acc"] >= 0.9
    assert state.epoch == 3 and state.metrics == rows


def test_same_seed_gives_identical_weights_and_metrics(synthetic_dir):
    a, rows_a = small_run(synthetic_dir, **{"run.seed": 7})
    b, rows_b = small_run(synthetic_dir, **{"run.seed": 7})
    c, _ = small_run(synthetic_dir, **{"run.seed": 8})
    for pa, pb in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(pa, pb)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(rows_a) == strip(rows_b)
    assert not torch.equal(a.model.head[-1].weight, c.model.head[-1].weight)


def test_step_schedule_equals_torch_steplr_per_epoch():
    cfg = OptimConfig()  # step 15, gamma 0.1
    steps = 938  # ceil(60000 / 64)
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    reference = torch.optim.lr_scheduler.StepLR(opt, step_size=15, gamma=0.1)
    for epoch in range(20):
        for step in (0, steps // 2, steps - 1):
            assert lr_factor(epoch * steps + step, cfg, steps, 20 * steps) == pytest.approx(opt.param_groups[0]["lr"])
        opt.step()
        reference.step()


def test_onecycle_and_cosine_start_low_or_high_and_end_near_zero():
    total = 1000
    one = OptimConfig(schedule="onecycle", warmup=0.2)
    factors = [lr_factor(s, one, 100, total) for s in range(total)]
    assert factors[0] < 0.01 and max(factors) == 1.0 and factors.index(1.0) == 199
    assert factors[-1] < 0.01
    cos = OptimConfig(schedule="cosine")
    assert lr_factor(0, cos, 100, total) == 1.0 and lr_factor(total - 1, cos, 100, total) < 1e-4


def test_validation_split_is_carved_from_training_data_and_fixed(synthetic_dir):
    mnist = load_dataset(synthetic_dir, verify=False, download_missing=False)
    a, b = to_device(mnist, CPU, val_size=100), to_device(mnist, CPU, val_size=100)
    assert a.train_images.shape[0] == 500 and a.val_images.shape[0] == 100
    assert torch.equal(a.val_images, b.val_images)
    train_rows = {bytes(x.numpy()) for x in a.train_images}
    assert not any(bytes(x.numpy()) in train_rows for x in a.val_images)


def test_batch_larger_than_dataset_is_refused(synthetic_dir):
    cfg = load_config("seed", {"batch_size": 1000, "run.verify": False})
    with pytest.raises(ConfigError, match="batch_size 1000 is larger than the 600 training images"):
        to_device(load_dataset(synthetic_dir, verify=False, download_missing=False), CPU, batch_size=cfg.batch_size)


def test_non_finite_loss_stops_with_epoch_and_step(synthetic_dir):
    cfg = load_config("seed", {"epochs": 1, "run.verify": False})
    data, state = training_setup(synthetic_dir, cfg)
    with torch.no_grad():
        state.model.head[-1].bias.fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"epoch 1/1: loss became NaN or infinite at step 1"):
        list(fit_one(state, data, cfg))


def test_metrics_lr_is_what_the_optimizer_used_not_the_formula(synthetic_dir):
    """A broken scheduler must show in metrics.csv: the lr column is read from the optimizer."""
    cfg = load_config("seed", {"epochs": 2, "batch_size": 32, "run.verify": False})
    data, state = training_setup(synthetic_dir, cfg)
    # a "buggy" schedule: the lr halves every step instead of following StepLR
    state.scheduler = torch.optim.lr_scheduler.LambdaLR(state.optimizer, lambda step: 0.5**step)
    used = []
    state.optimizer.register_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    rows = list(fit_one(state, data, cfg))
    steps = data.steps_per_epoch(cfg.batch_size)
    assert [r["lr"] for r in rows] == [used[0], used[steps]]
    assert rows[1]["lr"] == pytest.approx(1e-3 * 0.5**steps)


@pytest.mark.numerics
def test_train_loss_is_plain_nll_with_label_smoothing(synthetic_dir):
    """With the weights all but frozen, the reported train loss is the same with and without
    smoothing: it is the plain NLL, whatever loss the gradient comes from."""
    frozen = {"epochs": 1, "optim.lr": 1e-12}
    _, plain = small_run(synthetic_dir, **frozen)
    _, smoothed = small_run(synthetic_dir, **frozen, **{"optim.label_smoothing": 0.2})
    assert smoothed[0]["train_loss"] == pytest.approx(plain[0]["train_loss"], rel=1e-5)


@pytest.mark.parametrize(
    "schedule, steps_per_epoch, total, expected",
    [
        # the seed's StepLR staircase, per step: x0.1 after every 15 epochs, not a step earlier
        ("step", 10, 400, {0: 1.0, 15 * 10 - 1: 1.0, 15 * 10: 0.1, 30 * 10 - 1: 0.1, 30 * 10: 0.01, 400: 0.01}),
        ("cosine", 10, 100, {0: 1.0, 50: 0.5, 100: 0.0}),
        # warmup 0.2 of 100 steps: (step + 1) / 20 up to the peak at 20, then down linearly to 0 at 100
        ("onecycle", 10, 100, {0: 1 / 20, 9: 0.5, 19: 1.0, 20: 1.0, 60: 0.5, 100: 0.0}),
        ("constant", 10, 100, {0: 1.0, 50: 1.0, 100: 1.0}),
    ],
)
def test_each_schedule_gives_its_factor_at_named_steps(schedule, steps_per_epoch, total, expected):
    cfg = OptimConfig(schedule=schedule)  # step_size 15, gamma 0.1, warmup 0.2: the defaults
    got = {step: lr_factor(step, cfg, steps_per_epoch, total) for step in expected}
    assert got == pytest.approx(expected, abs=1e-12)


def test_onecycle_survives_the_scheduler_step_after_a_peak_on_the_last_step():
    """LambdaLR asks for step == total once the last step is done; a one-cycle peak on the last step
    (round(0.95 * 10) = 10) used to divide by zero there."""
    cfg = OptimConfig(schedule="onecycle", warmup=0.95)
    factors = [lr_factor(s, cfg, 5, 10) for s in range(11)]
    assert factors == pytest.approx([(s + 1) / 10 for s in range(10)] + [0.0], abs=1e-12)


def test_precision_auto_picks_bf16_only_where_it_is_native(monkeypatch):
    from mnist_cnn import device as device_module

    # a GPU that only emulates bf16: torch's default answer counts the emulation
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert device_module.resolve_precision("auto", torch.device("cuda")) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert device_module.resolve_precision("auto", torch.device("cuda")) == "bf16"
    monkeypatch.setattr(device_module, "cpu_flags", lambda: {"avx512f", "avx2"})
    assert device_module.resolve_precision("auto", CPU) == "fp32"
    monkeypatch.setattr(device_module, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert device_module.resolve_precision("auto", CPU) == "bf16"
    assert device_module.resolve_precision("fp32", CPU) == "fp32"


def test_requires_python_admits_only_versions_with_tomllib():
    import re
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    low = re.fullmatch(r">=\s*3\.(\d+)", project["requires-python"].strip())
    assert low and int(low.group(1)) >= 11  # tomllib (config.py) is in the standard library from 3.11


def test_the_speed_choices_readme_lists_are_what_runs(tmp_path):
    """channels_last on, fused Adam, evaluation in batches of 1000, and the host reads the device's
    running sums (progress bar, NaN check) only every LOG_EVERY = 50 steps and at the epoch's end:
    seen in the tensors the convolutions get, the optimizer's group and the log calls."""
    write_synthetic(tmp_path / "mnist", n_train=600, n_test=2500)  # evaluation: 1000 + 1000 + 500
    cfg = load_config("seed", {"epochs": 1, "batch_size": 8, "run.precision": "fp32"})
    data, state = training_setup(tmp_path / "mnist", cfg)
    assert state.optimizer.param_groups[0]["fused"] is True
    seen = []  # (training?, batch, channels_last, plain contiguous) at each conv past the 1-channel input

    def record(conv, args):
        (x,) = args
        if x.shape[1] > 1:  # a (N, 1, H, W) tensor is channels_last-contiguous whatever its layout
            layout = (x.is_contiguous(memory_format=torch.channels_last), x.is_contiguous())
            seen.append((conv.training, x.shape[0], *layout))

    for m in state.model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_pre_hook(record)
    syncs = []
    list(fit_one(state, data, cfg, on_log=lambda progress, steps: syncs.append(progress.step)))
    assert data.steps_per_epoch(8) == 75 and syncs == [50, 75]
    convs = 6  # the seed's convolutions after the first
    training = [s for s in seen if s[0]]
    evaluation = [s for s in seen if not s[0]]
    assert training == [(True, 8, True, False)] * 75 * convs
    assert evaluation == [(False, n, True, False) for n in (1000, 1000, 500) for _ in range(convs)]


def test_adamw_decays_the_weights_apart_from_the_gradient(synthetic_dir, tmp_path):
    """optim.name = adamw in a recipe, --set and a tune space: torch's AdamW, whose decay is not Adam's L2."""
    from mnist_cnn.cli import main
    from mnist_cnn.training.state import build_state
    from mnist_cnn.tuning.study import read_space

    cfg = load_config("seed", {"optim.name": "adamw", "optim.weight_decay": 0.05})
    model = build_model("seed")
    state = build_state(model, cfg, torch.device("cpu"), steps_per_epoch=10)
    assert type(state.optimizer) is torch.optim.AdamW and state.optimizer.param_groups[0]["weight_decay"] == 0.05
    finals = {}
    for name in ("adam", "adamw"):
        out = tmp_path / name
        args = ["train", "--data-dir", str(synthetic_dir), "--out", str(out), "--epochs", "1", "--no-verify"]
        args += ["--no-progress", "--device", "cpu", "--set", f"optim.name={name}", "--set", "optim.weight_decay=0.05"]
        assert main(args) == 0
        finals[name] = torch.load(out / "last.pt", weights_only=True)["model"]
    assert not torch.equal(finals["adam"]["head.1.weight"], finals["adamw"]["head.1.weight"])
    recipe = tmp_path / "r.toml"
    recipe.write_text('[optim]\nname = "adamw"\nweight_decay = 0.01\n')
    assert load_config(str(recipe)).optim.name == "adamw"
    space = tmp_path / "space.toml"
    space.write_text('"optim.name" = ["adam", "adamw"]\n')
    (param,) = read_space(str(space), load_config("seed"))
    assert param.key == "optim.name" and list(param.choices) == ["adam", "adamw"]


def test_fit_one_refuses_the_compiled_step_it_does_not_build(synthetic_dir):
    """training.graph builds on training.loop, so fit_one cannot make its step: it says so and trains nothing."""
    cfg = load_config("seed", {"epochs": 1, "run.verify": False, "run.compile": "step"})
    data, state = training_setup(synthetic_dir, cfg)
    before = [p.clone() for p in state.model.parameters()]
    with pytest.raises(ConfigError, match=r"fit_one trains with the default step; for run.compile = step use fit\("):
        list(fit_one(state, data, cfg))
    assert state.epoch == 0 and all(torch.equal(a, b) for a, b in zip(before, state.model.parameters()))


def test_each_process_adds_back_exactly_the_sums_it_evaluated(monkeypatch):
    """Under torchrun evaluate_split adds each process's share over the processes from
    inference.evaluate.summarize()'s mean: the float32 NLL sum and the count come back exactly."""
    from mnist_cnn.training import loop
    from mnist_cnn.training.distributed import World

    cfg = load_config("seed", {"eval_batch_size": 100})
    torch.manual_seed(0)
    model = build_model("seed").eval()
    images = torch.randint(0, 256, (301, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (301,))
    added = []
    monkeypatch.setattr(World, "sum", lambda self, *values: added.append(values) or list(values))
    for rank in (0, 1):
        loop.evaluate_split(model, images, labels, cfg, World(rank, 2))
    whole = loop.evaluate_split(model, images, labels, cfg, World())
    for rank, (loss_sum, correct, confusion) in enumerate(added):
        share = World(rank, 2).shard(301)
        log_probs = loop.predict_log_probs(model, images[share], 100, cfg.run.channels_last)
        assert loss_sum.dtype == torch.float32
        assert torch.equal(loss_sum, torch.nn.functional.nll_loss(log_probs, labels[share], reduction="sum"))
        assert correct.item() == (log_probs.argmax(1) == labels[share]).sum().item()
    assert torch.equal(added[0][2] + added[1][2], whole["confusion"]) and whole["n"] == 301


def test_each_optimizer_and_schedule_table_is_exactly_what_the_config_offers():
    """An optimizer or a schedule is one table entry plus its name among the config field's choices."""
    from mnist_cnn.config import CHOICES
    from mnist_cnn.training.state import OPTIMIZERS, SCHEDULES

    assert sorted(OPTIMIZERS) == sorted(CHOICES["optim.name"])
    assert sorted(SCHEDULES) == sorted(CHOICES["optim.schedule"])
