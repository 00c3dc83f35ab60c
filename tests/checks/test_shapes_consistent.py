"""shapes_consistent: direct calls on healthy and planted-bug models, usage errors, the marker."""
import pytest
import torch
from torch import nn

from pytest_modelcheck import Batch, UsageError
from pytest_modelcheck.checks import shapes_consistent


def _x(n=4, features=4, seed=0):
    return torch.randn(n, features, generator=torch.Generator().manual_seed(seed))


def _linear(i=4, o=3):
    torch.manual_seed(0)
    return nn.Linear(i, o)


class PairMixer(nn.Module):
    """``view(-1, 12)`` on 6 features per sample: glues samples in pairs, raises for odd B."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, 6)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.embed(x).view(-1, 12))


class InPlaceScaler(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        x.mul_(2)
        return self.lin(x)


class TwoHeads(nn.Module):
    def __init__(self, classes=3, angle_dims=2):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(4, 8)
        self.cls = nn.Linear(8, classes)
        self.ang = nn.Linear(8, angle_dims)

    def forward(self, x):
        h = torch.relu(self.trunk(x))
        return {"logits": self.cls(h), "angles": self.ang(h)}


class WidthFollowsBatch(nn.Module):
    """Returns B + 2 columns: the class count changes with the batch size."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 8)

    def forward(self, x):
        return self.lin(x)[:, : x.shape[0] + 2]


class FlattenHead(nn.Module):
    """Conv + Flatten + Linear sized for 8x8 images only."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(2 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(self.flat(torch.relu(self.conv(x))))


class PooledHead(nn.Module):
    """Conv + global pooling: any H and W. Records the input shapes it was called with."""

    seen = []  # class attribute: shared by the copies the check makes

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 5)

    def forward(self, x):
        PooledHead.seen.append(tuple(x.shape))
        return {"logits": self.fc(self.pool(torch.relu(self.conv(x))).flatten(1)),
                "mask": torch.sigmoid(self.conv(x))}


class PulseSum(nn.Module):
    """A packed batch: pulses (P, F) with the event index of each pulse; one output per event."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Linear(3, 2)

    def forward(self, pulses, event):
        h = self.enc(pulses)
        out = torch.zeros(int(event.max()) + 1, 2, dtype=h.dtype)
        return out.index_add(0, event, h)


def _make_pulses(requested):
    def make_batch(n):
        requested.append(n)
        g = torch.Generator().manual_seed(n)
        event = torch.arange(n).repeat_interleave(3)  # 3 pulses per event
        return (torch.randn(3 * n, 3, generator=g), event), torch.randn(n, 2, generator=g)
    return make_batch


# -- passing ---------------------------------------------------------------------------------
def test_linear_passes_for_default_batch_sizes():
    r = shapes_consistent(("B", 3), model=_linear(), batch=_x())
    assert r.passed is True, r.headline
    assert r.headline == ("expected outputs ('B', 3) for batch sizes [1, 2, 3], observed consistent"
                          " shapes in 3 cases")
    assert r.metrics["cases"] == 3 and r.metrics["failed_cases"] == 0
    assert [run["outputs"] for run in r.metrics["runs"]] == [
        ["output (1, 3)"], ["output (2, 3)"], ["output (3, 3)"]]


def test_no_spec_only_asks_for_a_leading_batch_dimension():
    r = shapes_consistent(model=_linear(), batch=_x())
    assert r.passed is True, r.headline
    assert r.headline.startswith("expected outputs with leading dim B for batch sizes [1, 2, 3]")


@pytest.mark.parametrize("batch_sizes, cases", [((4,), ["B=4"]), ((2, 5), ["B=2", "B=5"]), ([7], ["B=7"])])
def test_batch_sizes_argument(batch_sizes, cases):
    r = shapes_consistent(("B", 3), batch_sizes=batch_sizes, model=_linear(), batch=_x())
    assert r.passed is True, r.headline
    assert [run["case"] for run in r.metrics["runs"]] == cases


def test_symbolic_dims_in_dict_outputs():
    r = shapes_consistent({"logits": ("B", "C"), "angles": ("B", 2)}, model=TwoHeads(), batch=_x())
    assert r.passed is True, r.headline
    assert r.metrics["runs"][0]["outputs"] == ["output['logits'] (1, 3)", "output['angles'] (1, 2)"]


