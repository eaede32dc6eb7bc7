"""The pass manager: constraint ordering, cycles, verification and rollback, strict mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.fx.passes.infra.pass_base import PassResult

import fxopt
from fxopt.passinfra.pass_base import FxoptPass
from fxopt.passinfra.pass_manager import order_passes


def make_pass(pass_name, *, after=(), before=(), lossy=False, action=None):
    class _P(FxoptPass):
        name = pass_name

        def call(self, gm):
            if action is None:
                return PassResult(gm, False)
            return action(gm)

    _P.after, _P.before, _P.lossy = tuple(after), tuple(before), lossy
    return _P()


def small():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    x = (torch.randn(1, 3, 8, 8),)
    return model, x, fxopt.trace(model, x), fxopt.CompileContext.create("cpu", x)


def perturb_weight(gm):
    with torch.no_grad():
        gm.get_submodule("3").weight[0, 0] *= 1.01  # a 1% change of one weight
    gm.graph.create_node("call_function", torch.relu, (next(iter(gm.graph.nodes)),))  # dead node: graph "changed"
    return PassResult(gm, True)


def raise_error(gm):
    raise RuntimeError("boom")


def change_output_shape(gm):
    out = [n for n in gm.graph.nodes if n.op == "output"][0]
    with gm.graph.inserting_before(out):
        flat = gm.graph.call_function(torch.flatten, (out.args[0],))
    out.args = (flat,)
    return PassResult(gm, True)


def test_order_follows_constraints_and_keeps_list_order_otherwise():
    a, b, c = make_pass("a", after=["c"]), make_pass("b"), make_pass("c")
    assert [p.name for p in order_passes([a, b, c])] == ["b", "c", "a"]
    d = make_pass("d", before=["b"])
    assert [p.name for p in order_passes([b, d])] == ["d", "b"]
    # constraints on passes not in the list are ignored
    assert [p.name for p in order_passes([make_pass("x", after=["nope"]), b])] == ["x", "b"]


def test_cycle_is_a_clear_error_naming_the_cycle():
    a, b = make_pass("a", after=["b"]), make_pass("b", after=["a"])
    with pytest.raises(fxopt.PassOrderError, match=r"cycle: (a -> b -> a|b -> a -> b)"):
        order_passes([a, b])


def test_canonical_fold_batchnorm_waits_for_prune_like_passes():
    prune = make_pass("prune")
    names = [p.name for p in order_passes([fxopt.create_pass("canonicalize"), fxopt.create_pass("fold_batchnorm"), prune])]
    assert names == ["canonicalize", "prune", "fold_batchnorm"]


def test_pass_that_raises_is_rolled_back_and_pipeline_goes_on():
    _, x, gm, ctx = small()
    result = fxopt.PassManager([make_pass("bad", action=raise_error), "fold_batchnorm"]).run(gm, ctx)
    statuses = {r.name: (r.status, r.reason) for r in result.records}
    assert statuses["bad"] == ("rolled_back", "RuntimeError: boom")
    assert statuses["fold_batchnorm"][0] == "applied"
    torch.testing.assert_close(result.graph_module(*x), gm(*x), atol=1e-5, rtol=1e-4)


def test_strict_mode_raises_pass_error_with_history():
    _, _, gm, ctx = small()
    manager = fxopt.PassManager(["fold_batchnorm", make_pass("bad", action=raise_error)], strict=True)
    with pytest.raises(fxopt.PassError) as info:
        manager.run(gm, ctx)
    assert info.value.pass_name == "bad"
    assert info.value.ran_before == ("fold_batchnorm",)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_exact_pass_that_changes_numerics_is_rolled_back():
    _, x, gm, ctx = small()
    reference = gm(*x)
    result = fxopt.PassManager([make_pass("liar", action=perturb_weight)]).run(gm, ctx)
    record = result.records[0]
    assert record.status == "rolled_back"
    assert "declares lossy=False but changed the outputs" in record.reason
    assert torch.equal(result.graph_module(*x), reference)
    assert torch.equal(gm(*x), reference)  # the input graph is intact


def test_known_outputs_stand_in_for_a_run_of_the_input_graph():
    # given the trace's outputs on the example inputs, the manager takes them as the reference there
    _, x, gm, ctx = small()
    exact = fxopt.PassManager([make_pass("exact", action=lambda g: PassResult(g, True))])
    truth = gm(*x)
    assert exact.run(gm, ctx, known_outputs=[(ctx.example_inputs, truth)]).records[0].status == "applied"
    wrong = exact.run(gm, ctx, known_outputs=[(ctx.example_inputs, truth + 1)]).records[0]
    assert wrong.status == "rolled_back" and "changed the outputs" in wrong.reason
    other_set = exact.run(gm, ctx, known_outputs=[((x[0].clone(),), truth + 1)]).records[0]  # not the same object: not used
    assert other_set.status == "applied"


class _Idle(FxoptPass):
    name = "idle"

    def __init__(self, answer) -> None:
        super().__init__()
        self.answer, self.calls = answer, 0

    def finds_work(self, gm):
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def call(self, gm):
        self.calls += 1
        return PassResult(gm, False)


def test_a_pass_that_finds_no_work_is_neither_copied_nor_run():
    _, x, gm, ctx = small()
    idle = _Idle(False)
    result = fxopt.PassManager([idle]).run(gm, ctx)
    assert result.records[0].status == "unchanged" and idle.calls == 0
    assert result.graph_module is gm  # no copy was made
    busy = _Idle(True)
    assert fxopt.PassManager([busy]).run(gm, ctx).records[0].status == "unchanged" and busy.calls == 1


def test_a_failing_work_test_decides_nothing_and_the_pass_runs():
    _, x, gm, ctx = small()
    broken = _Idle(RuntimeError("no idea"))
    assert fxopt.PassManager([broken]).run(gm, ctx).records[0].status == "unchanged" and broken.calls == 1


def test_lossy_pass_reports_its_deviation():
    _, _, gm, ctx = small()
    record = fxopt.PassManager([make_pass("honest", lossy=True, action=perturb_weight)]).run(gm, ctx).records[0]
    assert record.status == "applied"
    assert 0 < record.max_abs_error < 1


def test_lossy_pass_may_not_change_output_shapes():
    _, _, gm, ctx = small()
    record = fxopt.PassManager([make_pass("reshaper", lossy=True, action=change_output_shape)]).run(gm, ctx).records[0]
    assert record.status == "rolled_back" and "shapes" in record.reason


def test_unmodified_claim_with_changed_graph_is_a_contract_break():
    def sneaky(gm):
        change_output_shape(gm)
        return PassResult(gm, False)

    _, _, gm, ctx = small()
    record = fxopt.PassManager([make_pass("sneaky", action=sneaky)]).run(gm, ctx).records[0]
    assert record.status == "rolled_back" and "modified=False" in record.reason


def test_records_carry_stats_and_plain_torch_passes_run():
    _, _, gm, ctx = small()

    def torch_style(graph_module):  # a plain torch.fx function pass, no fxopt attributes
        graph_module.graph.eliminate_dead_code()
        return PassResult(graph_module, False)

    result = fxopt.PassManager([torch_style, "fold_batchnorm"]).run(gm, ctx)
    first, fold = result.records
    assert first.name == "torch_style" and first.status == "unchanged"
    assert fold.before.nodes == 6 and fold.after.nodes == 5
    assert fold.after.params < fold.before.params
    assert fold.time_s > 0


def test_unknown_pass_name_lists_registered_ones():
    with pytest.raises(fxopt.PassRegistryError, match="registered passes: .*canonicalize"):
        fxopt.PassManager(["no_such_pass"])


def test_register_pass_rejects_nameless_and_duplicate():
    class Nameless(FxoptPass):
        def call(self, gm):
            return PassResult(gm, False)

    with pytest.raises(fxopt.PassRegistryError, match="no `name`"):
        fxopt.register_pass(Nameless)

    class Clash(FxoptPass):
        name = "canonicalize"

        def call(self, gm):
            return PassResult(gm, False)

    with pytest.raises(fxopt.PassRegistryError, match="taken by"):
        fxopt.register_pass(Clash)


def test_pass_sees_the_compile_context():
    seen = {}

    def look(gm):
        ctx = fxopt.current_context()
        seen.update(target=ctx.target.name, calib=ctx.options.get("calib_data"))
        return PassResult(gm, False)

    model = nn.Linear(4, 2)
    calib = [(torch.randn(1, 4),), (torch.randn(3, 4),)]
    fxopt.compile(model, "xavier", example_inputs=(torch.randn(1, 4),), passes=[make_pass("look", action=look)], calib_data=calib)
    assert seen["target"] == "xavier" and [b[0] for b in seen["calib"]] == [b[0] for b in calib]


def _sharing(pass_name, action, *, lossy=True):
    p = make_pass(pass_name, lossy=lossy, action=action)
    type(p).shares_weights = True
    return p


def replace_weight(gm):
    conv = gm.get_submodule("3")
    conv.weight = nn.Parameter(conv.weight.detach() * 1.01)  # copy on write: a new tensor
    return PassResult(gm, True)


def test_a_sharing_pass_works_on_a_copy_that_shares_the_unchanged_weights():
    _, x, gm, ctx = small()
    reference = gm(*x)
    result = fxopt.PassManager([_sharing("replacer", replace_weight)]).run(gm, ctx)
    assert result.records[0].status == "applied"
    out = result.graph_module
    assert out.get_submodule("0").weight is gm.get_submodule("0").weight  # unchanged: shared, not copied
    assert out.get_submodule("3").weight is not gm.get_submodule("3").weight
    assert torch.equal(gm(*x), reference)  # the input graph is intact


def test_a_pass_keeps_its_own_copy_of_the_weights_by_default():
    _, x, gm, ctx = small()
    reference = gm(*x)
    result = fxopt.PassManager([make_pass("honest", lossy=True, action=perturb_weight)]).run(gm, ctx)
    assert result.records[0].status == "applied"
    assert result.graph_module.get_submodule("0").weight is not gm.get_submodule("0").weight
    assert torch.equal(gm(*x), reference)


@pytest.mark.parametrize("strict", [False, True])
def test_a_sharing_pass_that_writes_into_a_weight_is_refused_by_name(strict):
    _, _, gm, ctx = small()
    with pytest.raises(fxopt.PassError, match=r"'3\.weight' in place.*shares_weights"):
        fxopt.PassManager([_sharing("writer", perturb_weight)], strict=strict).run(gm, ctx)


def test_a_sharing_pass_that_swaps_a_weights_data_is_refused():
    def swap(gm):
        conv = gm.get_submodule("0")
        conv.weight.data = conv.weight.data * 2
        return PassResult(gm, True)

    _, _, gm, ctx = small()
    with pytest.raises(fxopt.PassError, match=r"'0\.weight' in place"):
        fxopt.PassManager([_sharing("swapper", swap)]).run(gm, ctx)


def test_buffers_are_shared_only_by_a_pass_that_says_so():
    _, x, gm, ctx = small()
    mean = gm.get_submodule("1").running_mean
    copying = fxopt.PassManager([_sharing("replacer", replace_weight)]).run(gm, ctx).graph_module
    assert copying.get_submodule("1").running_mean is not mean
    sharing = _sharing("replacer_b", replace_weight)
    type(sharing).shares_buffers = True
    assert fxopt.PassManager([sharing]).run(gm, ctx).graph_module.get_submodule("1").running_mean is mean


class _Counter(nn.Module):
    """A leaf that counts its calls in a buffer (the count reaches no output)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return x


