"""Measured auto-dispatch: the per-GPU preference table (reading it in the dispatcher, the
BEITFAST_PREFERENCES override, bad tables) and ``beitfast bench --calibrate`` (ordering and writing
the table with a stubbed timer, the refusal on CPU, a real run on a GPU)."""

import copy
import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from beitfast import calibrate
from beitfast.cli import main
from beitfast.model import num_relative_positions, relative_position_index
from beitfast.ops import dispatch

FAKE_GPU = "NVIDIA Fake GPU 80GB HBM3"
# Small sizes for the CPU runs of the calibration cases (the interpreter runs the Triton backends).
TINY = {"batch": 2, "heads": 2, "grid": 3, "head_dim": 16, "vocab": 40, "num_masked": 3, "patch_size": 4,
        "channels": 3}


@pytest.fixture
def gpu_tables(monkeypatch, tmp_path):
    """A dispatcher that has read no table yet, believes the GPU is FAKE_GPU and keeps the package's
    tables in ``tmp_path``; the dispatcher's state is restored afterwards. Yields the list of device
    names asked for (one per table lookup)."""
    monkeypatch.setattr(dispatch, "_PREFERENCE", copy.deepcopy(dispatch._PREFERENCE))
    monkeypatch.setattr(dispatch, "_SET_BY_USER", set())
    monkeypatch.setattr(dispatch, "_cuda_table_read", False)
    monkeypatch.setattr(dispatch, "PREFERENCES_DIR", tmp_path)
    monkeypatch.delenv(dispatch.PREFERENCES_ENV, raising=False)
    monkeypatch.delenv("BEITFAST_BACKEND", raising=False)
    lookups = []

    def device_name(device=None):
        lookups.append(device)
        return FAKE_GPU

    monkeypatch.setattr(torch.cuda, "get_device_name", device_name)
    yield lookups


def write(path, preference, gpu=FAKE_GPU):
    path.write_text(json.dumps({"gpu": gpu, "preference": preference}))
    return path


def attention_inputs(device):
    """BEiT-like attention inputs (N = 10) on ``device``; "cuda" makes fake tensors (no GPU needed:
    ``select`` only looks at shapes, dtypes and devices)."""
    with FakeTensorMode() if device == "cuda" else torch.device("cpu"):
        q, k, v = (torch.randn(2, 3, 10, 16, device=device, dtype=torch.float16) for _ in range(3))
        table = torch.randn(num_relative_positions((3, 3)), 3, device=device)
        rel_index = relative_position_index((3, 3)).to(device)
    return {"q": q, "k": k, "v": v, "bias_table": table, "rel_index": rel_index, "scale": 0.25}


def auto_choice(device="cuda") -> str:
    return dispatch.select("attention", None, **attention_inputs(device)).name


def built_in_choice() -> str:
    reasons = dispatch.explain("attention", **attention_inputs("cuda"))
    return next(n for n in dispatch._BUILT_IN_PREFERENCE["attention"]["cuda"] if not reasons[n])


# -- the dispatcher reads the table -------------------------------------------------------------------


