"""The dispatcher: explicit choice, auto choice, the environment override and the error messages."""

import re

import pytest
import torch

from beitfast import ops
from beitfast.ops import dispatch


def attention_inputs(n=5):
    q, k, v = (torch.randn(1, 2, n, 8) for _ in range(3))
    return dict(q=q, k=k, v=v, bias_table=torch.randn(7, 2), rel_index=torch.randint(0, 7, (n, n)), scale=0.3)


@pytest.fixture
def toy_op(monkeypatch):
    """A private op with three backends, removed after the test."""
    monkeypatch.setitem(dispatch._REGISTRY, "toy", {})
    monkeypatch.setitem(dispatch._PREFERENCE, "toy", {"cpu": ["fast", "picky", "plain"]})

    def fast_check(x):
        return [] if x.shape[0] % 2 == 0 else ["fast takes even lengths only"]

    dispatch.register("toy", "plain", dispatch.accepts_all)(lambda x: "plain")
    dispatch.register("toy", "picky", lambda x: ["picky refuses everything"])(lambda x: "picky")
    dispatch.register("toy", "fast", fast_check)(lambda x: "fast")
    dispatch.register("toy", "absent", dispatch.accepts_all, lambda: "absent is not installed")(lambda x: "absent")
    return "toy"


def run(op, backend, x):
    return dispatch.select(op, backend, x=x).fn(x)


def test_auto_takes_the_first_backend_that_accepts(toy_op):
    assert run(toy_op, None, torch.zeros(2)) == "fast"
    assert run(toy_op, None, torch.zeros(3)) == "plain"
    assert run(toy_op, "auto", torch.zeros(3)) == "plain"


def test_explicit_backend_and_its_reasons(toy_op):
    assert run(toy_op, "plain", torch.zeros(2)) == "plain"
    with pytest.raises(ValueError, match="'fast' cannot take these inputs: fast takes even lengths only"):
        run(toy_op, "fast", torch.zeros(3))
    with pytest.raises(ValueError, match="absent is not installed"):
        run(toy_op, "absent", torch.zeros(2))
    with pytest.raises(ValueError, match=r"unknown toy backend 'nope'; known: \['plain', 'picky', 'fast', 'absent'\]"):
        run(toy_op, "nope", torch.zeros(2))


def test_error_lists_every_backends_reasons(toy_op, monkeypatch):
    monkeypatch.setitem(dispatch._PREFERENCE, "toy", {"cpu": ["fast", "picky"]})
    monkeypatch.delitem(dispatch._REGISTRY["toy"], "plain")
    with pytest.raises(ValueError) as err:
        run(toy_op, None, torch.zeros(3))
    message = str(err.value)
    for line in ("fast: fast takes even lengths only", "picky: picky refuses everything",
                 "absent: absent is not installed"):
        assert line in message


def test_environment_override(toy_op, monkeypatch):
    monkeypatch.setenv("BEITFAST_BACKEND", "plain")
    assert run(toy_op, "fast", torch.zeros(2)) == "plain"
    monkeypatch.setenv("BEITFAST_BACKEND", "toy=picky,attention=eager")
    with pytest.raises(ValueError, match="picky refuses everything"):
        run(toy_op, None, torch.zeros(2))
    # auto for an op: no override
    monkeypatch.setenv("BEITFAST_BACKEND", "toy=auto,attention=eager")
    assert run(toy_op, None, torch.zeros(2)) == "fast"
    assert run(toy_op, "plain", torch.zeros(2)) == "plain"
    # a global name another op has leaves this one on auto
    monkeypatch.setenv("BEITFAST_BACKEND", "sdpa")
    assert run(toy_op, None, torch.zeros(2)) == "fast"


