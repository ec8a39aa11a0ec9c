"""The training loop on small synthetic data: learning, schedules, determinism."""

import pytest
import torch

from mnist_cnn.config import OptimConfig, load_config
from mnist_cnn.data import load_mnist
from mnist_cnn.errors import ConfigError, TrainingError
from mnist_cnn.device import seed_everything
from mnist_cnn.train import build_state, fit, lr_factor, to_device

CPU = torch.device("cpu")


def small_run(folder, **overrides):
    cfg = load_config("seed", {"epochs": 2, "batch_size": 32, "run.device": "cpu", "run.progress": False,
                               "run.verify": False, **overrides})
    data = to_device(load_mnist(folder, verify=False, download_missing=False), cfg, CPU)
    seed_everything(cfg.run.seed)
    state = build_state(cfg, CPU, data.steps_per_epoch(cfg.batch_size))
    rows = list(fit(state, data, cfg, CPU))
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
            assert lr_factor(epoch * steps + step, cfg, steps, 20 * steps) == pytest.approx(
                opt.param_groups[0]["lr"])
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
    cfg = load_config("seed", {"val_size": 100, "run.verify": False})
    mnist = load_mnist(synthetic_dir, verify=False, download_missing=False)
    a, b = to_device(mnist, cfg, CPU), to_device(mnist, cfg, CPU)
    assert a.train_images.shape[0] == 500 and a.val_images.shape[0] == 100
    assert torch.equal(a.val_images, b.val_images)
    train_rows = {bytes(x.numpy()) for x in a.train_images}
    assert not any(bytes(x.numpy()) in train_rows for x in a.val_images)


def test_batch_larger_than_dataset_is_refused(synthetic_dir):
    cfg = load_config("seed", {"batch_size": 1000, "run.verify": False})
    with pytest.raises(ConfigError, match="batch_size 1000 is larger than the 600 training images"):
        to_device(load_mnist(synthetic_dir, verify=False, download_missing=False), cfg, CPU)


def test_non_finite_loss_stops_with_epoch_and_step(synthetic_dir):
    cfg = load_config("seed", {"epochs": 1, "run.verify": False})
    data = to_device(load_mnist(synthetic_dir, verify=False, download_missing=False), cfg, CPU)
    state = build_state(cfg, CPU, data.steps_per_epoch(cfg.batch_size))
    with torch.no_grad():
        state.model.head[-1].bias.fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"epoch 1/1: loss became NaN or infinite at step 1"):
        list(fit(state, data, cfg, CPU))