@pytest.mark.parametrize("out", [
    ("B", ...),
    (..., 2),
    ("B", ..., 2),
    (...,),
    ("B", None),
])
def test_ellipsis_and_none_specs(out):
    r = shapes_consistent({"logits": ("B", 3), "angles": out}, model=TwoHeads(), batch=_x())
    assert r.passed is True, r.headline


def test_batch_factory_is_called_for_each_batch_size():
    requested = []
    r = shapes_consistent(("B", 2), model=PulseSum(), batch=_make_pulses(requested))
    assert r.passed is True, r.headline
    # 4 = the example the factory is called with to learn the batch's form; then each batch size
    assert requested == [4, 1, 2, 3]


def test_packed_batch_without_a_factory_cannot_be_resized():
    requested = []
    batch = _make_pulses(requested)(4)  # 12 pulses for 4 events: the pulses are not tiled
    r = shapes_consistent(("B", 2), model=PulseSum(), batch=batch)
    assert r.passed is False
    assert "observed at B=1: output (4, 2): dim 0 is 4, expected B=1" in r.headline


def test_declared_input_sizes_are_tried():
    PooledHead.seen.clear()
    spec = {"logits": ("B", 5), "mask": ("B", 2, "H", "W")}
    r = shapes_consistent(spec, inputs=("B", 1, "H", "W"), sizes={"H": [8, 12], "W": [6]},
                          model=PooledHead(), batch=torch.randn(2, 1, 8, 8))
    assert r.passed is True, r.headline
    # 2 heights x 1 width x 3 batch sizes
    assert r.metrics["cases"] == 6
    assert [run["case"] for run in r.metrics["runs"]] == [
        "B=1, H=8, W=6", "B=2, H=8, W=6", "B=3, H=8, W=6",
        "B=1, H=12, W=6", "B=2, H=12, W=6", "B=3, H=12, W=6"]
    assert (3, 1, 12, 6) in PooledHead.seen and (1, 1, 8, 6) in PooledHead.seen


def test_undeclared_input_symbols_keep_the_example_size():
    PooledHead.seen.clear()
    r = shapes_consistent({"logits": ("B", 5), "mask": ("B", 2, "H", "W")}, inputs=("B", 1, "H", "W"),
                          sizes={"H": [5]}, model=PooledHead(), batch=torch.randn(2, 1, 8, 7))
    assert r.passed is True, r.headline
    assert set(PooledHead.seen) == {(1, 1, 5, 7), (2, 1, 5, 7), (3, 1, 5, 7)}


def test_the_caller_batch_is_not_resized_or_changed():
    x = _x()
    before = x.clone()
    shapes_consistent(("B", 3), model=InPlaceScaler(), batch=x)
    assert torch.equal(x, before)


# -- planted bugs ----------------------------------------------------------------------------
def test_wrong_output_width():
    r = shapes_consistent(("B", 4), model=_linear(), batch=_x())
    assert r.passed is False
    assert r.headline == ("expected outputs ('B', 4) for batch sizes [1, 2, 3], observed at B=1:"
                          " output (1, 3): dim 1 is 3, expected 4")
    assert r.metrics["failed_cases"] == 3


def test_view_that_mixes_samples_fails_at_batch_size_one_with_a_data_flow_trace():
    r = shapes_consistent(("B", 3), model=PairMixer(), batch=_x())
    assert r.passed is False
    assert r.headline == ("expected outputs ('B', 3) for batch sizes [1, 2, 3], observed at B=1:"
                          " forward raised RuntimeError in module 'PairMixer' (PairMixer):"
                          " shape '[-1, 12]' is invalid for input of size 6")
    lines = r.details.splitlines()
    # B=2 runs without error but glues the two samples into one row
    assert "case B=2: output (1, 3): dim 0 is 1, expected B=2" in lines
    start = lines.index("forward data flow for case B=1 (* = shape changes):")
    trace = lines[start + 1:]
    assert trace[0].startswith("  <root> (PairMixer): (1, 4) float32 ")
    assert trace[0].endswith("-> RAISED RuntimeError")
    assert trace[1].startswith("*   embed (Linear): (1, 4) float32 ")
    assert " -> (1, 6) float32 " in trace[1]
    assert trace[-1] == "forward raised: RuntimeError: shape '[-1, 12]' is invalid for input of size 6"
    assert not any("head" in line for line in trace)  # head never ran


def test_in_place_mutation_of_the_input_is_flagged():
    r = shapes_consistent(("B", 3), model=InPlaceScaler(), batch=_x())
    assert r.passed is False
    assert r.headline.endswith("observed at B=1: the model changed its input input[0] in place")