def test_a_buffer_a_run_may_write_is_never_shared():
    # the manager's own checks run the copy: a leaf's buffer (not torch's module) keeps its own copy
    model, x = nn.Sequential(_Counter(), nn.Dropout(0.1), nn.Linear(4, 4)).eval(), (torch.randn(1, 4),)
    gm = fxopt.trace(model, x, leaf_modules=["0"])
    result = fxopt.PassManager(["canonicalize"]).run(gm, fxopt.CompileContext.create("cpu", x))
    assert result.records[0].status == "applied"
    assert result.graph_module.get_buffer("0.calls") is not gm.get_buffer("0.calls")


def test_a_buffer_sharing_pass_that_writes_into_a_buffer_is_refused():
    def write_stats(gm):
        gm.get_submodule("1").running_mean.add_(1.0)
        return PassResult(gm, True)

    _, x, gm, ctx = small()
    writer = _sharing("stats_writer", write_stats)
    type(writer).shares_buffers = True
    before = gm.get_submodule("1").running_mean.clone()
    with pytest.raises(fxopt.PassError, match=r"'1\.running_mean' in place"):
        fxopt.PassManager([writer]).run(gm, ctx)
    assert not torch.equal(gm.get_submodule("1").running_mean, before)  # why it is refused, not rolled back: shared


