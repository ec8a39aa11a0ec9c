"""run.compile = "step": the whole training step as one function over the epoch's up-front draws."""

import pytest
import torch
from torch import nn

from conftest import EXACT_TOL
from mnist_cnn.cli import main
from mnist_cnn.config import Config, load_config
from mnist_cnn.data.splits import Splits
from mnist_cnn.errors import ConfigError
from mnist_cnn.networks.builtin import MODELS, build_model
from mnist_cnn.training import graph, seeds
from mnist_cnn.training.distill import Teacher
from mnist_cnn.training.graph import EpochInputs, GraphStep, KeyedDropout, keyed_uniform, use_keyed_dropout
from mnist_cnn.training.keys import epoch_order, rng_key
from mnist_cnn.training.loop import NetworkStep, StepSettings, augmented, fit
from mnist_cnn.training.state import TrainState, build_state, restore_state, state_checkpoint

CPU = torch.device("cpu")
IMAGES, BATCH = 200, 64  # 4 steps an epoch, the last of 8 images: both shapes of the step
NO_DROPOUT = {"model_args.dropout": 0.0}
SETTINGS = {"run.device": "cpu", "run.precision": "fp32", "run.channels_last": False, "epochs": 2, "optim.ema": 0.99}


def random_data(n: int = IMAGES) -> Splits:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)
    return Splits(images, torch.randint(0, 10, (n,), generator=g), None, None)


def recipe(compile: str, **extra) -> Config:
    """`best` (one-cycle Adam, label smoothing, scale and elastic warps) with a weight average."""
    return load_config("best", {**SETTINGS, "run.compile": compile, **extra})