def test_output_symbol_must_stay_constant_across_batch_sizes():
    r = shapes_consistent(("B", "C"), model=WidthFollowsBatch(), batch=_x())
    assert r.passed is False
    # B=1 binds C = 1 + 2 = 3; B=2 gives 4 columns
    assert r.headline.endswith("observed at B=2: output (2, 4): dim 1 is 4, expected C=3")


def test_trailing_dims_must_stay_constant_without_a_spec():
    r = shapes_consistent(model=WidthFollowsBatch(), batch=_x())
    assert r.passed is False
    assert r.headline.endswith("observed at B=2: output (2, 4): trailing dims changed from (3,) with"
                               " the batch size")


def test_wrong_width_in_one_dict_entry():
    r = shapes_consistent({"logits": ("B", "C"), "angles": ("B", 2)}, model=TwoHeads(angle_dims=3),
                          batch=_x())
    assert r.passed is False
    assert r.headline.endswith("observed at B=1: output['angles'] (1, 3): dim 1 is 3, expected 2")


def test_missing_dict_key():
    r = shapes_consistent({"logits": ("B", 3), "energy": ("B",)}, model=TwoHeads(), batch=_x())
    assert r.passed is False
    assert r.headline.endswith("observed at B=1: output lacks key 'energy'")


@pytest.mark.parametrize("out, observed", [
    (("B", ..., 4), "output['angles'] (1, 2): dim 1 is 2, expected 4"),
    (("B", 2, ..., 1), "output['angles'] (1, 2): has 2 dims, expected at least 3"),
    (("B", 2, 1), "output['angles'] (1, 2): has 2 dims (1, 2), expected 3 dims ('B', 2, 1)"),
])
def test_ellipsis_spec_mismatch(out, observed):
    r = shapes_consistent({"logits": ("B", 3), "angles": out}, model=TwoHeads(), batch=_x())
    assert r.passed is False
    assert r.headline.endswith(f"observed at B=1: {observed}")


def test_flatten_head_breaks_for_a_declared_height():
    r = shapes_consistent(("B", 5), inputs=("B", 1, "H", "W"), sizes={"H": [8, 12]},
                          model=FlattenHead(), batch=torch.randn(2, 1, 8, 8))
    assert r.passed is False
    assert r.headline.startswith("expected outputs ('B', 5) for batch sizes [1, 2, 3] and"
                                 " {'H': (8, 12)}, observed at B=1, H=12: forward raised RuntimeError"
                                 " in module 'fc' (Linear): mat1 and mat2 shapes cannot be multiplied")
    # 2*12*8 = 192 features reach a Linear built for 2*8*8 = 128
    assert "(1x192 and 128x5)" in r.headline
    assert r.metrics["cases"] == 6 and r.metrics["failed_cases"] == 3
    assert "forward data flow for case B=1, H=12" in r.details
    assert "flat (Flatten): (1, 2, 12, 8) float32" in r.details


def test_model_that_raises_at_every_size():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(5, 3))
    r = shapes_consistent(("B", 3), model=model, batch=_x())
    assert r.passed is False
    assert "observed at B=1: forward raised RuntimeError in module '1' (Linear)" in r.headline