def test_gpu_slug():
    assert dispatch.gpu_slug("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3"
    assert dispatch.gpu_slug("NVIDIA A100-SXM4-40GB") == "NVIDIA_A100_SXM4_40GB"


def test_table_changes_the_auto_choice_on_cuda(gpu_tables, tmp_path):
    default = built_in_choice()
    assert default != "eager"
    write(tmp_path / "NVIDIA_Fake_GPU_80GB_HBM3.json", {"attention": ["eager", "sdpa"]})
    assert auto_choice() == "eager"
    built_in = dispatch._BUILT_IN_PREFERENCE["attention"]["cuda"]
    assert dispatch.preference("attention", "cuda") == ["eager", "sdpa"] + [
        n for n in built_in if n not in ("eager", "sdpa")]
    # Ops the table does not name keep the built-in order.
    assert dispatch.preference("cross_entropy", "cuda")[: 3] == ["triton", "cuda", "eager"]


def test_table_with_a_refusing_first_choice_falls_through(gpu_tables, tmp_path):
    # A backend that refuses these inputs (or is missing in this install) is passed over.
    reasons = dispatch.explain("attention", **attention_inputs("cuda"))
    refusing = next(n for n, r in reasons.items() if r)
    write(tmp_path / "NVIDIA_Fake_GPU_80GB_HBM3.json", {"attention": [refusing, "sdpa"]})
    assert auto_choice() == "sdpa"


def test_table_read_once_and_cached(gpu_tables, tmp_path):
    path = write(tmp_path / "NVIDIA_Fake_GPU_80GB_HBM3.json", {"attention": ["eager"]})
    assert auto_choice() == "eager"
    write(path, {"attention": ["sdpa"]})
    assert auto_choice() == "eager"
    assert len(gpu_tables) == 1


def test_no_table_keeps_the_built_in_order(gpu_tables):
    before = {op: dispatch.preference(op, "cuda") for op in ("attention", "cross_entropy", "patch_embed")}
    assert auto_choice() == built_in_choice()
    assert dispatch._cuda_table_read
    assert {op: dispatch.preference(op, "cuda") for op in before} == before


def test_cpu_selection_reads_no_table(gpu_tables, tmp_path):
    write(tmp_path / "NVIDIA_Fake_GPU_80GB_HBM3.json", {"attention": ["eager"]})
    assert auto_choice("cpu") == "sdpa"  # float16: blas takes 32 and 64 bits only
    assert not gpu_tables and not dispatch._cuda_table_read


def test_unknown_backends_and_ops_are_ignored_with_a_warning(gpu_tables, tmp_path):
    write(tmp_path / "NVIDIA_Fake_GPU_80GB_HBM3.json",
          {"attention": ["warp_speed", "eager"], "convolution": ["eager"]})
    with pytest.warns(UserWarning) as caught:
        assert auto_choice() == "eager"
    messages = " | ".join(str(w.message) for w in caught)
    assert "warp_speed" in messages and "convolution" in messages
    assert "warp_speed" not in dispatch.preference("attention", "cuda")


@pytest.mark.parametrize("content, match", [
    ("{not json", "cannot read"),
    (json.dumps({"gpu": FAKE_GPU}), "'preference'"),
    (json.dumps({"gpu": FAKE_GPU, "preference": {"attention": "eager"}}), "list of backend names"),
])
def test_malformed_table_is_an_error_naming_the_file(gpu_tables, tmp_path, content, match):
    path = tmp_path / "NVIDIA_Fake_GPU_80GB_HBM3.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as error:
        auto_choice()
    assert str(path) in str(error.value)


def test_environment_override(gpu_tables, tmp_path, monkeypatch):
    write(tmp_path / "NVIDIA_Fake_GPU_80GB_HBM3.json", {"attention": ["eager"]})
    mine = write(tmp_path / "mine.json", {"attention": ["sdpa", "eager"]})
    monkeypatch.setenv(dispatch.PREFERENCES_ENV, str(mine))
    assert auto_choice() == "sdpa"
    assert dispatch.preference("attention", "cuda")[:2] == ["sdpa", "eager"]


def test_environment_override_measured_elsewhere_warns(gpu_tables, tmp_path, monkeypatch):
    other = write(tmp_path / "other.json", {"attention": ["eager"]}, gpu="NVIDIA Other GPU")
    monkeypatch.setenv(dispatch.PREFERENCES_ENV, str(other))
    with pytest.warns(UserWarning, match="NVIDIA Other GPU"):
        assert auto_choice() == "eager"


def test_environment_override_missing_file(gpu_tables, tmp_path, monkeypatch):
    missing = tmp_path / "absent.json"
    monkeypatch.setenv(dispatch.PREFERENCES_ENV, str(missing))
    for _ in range(2):  # an error every time, not once then silently the built-in order
        with pytest.raises(FileNotFoundError, match="BEITFAST_PREFERENCES") as error:
            auto_choice()
        assert str(missing) in str(error.value)


def test_set_preference_wins_over_the_table(gpu_tables, tmp_path):
    dispatch.set_preference("attention", "cuda", ["sdpa", "eager"])
    write(tmp_path / "NVIDIA_Fake_GPU_80GB_HBM3.json", {"attention": ["eager"]})
    assert auto_choice() == "sdpa"


def test_tables_applied_twice_fall_back_to_the_built_in_order(gpu_tables):
    dispatch.apply_preference_table({"preference": {"cross_entropy": ["eager"]}})
    dispatch.apply_preference_table({"preference": {"cross_entropy": ["cuda"]}})
    assert dispatch.preference("cross_entropy", "cuda")[:3] == ["cuda", "triton", "eager"]


# -- calibrate: measuring, ordering, writing ----------------------------------------------------------


@pytest.fixture
def toy_op(monkeypatch):
    """An op "toy" with backends that take the input, refuse it, or fail when run."""
    def refuse(**_):
        return ["toy inputs are too small"]

    def broken():
        raise RuntimeError("out of shared memory")

    backends = {name: dispatch.Backend("toy", name, fn, check, dispatch._always_available)
                for name, fn, check in [("slow", lambda: None, dispatch.accepts_all),
                                        ("picky", lambda: None, refuse),
                                        ("broken", broken, dispatch.accepts_all),
                                        ("fast", lambda: None, dispatch.accepts_all)]}
    monkeypatch.setitem(dispatch._REGISTRY, "toy", backends)
    return {"toy": ({"x": torch.randn(3)}, lambda name: backends[name].fn)}


def test_measure_backends_times_takers_and_records_why_others_are_left_out(toy_op):
    times = {"slow": 2.5, "fast": 0.75}
    timed = []

    def stub_timer(step):
        name = next(n for n, b in dispatch._REGISTRY["toy"].items() if b.fn is step)
        timed.append(name)
        step()
        return times[name]

    timings, skipped = calibrate.measure_backends(toy_op, stub_timer)
    assert timed == ["slow", "broken", "fast"]
    assert timings == {"toy": {"slow": 2.5, "fast": 0.75}}
    assert skipped == {"toy": {"picky": "toy inputs are too small",
                               "broken": "RuntimeError: out of shared memory"}}
    table = calibrate.preference_table("NVIDIA Fake GPU", timings, skipped, {"name": "toy"})
    assert table["preference"] == {"toy": ["fast", "slow"]}


def test_calibration_cases_run_forward_and_backward_of_every_taker_on_cpu():
    """The real cases at small sizes, on CPU, timed by a stub that runs each step once."""
    steps = []

    def stub_timer(step):
        grads = step()
        assert all(torch.isfinite(g).all() for g in grads)
        steps.append(grads)
        return float(len(steps))  # later backends "slower": the order is the order of measurement

    cases = calibrate._cases(TINY, torch.device("cpu"))
    timings, skipped = calibrate.measure_backends(cases, stub_timer)
    assert set(timings) == {"attention", "cross_entropy", "patch_embed"}
    for op in timings:
        takers = [n for n, r in dispatch.explain(op, **cases[op][0]).items() if not r]
        assert list(timings[op]) == takers and "eager" in takers
        assert set(skipped[op]) == set(dispatch.backends(op)) - set(takers)
    # Gradients of every differentiable input: qkv and table; hidden, weight, bias; 4 of patch embed.
    assert sorted({len(g) for g in steps}) == [2, 3, 4]
    table = calibrate.preference_table("cpu-stub", timings, skipped, {"name": "tiny", **TINY})
    assert table["preference"] == {op: list(by_name) for op, by_name in timings.items()}


def test_eager_steps_of_the_cases_match_float64_gradients():
    """The timed step differentiates the op the model runs: its gradients are those of the eager
    definition computed in float64 from the same leaves."""
    cases = calibrate._cases(TINY, torch.device("cpu"))
    inputs, make_step = cases["cross_entropy"]
    grad_hidden, *grad_params = make_step("eager")()
    patches, weight, bias = (t.detach().double().requires_grad_() for t in
                             (inputs["hidden"], inputs["weight"], inputs["bias"]))
    rows = patches[inputs["mask"]]
    loss = torch.nn.functional.cross_entropy(rows @ weight.T + bias, inputs["labels"][inputs["mask"]])
    expected = torch.autograd.grad(loss, (patches, weight, bias))
    assert grad_hidden[:, 0].eq(0).all()  # the cls token takes no part in the loss
    for got, want in zip([grad_hidden[:, 1:], *grad_params], expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_table_round_trip_through_the_dispatcher(gpu_tables, tmp_path):
    timings = {"attention": {"eager": 0.5, "sdpa": 0.9, "triton": 1.1}, "cross_entropy": {"eager": 3.0}}
    table = calibrate.preference_table(FAKE_GPU, timings, {}, {"name": "beit-base"}, warmup=1, repeats=2)
    assert table["preference"]["attention"] == ["eager", "sdpa", "triton"]
    for key in ("gpu", "torch", "triton", "date", "commit", "preference", "timings_ms", "skipped", "shapes"):
        assert key in table
    path = calibrate.write_table(table, tmp_path / f"{dispatch.gpu_slug(FAKE_GPU)}.json")
    assert json.loads(path.read_text()) == table
    assert auto_choice() == "eager"


def test_write_table_is_atomic(tmp_path):
    path = tmp_path / "sub" / "table.json"
    calibrate.write_table({"preference": {"attention": ["sdpa"]}}, path)
    calibrate.write_table({"preference": {"attention": ["eager"]}}, path)
    assert json.loads(path.read_text()) == {"preference": {"attention": ["eager"]}}
    with pytest.raises(TypeError):
        calibrate.write_table({"preference": object()}, path)
    # A failed write leaves the previous table and no partial file behind.
    assert json.loads(path.read_text()) == {"preference": {"attention": ["eager"]}}
    assert [p.name for p in path.parent.iterdir()] == ["table.json"]


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_calibrate_refuses_cpu(device, tmp_path):
    with pytest.raises(ValueError, match="needs a CUDA device.*'cpu'"):
        calibrate.calibrate(device, output=tmp_path / "t.json")
    assert not (tmp_path / "t.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a machine without a GPU")
@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_cli_calibrate_on_cpu_exits_with_a_clear_message(device, capsys, tmp_path):
    output = tmp_path / "t.json"
    assert main(["bench", "--calibrate", "--device", device, "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert "beitfast bench: error: calibrate: needs a CUDA device" in err
    assert "timings of GPU kernels" in err
    assert not output.exists()


@pytest.mark.gpu
def test_calibrate_on_the_gpu(tmp_path, capsys):
    output = tmp_path / "table.json"
    assert main(["bench", "--calibrate", "--warmup", "1", "--steps", "2", "--output", str(output)]) == 0
    printed = json.loads(capsys.readouterr().out)
    table = json.loads(output.read_text())
    assert printed["path"] == str(output)
    assert table["gpu"] == torch.cuda.get_device_name()
    for op, order in table["preference"].items():
        times = table["timings_ms"][op]
        assert "eager" in order and set(order) == set(times)
        assert [times[n] for n in order] == sorted(times.values())
        assert all(t > 0 for t in times.values())
        assert set(order) | set(table["skipped"][op]) == set(dispatch.backends(op))


def test_time_trials_counts_and_times_every_call():
    """The one timer of calibration and benchmarks: warm-up calls untimed, then ``trials`` trials of
    ``repeats`` calls each (wall clock on CPU, the smoke mode; CUDA events on a GPU)."""
    import time

    calls = []

    def sleepy():
        calls.append(1)
        time.sleep(0.002)

    times = calibrate.time_trials(sleepy, trials=3, repeats=4, warmup=2, device_type="cpu")
    assert len(calls) == 2 + 3 * 4 and len(times) == 3
    assert all(2.0 <= ms < 50.0 for ms in times)  # milliseconds per call, not per trial


def test_calibration_runs_at_the_benchmarked_batch():
    assert calibrate.SHAPES["beit-base"]["batch"] == 128  # the step benchmark's and the goals' batch
