"""query_fn: the fast forward-only path is the model's own function, or it is not used."""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
from torch import Tensor, nn

import robcomp.models
from robcomp.attacks import queries
from robcomp.attacks.queries import ENV, RTOL, Query, query_fn
from robcomp.compress.quantize import Int8PTQ
from robcomp.models.capabilities import Capabilities
from test_compressors import _fake_data

SHAPES = {"small_cnn": (1, 28, 28), "lenet5": (1, 28, 28), "resnet20": (3, 32, 32)}


def _model(name: str) -> nn.Module:
    """A zoo model behind Normalize, with BatchNorm statistics that are not the identity (so
    folding them into the convolutions changes the weights)."""
    torch.manual_seed(0)
    channels = SHAPES[name][0]
    model = robcomp.models.create(
        name, 10, SHAPES[name], mean=(0.4,) * channels, std=(0.3,) * channels
    ).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model


def _inputs(n: int, shape: tuple[int, ...], seed: int = 0) -> Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


def _eager(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        out: Tensor = model(x)
        return out


def _assert_same(out: Tensor, ref: Tensor) -> None:
    """Equal up to float32 rounding: within RTOL of each row's largest logit, same argmax."""
    scale = ref.abs().amax(dim=1, keepdim=True)
    assert ((out - ref).abs() <= RTOL * scale).all()
    assert torch.equal(out.argmax(1), ref.argmax(1))


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[nn.Module]:
    """The models the fast path is built for, one entry per build."""
    built: list[nn.Module] = []
    build = queries._build

    def spy(model: nn.Module, *args: object) -> object:
        built.append(model)
        return build(model, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(queries, "_build", spy)
    return built


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_the_fast_path_gives_eagers_logits(name: str) -> None:
    model = _model(name)
    query = query_fn(model, fast=True)
    x = _inputs(16, SHAPES[name])
    out = query(x)
    assert query.served == "fast", query.reason
    _assert_same(out, _eager(model, x))


def test_shrinking_batches_are_served_by_one_graph(builds: list[nn.Module]) -> None:
    """Points retire during an attack: every smaller batch runs on the graph built for the
    first, and gives eager's logits."""
    model = _model("resnet20")
    query = query_fn(model, fast=True)
    x = _inputs(12, SHAPES["resnet20"])
    for n in (12, 11, 7, 2, 1, 7):
        out = query(x[:n])
        assert query.served == "fast", query.reason
        _assert_same(out, _eager(model, x[:n]))
    assert len(builds) == 1
    assert query(x[:0]).shape == (0, 10)


def test_eager_is_consulted_on_the_first_batch_and_a_few_sizes_only() -> None:
    model = _model("small_cnn")
    eager_calls: list[int] = []
    model.register_forward_hook(lambda module, args, out: eager_calls.append(args[0].shape[0]))
    x = _inputs(9, SHAPES["small_cnn"])
    query = query_fn(model, fast=True)
    for n in (9, 8, 7):
        query(x[:n])
    assert eager_calls[-3:] == [9, 8, 7]  # compared (building also ran the model)
    called = len(eager_calls)
    for n in (6, 5, 9, 1):
        query(x[:n])
        assert query.served == "fast", query.reason
    assert len(eager_calls) == called
    query_fn(model, fast=True)(x[:4])  # a new query compares its first batch
    assert eager_calls[-1] == 4


def test_no_autograd_graph_is_built() -> None:
    model = _model("small_cnn")
    x = _inputs(4, SHAPES["small_cnn"]).requires_grad_(True)
    for fast in (True, False):
        out = query_fn(model, fast=fast)(x)
        assert not out.requires_grad and out.grad_fn is None


def test_new_weights_are_served_never_a_stale_graph(builds: list[nn.Module]) -> None:
    """Freezing copies the weights into the graph: an optimizer step, an in-place update under
    no_grad, load_state_dict and a replaced BatchNorm buffer each rebuild it, for the same
    query object and the same batch shape."""
    model = _model("resnet20")
    query = query_fn(model, fast=True)
    x = _inputs(6, SHAPES["resnet20"])
    query(x)
    other = _model("resnet20")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))

    def sgd_step() -> None:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model.zero_grad()
        model(x).logsumexp(1).sum().backward()  # eval mode: BatchNorm statistics stay
        optimizer.step()

    def scale_in_place() -> None:
        with torch.no_grad():
            model.net.conv1.weight.mul_(1.5)

    def replace_buffer() -> None:
        model.net.bn1.running_mean = torch.full_like(model.net.bn1.running_mean, 0.3)

    for change in (
        sgd_step,
        scale_in_place,
        lambda: model.load_state_dict(other.state_dict()),
        replace_buffer,
    ):
        before = _eager(model, x)
        change()
        after = _eager(model, x)
        assert not torch.allclose(before, after)  # the change matters
        out = query(x)
        assert query.served == "fast"
        _assert_same(out, after)
    assert len(builds) == 5


def test_weights_written_through_data_are_caught_by_a_new_query() -> None:
    """``.data`` writes bump no version counter; a new query compares its first batch with
    eager and rebuilds the graph."""
    model = _model("small_cnn")
    x = _inputs(6, SHAPES["small_cnn"])
    query_fn(model, fast=True)(x)
    for p in model.parameters():
        p.data.mul_(1.3)  # the old graph is now stale
    query = query_fn(model, fast=True)
    out = query(x)
    assert query.served == "fast", query.reason
    _assert_same(out, _eager(model, x))