class Small(nn.Module):
    """The parts of a network that the step's graphs treat differently -- convolution, BatchNorm
    (running statistics), dropout, a Linear layer -- at a size that traces in seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3, stride=2), nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(4 * 13 * 13, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))))


def new_state(cfg: Config, small: bool = False) -> TrainState:
    """The seed network (without dropout where cfg says so), or Small, with the same initial weights each time."""
    torch.manual_seed(0)
    model = Small() if small else MODELS[cfg.model](**cfg.model_args)
    return build_state(model, cfg, CPU, random_data().steps_per_epoch(cfg.batch_size))


def step_of(state: TrainState, cfg: Config, compiled: bool = False, teacher: Teacher | None = None):
    settings = StepSettings.from_config(cfg)
    if cfg.run.compile == "step":
        steps = random_data().steps_per_epoch(cfg.batch_size)
        return GraphStep(state, cfg, settings, steps, teacher, compiled=compiled)
    return NetworkStep(state, settings, teacher)


def trained(
    state: TrainState, cfg: Config, compiled: bool = False, stop_after: int = 0, teacher: Teacher | None = None
) -> list[dict]:
    """Metrics rows of fit() from where the state stands; stop_after > 0 stops at that call of
    should_stop (fit asks after every step and after every epoch)."""
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) == stop_after

    rows = fit(step_of(state, cfg, compiled, teacher), random_data(), [cfg], should_stop=should_stop)
    return [{k: v for k, v in r[0].items() if k != "seconds"} for r in rows]


def difference(a: nn.Module, b: nn.Module, skip: set[str] = set()) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa if k not in skip)


def test_keyed_uniforms_are_a_fixed_function_of_key_stream_and_index():
    key = torch.tensor([rng_key(3, 2, 917, 1)])
    u = keyed_uniform(key, 200_000, 0)
    assert u.dtype == torch.float32 and 0 <= u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005 and abs((u < 0.1).float().mean().item() - 0.1) < 0.005
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()) < 0.01  # neighbours independent
    assert torch.equal(u, keyed_uniform(key.clone(), 200_000, 0))
    assert torch.equal(u[:1000], keyed_uniform(key, 1000, 0))  # element i's draw depends on i, not on n
    for other in (keyed_uniform(key + 1, 1000, 0), keyed_uniform(key, 1000, 1)):
        assert (other == u[:1000]).float().mean() < 0.01  # another step, another dropout layer: other masks

    dropout = KeyedDropout(0.25, 0)
    x = torch.ones(400, 100)
    dropout.key.fill_(7)
    out = dropout(x)
    assert abs((out == 0).float().mean().item() - 0.25) < 0.01 and torch.equal(out[out != 0], x[out != 0] / 0.75)
    assert torch.equal(out, dropout(x)) and torch.equal(dropout.eval()(x), x)


def test_keyed_dropout_replaces_nn_dropout_and_refuses_other_dropout_modules():
    model = build_model("seed")
    (keyed,) = use_keyed_dropout(model)
    assert keyed.p == 0.1 and sum(isinstance(m, nn.Dropout) for m in model.modules()) == 0
    assert model.state_dict().keys() == build_model("seed").state_dict().keys()  # checkpoints unchanged
    with pytest.raises(ConfigError, match="nn.Dropout only; 1 is Dropout2d"):
        use_keyed_dropout(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Dropout2d(0.1)))


@pytest.mark.parametrize("name", ["best", "seed", "fashion"])
def test_an_epochs_draws_made_up_front_are_the_step_by_step_draws(name):
    """Every image of every step augmented from the epoch's rows is what training.loop.augmented makes
    of it step by step (scale + elastic warps, the seed's two-warp rotation, fashion's flips alone)."""
    cfg = load_config(name)
    s = StepSettings.from_config(cfg)
    images = random_data().train_images
    inputs = EpochInputs.drawn(IMAGES, s, 3, CPU)
    assert torch.equal(inputs.order.flatten()[:IMAGES], epoch_order(IMAGES, cfg.run.seed, 3, CPU))
    step = GraphStep.__new__(GraphStep)  # only its augmented(): the draws, not a network
    step.settings, step.inputs = [s], inputs
    for k in range(4):
        b = min(BATCH, IMAGES - k * BATCH)
        batch = images[inputs.order[k, :b]]
        step.pos = torch.tensor([k])
        assert torch.equal(step.augmented(batch, b), augmented(batch, [s], 3, k))
        assert inputs.dropout_keys[k] == rng_key(cfg.run.seed, 3, k, 1)


@pytest.mark.numerics
@pytest.mark.parametrize("variant", ["adam", "with a teacher", "sgd"])
def test_the_graph_step_run_eagerly_trains_bitwise_as_the_default_step(variant):
    """Without dropout (the one draw that differs), two epochs of one-cycle Adam with a weight average,
    the augmentation and the short last batch end bitwise alike: weights, average, Adam state,
    the schedule's state and every metric; with a teacher's soft targets in the loss, and with SGD."""
    extra = {**NO_DROPOUT, **({"optim.name": "sgd", "optim.momentum": 0.9} if variant == "sgd" else {})}
    a_cfg, b_cfg = recipe("no", **extra), recipe("step", **extra)
    a, b = new_state(a_cfg), new_state(b_cfg)
    teacher = Teacher([new_state(a_cfg, small=True).model], 4.0, False) if variant == "with a teacher" else None
    assert trained(a, a_cfg, teacher=teacher) == trained(b, b_cfg, teacher=teacher)
    assert difference(a.model, b.model) == 0 and difference(a.evaluated, b.evaluated) == 0
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    keys = ("momentum_buffer",) if variant == "sgd" else ("exp_avg", "exp_avg_sq", "step")
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in keys)
    assert a.scheduler.state_dict() == b.scheduler.state_dict()  # what a checkpoint saves of it
    assert b.scheduler.last_epoch == 8 and isinstance(b.optimizer.param_groups[0]["lr"], torch.Tensor)


@pytest.mark.numerics
def test_the_compiled_step_equals_the_step_run_eagerly(float64, monkeypatch):
    """torch.compile of the whole step (dynamo + AOTAutograd: the graphs that inductor turns into code)
    against the same function run eagerly, keyed dropout included, in float64. What differs is the
    decompositions' rounding: on the seed network 3e-10 after 8 steps, in the conv biases that BatchNorm
    cancels (their gradient is rounding noise that Adam scales up), < 1e-12 elsewhere. A network
    smaller than the seed's keeps the tracing short. Writing the learning rate inside the compiled
    function, which left the compiled optimizer reading a stale one, moved the seed network's weights
    by 4e-3 in 3 steps: far outside these tolerances."""
    monkeypatch.setattr(graph, "BACKEND", "aot_eager")
    cfg = recipe("step")
    eager, compiled = new_state(cfg, small=True), new_state(cfg, small=True)
    rows_eager, rows_compiled = trained(eager, cfg), trained(compiled, cfg, compiled=True)
    for re, rc in zip(rows_eager, rows_compiled):
        assert rc["train_loss"] == pytest.approx(re["train_loss"], rel=EXACT_TOL) and rc["lr"] == re["lr"]
    assert rows_eager[-1]["train_acc"] == rows_compiled[-1]["train_acc"]
    noise = {"conv.bias", "bn.running_mean"}
    assert difference(eager.model, compiled.model, skip=noise) < EXACT_TOL
    assert difference(eager.model, compiled.model) < 1e-7
    assert difference(eager.evaluated, compiled.evaluated, skip=noise) < EXACT_TOL
    assert difference(eager.model, new_state(cfg, small=True).model) > 1e-3  # it trained
    assert type(compiled.model.head[1]) is nn.Dropout  # given back when the epochs ended


@pytest.mark.numerics
@pytest.mark.parametrize("first", ["step", "no"])
def test_a_stopped_run_continues_exactly_in_either_kind_of_step(first):
    """Stopped after 5 steps (one into epoch 2) and restored from its checkpoint, a run continues to the
    weights of an uninterrupted one, with the same kind of step or with the other (graph <-> default)."""
    cfg = recipe(first, **NO_DROPOUT)
    whole = new_state(cfg)
    trained(whole, cfg)
    for kind in ("step", "no"):
        stopped = new_state(cfg)
        trained(stopped, cfg, stop_after=6)
        assert stopped.partial is not None and (stopped.partial.epoch, stopped.partial.step) == (2, 1)
        ckpt = state_checkpoint(stopped, cfg)
        again = recipe(kind, **NO_DROPOUT)
        resumed = new_state(again)
        restore_state(resumed, ckpt, "stopped")
        group = resumed.optimizer.param_groups[0]
        assert isinstance(group["lr"], torch.Tensor) == (kind == "step") and group["capturable"] == (kind == "step")
        trained(resumed, again)
        assert difference(whole.model, resumed.model) == 0 and difference(whole.evaluated, resumed.evaluated) == 0


def test_train_with_the_step_compiled(synthetic_dir, tmp_path, monkeypatch, capsys):
    """The command a user types; the backend that generates no code keeps the test short (inductor is
    the same graphs turned into C++, measured in benchmarks/train_throughput.py)."""
    monkeypatch.setattr(graph, "BACKEND", "eager")
    epochs = []
    real = GraphStep.epoch
    monkeypatch.setattr(GraphStep, "epoch", lambda self, *a: epochs.append(1) or real(self, *a))
    out = tmp_path / "run"
    common = ["--data-dir", str(synthetic_dir), "--no-verify", "--no-progress", "--device", "cpu"]
    assert main(["train", "--epochs", "1", "--set", "run.compile=step", "--out", str(out), *common]) == 0
    assert epochs == [1] and 'compile = "step"' in (out / "config.toml").read_text()
    assert main(["evaluate", str(out / "last.pt"), *common[:3]]) == 0
    capsys.readouterr()
    stack = ["train", "--seeds", "0-1", "--together", "yes", "--set", "run.compile=step", "--out", str(tmp_path / "s")]
    assert main([*stack, *common]) == 2
    err = capsys.readouterr().err
    assert "run.compile = step trains one network at a time; with it, use --together no" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "s").exists()
    assert load_config("seed", {"run.compile": True}).run.compile == "model"  # older configs said true/false
    assert load_config("seed", {"run.compile": False}).run.compile == "no"
    with pytest.raises(ConfigError, match="run.compile must be one of"):
        load_config("seed", {"run.compile": "graph"})


def test_under_torchrun_the_graph_step_is_refused_before_anything_runs(synthetic_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets: each process would train its share
    out = tmp_path / "run"
    cmd = ["train", "--set", "run.compile=step", "--data-dir", str(synthetic_dir), "--no-verify", "--out", str(out)]
    assert main(cmd) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("run.compile = step trains in one process; under torchrun use run.compile = no")
    assert len(err.splitlines()) == 1 and not out.exists()


def test_seeds_on_cuda_are_not_stacked_by_default_with_the_graph_step(monkeypatch):
    """--seeds (and tune --val-seeds) stack on CUDA when run.together is auto; not a run.compile = step run."""
    monkeypatch.setattr(seeds, "pick_device", lambda name: torch.device("cuda"))
    assert seeds.stacks(load_config("seed"), [0, 1])
    assert not seeds.stacks(load_config("seed", {"run.compile": "step"}), [0, 1])
    assert seeds.stacks(load_config("seed", {"run.compile": "step", "run.together": "yes"}), [0, 1])  # refused later