def test_fxopts_own_structural_passes_share_weights():
    from fxopt.passinfra.registry import create_pass

    assert {n for n in ("canonicalize", "fold_batchnorm", "prune", "quantize") if create_pass(n).shares_weights} == {
        "canonicalize", "fold_batchnorm", "prune", "quantize"}
    assert not create_pass("slim").shares_weights  # it re-estimates BatchNorm statistics in place
    assert {n for n in ("canonicalize", "fold_batchnorm", "prune", "quantize") if create_pass(n).shares_buffers} == {
        "canonicalize", "fold_batchnorm"}  # prune's importance and quantize's calibration run modules


def _refusing(flag):
    def refuse(gm):
        raise fxopt.InputError("loss= must return a scalar tensor")

    p = make_pass("refuser", lossy=True, action=refuse)
    type(p).raises_input_errors = flag
    return p


def test_an_input_error_of_a_pass_that_raises_them_stops_the_run():
    _, _, gm, ctx = small()
    with pytest.raises(fxopt.InputError, match="must return a scalar"):
        fxopt.PassManager([_refusing(True)]).run(gm, ctx)


def test_an_input_error_of_any_other_pass_is_rolled_back():
    _, _, gm, ctx = small()
    record = fxopt.PassManager([_refusing(False)]).run(gm, ctx).records[0]
    assert record.status == "rolled_back" and "must return a scalar" in record.reason