# -- usage errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"out": ("B", 1.5)}, "out=('B', 1.5): dimension 1.5 is not an int, a symbol such as 'B', None or ..."),
    ({"out": ("B", True)}, "out=('B', True): dimension True is not an int"),
    ({"out": ("B", -1)}, "out=('B', -1): sizes must be >= 0"),
    ({"out": (..., "B", ...)}, "out=(Ellipsis, 'B', Ellipsis): at most one ... per shape"),
    ({"out": 42}, "out=42: expected a shape such as ('B', 10)"),
    ({"out": {}}, "out={}: expected a shape such as ('B', 10)"),
    ({"out": {"logits": ("B", 2.0)}}, "out['logits']=('B', 2.0): dimension 2.0 is not an int"),
    ({"batch_sizes": 0}, "batch_sizes=0: expected a tuple of positive ints such as (1, 2, 3)"),
    ({"batch_sizes": ()}, "batch_sizes=(): expected a tuple of positive ints"),
    ({"batch_sizes": (1, 0)}, "batch_sizes=(1, 0): expected a tuple of positive ints"),
    ({"batch_sizes": (True, 2)}, "batch_sizes=(True, 2): expected a tuple of positive ints"),
    ({"batch_sizes": "3"}, "batch_sizes='3': expected a tuple of positive ints"),
    ({"batch_sizes": 2.0}, "batch_sizes=2.0: expected a tuple of positive ints"),
    ({"inputs": 5}, "inputs=5: expected a shape such as ('B', 10)"),
    ({"sizes": {"H": [8]}}, "sizes={'H': [8]}: needs inputs=... naming where each symbol sits"),
    ({"inputs": ("B", 1, "H", "W"), "sizes": {"H": []}}, "sizes={'H': []}: expected a dict of symbol -> list of sizes"),
    ({"inputs": ("B", 1, "H", "W"), "sizes": {"H": [0]}}, "sizes={'H': [0]}: expected a dict"),
    ({"inputs": ("B", 1, "H", "W"), "sizes": {"H": 8}}, "sizes={'H': 8}: expected a dict"),
    ({"inputs": ("B", 1, "H", "W"), "sizes": [8, 12]}, "sizes=[8, 12]: expected a dict"),
    ({"inputs": ("B", 1, "H", "W"), "sizes": {"B": [2]}}, "sizes: 'B' is the batch size; use batch_sizes=(...) instead"),
    ({"inputs": ("B", 1, "H", "W"), "sizes": {"T": [3, 7]}},
     "sizes={'T': [3, 7]}: 'T' does not appear in inputs=('B', 1, 'H', 'W'); expected symbols among"
     " ['H', 'W']"),
    ({"shape": ("B", 3)}, "got an unexpected keyword argument 'shape'; expected shapes_consistent("),
])
def test_bad_arguments_raise_usage_error_in_one_line(kwargs, message):
    calls = []

    class Spy(nn.Module):
        def forward(self, x):
            calls.append(1)
            return x

    with pytest.raises(UsageError) as info:
        shapes_consistent(**kwargs, model=Spy(), batch=torch.zeros(2, 1, 8, 8))
    text = str(info.value)
    assert text.startswith(message)
    assert "\n" not in text
    assert not calls  # rejected before the model ran


def test_inputs_spec_that_does_not_match_the_batch():
    with pytest.raises(UsageError) as info:
        shapes_consistent(("B", 5), inputs=("B", 3, "H", "W"), sizes={"H": [8]}, model=FlattenHead(),
                          batch=torch.randn(2, 1, 8, 8))
    assert str(info.value) == ("inputs=('B', 3, 'H', 'W'): the example batch does not match it:"
                               " input (2, 1, 8, 8): dim 1 is 1, expected 3")


def test_keyword_inputs_of_the_caller_are_not_changed():
    class ScaleInPlace(nn.Module):
        def forward(self, x, scale):
            scale.mul_(2)
            return x.flatten(1) * scale

    scale = torch.ones(2, 1)
    shapes_consistent(inputs=("B", 4), model=ScaleInPlace(),
                      batch=Batch(args=(torch.ones(2, 4),), kwargs={"scale": scale}))
    assert torch.equal(scale, torch.ones(2, 1))


# -- the marker ------------------------------------------------------------------------------
def test_marker_passes_on_healthy_and_fails_on_a_sample_mixing_view(healthy_project):
    healthy_project.makepyfile("""
        import pytest, torch
        from torch import nn

        class Mixer(nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = nn.Linear(8, 16)
                self.head = nn.Linear(32, 5)
            def forward(self, x):
                return self.head(self.embed(x).view(-1, 32))

        @pytest.fixture
        def mixer():
            torch.manual_seed(0)
            return Mixer()

        @pytest.mark.shapes_consistent(out=("B", 5))
        def test_healthy():
            pass

        @pytest.mark.shapes_consistent(out=("B", 5), model_fixture="mixer")
        def test_mixer():
            pass
    """)
    result = healthy_project.runpytest("--modelcheck", "-W", "error")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*_ test_mixer _*",
        "1 model check failed:",
        "  ?shapes_consistent? expected outputs ('B', 5) for batch sizes ?1, 2, 3?, observed at B=1:"
        " forward raised RuntimeError in module 'Mixer' (Mixer): shape '?-1, 32?' is invalid for"
        " input of size 16",
        "*Captured modelcheck call*",
        "*case B=2: output (1, 5): dim 0 is 1, expected B=2",
        "*forward data flow for case B=1 (* = shape changes):",
        "*<root> (Mixer): (1, 8) float32 *-> RAISED RuntimeError",
        "*embed (Linear): (1, 8) float32 *-> (1, 16) float32*",
        "*forward raised: RuntimeError: shape*",
        "FAILED *::test_mixer*",
    ])