@pytest.mark.parametrize(
    "value, message",
    [
        # a misspelt name used to leave every op silently on auto
        ("trtion", r"unknown backend 'trtion'; known backends: \['absent', .*'eager', .*'triton'.*\], or op=name "
                   r"pairs separated by commas with ops \['attention', 'cross_entropy', 'patch_embed', 'toy'\]"),
        # an unknown op, even when another op is the one selected
        ("attn=flex", r"unknown op 'attn'; known ops: \['attention', 'cross_entropy', 'patch_embed', 'toy'\]"),
        ("toy=plain,crossentropy=eager", "unknown op 'crossentropy'"),
        # a misspelt backend of another op than the one selected
        ("toy=plain,attention=flesh", r"unknown attention backend 'flesh'; known: \['auto', 'eager', .*'flex'"),
        ("toy=missing", r"unknown toy backend 'missing'; known: \['auto', 'plain', 'picky', 'fast', 'absent'\]"),
        # malformed entries
        ("toy=plain,eager", r"'eager' is not an op=name pair \(e.g. attention=eager\)"),
        ("toy=", "'toy=' is not an op=name pair"),
        ("toy=plain,", "'' is not an op=name pair"),
    ],
)
def test_environment_typos_are_errors_listing_the_known_names(toy_op, monkeypatch, value, message):
    monkeypatch.setenv("BEITFAST_BACKEND", value)
    with pytest.raises(ValueError, match=rf"^BEITFAST_BACKEND='{re.escape(value)}': {message}"):
        run(toy_op, None, torch.zeros(2))


def test_set_preference_refuses_what_would_never_apply(toy_op):
    for device_type in ("gpu", "cuda:0", None):
        with pytest.raises(ValueError, match=rf"device_type must be a torch device type .*, got {device_type!r}"):
            dispatch.set_preference(toy_op, device_type, ["plain"])
    with pytest.raises(TypeError, match="order must be a list of toy backend names, got 'plain'"):
        dispatch.set_preference(toy_op, "cpu", "plain")
    with pytest.raises(ValueError, match="unknown op"):
        dispatch.set_preference(["toy"], "cpu", ["plain"])
    assert dispatch.preference(toy_op, "cpu")[:3] == ["fast", "picky", "plain"]


def test_misspelt_checks_switch_is_an_error(monkeypatch):
    """BEITFAST_CHECKS=true used to leave the value checks off on CUDA, silently."""
    for value in ("0", "1", ""):
        monkeypatch.setenv("BEITFAST_CHECKS", value)
        assert dispatch.may_inspect_values(torch.zeros(3))
        assert not dispatch.may_inspect_values(torch.zeros(0))
    monkeypatch.setenv("BEITFAST_CHECKS", "true")
    with pytest.raises(ValueError, match="BEITFAST_CHECKS='true': must be 1 .*, 0 or unset"):
        dispatch.may_inspect_values(torch.zeros(3))


def test_backend_argument_must_be_a_name(toy_op):
    with pytest.raises(TypeError, match=r"backend must be None, 'auto' or a toy backend name .*, got \['fast'\]"):
        run(toy_op, ["fast"], torch.zeros(2))


def test_set_preference(toy_op):
    dispatch.set_preference(toy_op, "cpu", ["plain", "fast"])
    assert dispatch.preference(toy_op, "cpu")[:2] == ["plain", "fast"]
    assert run(toy_op, None, torch.zeros(2)) == "plain"
    with pytest.raises(ValueError, match="unknown toy backends"):
        dispatch.set_preference(toy_op, "cpu", ["warp"])


def test_every_op_has_an_eager_definition_and_cpu_auto_is_not_an_interpreter():
    for op in ("attention", "cross_entropy", "patch_embed"):
        assert "eager" in ops.backends(op)
    chosen = dispatch.select("attention", None, **attention_inputs())
    assert chosen.name in ("blas", "sdpa", "eager")


def test_explain_reports_without_running():
    reasons = ops.explain("attention", **attention_inputs())
    assert reasons["eager"] == [] and reasons["sdpa"] == []
    assert set(reasons) == set(ops.backends("attention"))
    with pytest.raises(ValueError, match="unknown op"):
        ops.explain("convolution")


def test_backends_agree_with_eager_on_cpu():
    inputs = attention_inputs(n=9)
    args = [inputs[k] for k in ("q", "k", "v", "bias_table", "rel_index", "scale")]
    want = ops.rel_pos_attention(*[a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args],
                                 backend="eager")
    got = ops.rel_pos_attention(*args, backend="sdpa")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