def test_a_sharing_pass_that_writes_in_place_and_then_fails_is_refused_not_rolled_back():
    def write_then_fail(gm):
        perturb_weight(gm)
        raise RuntimeError("boom")

    _, _, gm, ctx = small()
    with pytest.raises(fxopt.PassError, match=r"'3\.weight' in place"):
        fxopt.PassManager([_sharing("clumsy", write_then_fail)]).run(gm, ctx)


class _CountingLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1  # its own buffer, read by nothing: a leaf keeps writing it on every run
        return self.conv(x)


def test_a_leaf_writing_its_own_buffer_still_compiles_to_int8():
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), _CountingLeaf(), nn.ReLU()).eval()
    x = torch.randn(1, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = fxopt.compile(model, "cpu", example_inputs=(x,), leaf_modules=["1"], precision="int8",
                                 calib_data=[(torch.randn(1, 3, 16, 16),) for _ in range(2)], export=False)
    assert [r.status for r in compiled.report.passes if r.name == "quantize"] in (["applied"], ["unchanged"])


_IMPORT_RACE = r"""
import sys, threading, time, importlib.abc
import fxopt
assert "fxopt.passes" not in sys.modules
class Slow(importlib.abc.MetaPathFinder):  # thread B is inside `import fxopt.passes` for a while
    def find_spec(self, name, path, target=None):
        if name == "fxopt.passes.distill" and threading.current_thread().name == "B":
            time.sleep(1.0)
        return None
sys.meta_path.insert(0, Slow())
found = []
b = threading.Thread(target=lambda: __import__("fxopt.passes.prune"), name="B", daemon=True)
a = threading.Thread(target=lambda: found.append(len(fxopt.pass_names())), name="A", daemon=True)
b.start(); time.sleep(0.3); a.start()
a.join(20); b.join(1)
print("alive", a.is_alive() or b.is_alive(), "passes", found)
"""


def test_a_lookup_while_another_thread_imports_the_passes_waits_for_all_of_them() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _IMPORT_RACE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("alive False"), line  # no deadlock
    count = int(line.split("[")[1].rstrip("]"))
    assert count >= 10, line  # every built-in pass, not the half-imported package's first few