def test_a_new_forward_hook_is_run(builds: list[nn.Module]) -> None:
    model = _model("lenet5")
    query = query_fn(model, fast=True)
    x = _inputs(4, SHAPES["lenet5"])
    query(x)
    model.net.register_forward_hook(lambda module, args, out: out * 2)
    out = query(x)
    _assert_same(out, _eager(model, x))
    assert len(builds) == 2


class _Branches(nn.Module):
    """Python control flow on the data: a trace would keep only the branch it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        if x.mean() > 0.5:
            return self.fc(x)
        return -self.fc(x)


class _HiddenBranches(_Branches):
    """The same branch with the TracerWarning silenced by the model's own code, as some
    libraries do: the warning cannot be what catches it."""

    def forward(self, x: Tensor) -> Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            high = bool(x.mean() > 0.5)
        return self.fc(x) if high else -self.fc(x)


class _PerRow(nn.Module):
    """Traces without a warning but fixes the batch size: the graph fails on any other size."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([self.fc(row) for row in x.unbind(0)])


def test_a_graph_failing_at_other_sizes_is_rebuilt_at_most_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Shrinking batches (points retiring) must not retrace the model at every size."""
    builds = []
    build = queries._build

    def counted(*args: object) -> object:
        builds.append(1)
        return build(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(queries, "_build", counted)
    model = _PerRow().eval()
    query = query_fn(model, fast=True)
    x = torch.rand(12, 4)
    for n in range(12, 4, -1):
        torch.testing.assert_close(query(x[:n]), _eager(model, x[:n]))
    assert len(builds) <= 2 and query.served == "eager"


def test_autocast_runs_eagerly() -> None:
    model = _model("small_cnn")
    query = query_fn(model, fast=True)
    x = _inputs(4, SHAPES["small_cnn"])
    query(x)
    assert query.served == "fast"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = query(x)
        assert query.served == "eager" and "autocast" in (query.reason or "")
        assert torch.equal(out, _eager(model, x))


class _Noisy(nn.Module):
    """Random even in eval mode (randomized smoothing-style noise)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x + 0.1 * torch.randn_like(x))


class _Dropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.drop = nn.Linear(4, 3), nn.Dropout(0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc(x))


class _DeclaresInt8(nn.Module):
    """Stands for an int8 model: it declares its own execution (see capabilities)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)

    def capabilities(self) -> Capabilities:
        return Capabilities(gradients=False, trainable=False, pinned=True, eager=True)


class _Parameterless(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.flip(1)


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda: _Branches().eval(), "reads tensor values into Python"),
        (lambda: _HiddenBranches().eval(), "reads tensor values into Python"),
        (lambda: _Noisy().eval(), "random"),
        (lambda: _Dropout().train(), "training mode"),
        (lambda: _DeclaresInt8().eval(), "its own execution"),
        (lambda: _Parameterless().eval(), "no parameters"),
    ],
)
def test_models_the_trace_cannot_vouch_for_run_eagerly(make: object, why: str) -> None:
    torch.manual_seed(0)
    model = make()  # type: ignore[operator]
    query = query_fn(model, fast=True)
    high, low = torch.full((2, 4), 0.9), torch.full((2, 4), 0.1)
    for x in (high, low):
        torch.manual_seed(1)
        out = query(x)
        assert query.served == "eager" and why in (query.reason or "")
        torch.manual_seed(1)
        assert torch.equal(out, _eager(model, x))


def test_a_graph_that_differs_from_eager_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check on the first batch: a wrong graph (here: one that adds 1e-2 to the logits)
    never answers a query."""
    optimize = torch.jit.optimize_for_inference

    def wrong(module: torch.jit.ScriptModule) -> object:
        graph = optimize(module)
        return lambda x: graph(x) + 1e-2

    monkeypatch.setattr(torch.jit, "optimize_for_inference", wrong)
    model = _model("small_cnn")
    query = query_fn(model, fast=True)
    x = _inputs(5, SHAPES["small_cnn"])
    for _ in range(2):
        out = query(x)
        assert query.served == "eager" and "differs from eager" in (query.reason or "")
        assert torch.equal(out, _eager(model, x))


def test_the_off_switch(monkeypatch: pytest.MonkeyPatch, builds: list[nn.Module]) -> None:
    model = _model("small_cnn")
    x = _inputs(3, SHAPES["small_cnn"])
    monkeypatch.setenv(ENV, "0")
    query = query_fn(model)
    assert torch.equal(query(x), _eager(model, x))
    assert query.served == "eager" and ENV in (query.reason or "")
    assert query_fn(model, fast=True)(x) is not None and len(builds) == 1  # argument wins
    monkeypatch.setenv(ENV, "1")
    assert isinstance(query_fn(model), Query) and query_fn(model).fast


def test_the_cache_does_not_keep_a_model_alive() -> None:
    model = _model("small_cnn")
    query_fn(model, fast=True)(_inputs(2, SHAPES["small_cnn"]))
    assert model in queries._GRAPHS
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


@pytest.mark.slow  # quantizing takes seconds; the fast tier has the declared-int8 stand-in
def test_an_int8_model_runs_its_own_kernels() -> None:
    """A real int8 model (oneDNN kernels, packed weights outside its parameters) is queried
    as it is, not traced."""
    data = _fake_data((1, 8, 8), n=16)
    torch.manual_seed(0)
    float_model = robcomp.models.create("tiny_cnn", 10, (1, 8, 8)).eval()
    int8, _ = Int8PTQ(compile=False, calibration_batches=1, batch_size=8)(float_model, data)
    query = query_fn(int8, fast=True)
    x = _inputs(4, (1, 8, 8))
    out = query(x)
    assert query.served == "eager" and "its own execution" in (query.reason or "")
    assert torch.equal(out, _eager(int8, x))
