"""The dispatcher: explicit choice, auto choice, the environment override and the error messages."""

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
    monkeypatch.setenv("BEITFAST_BACKEND", "toy=missing")
    with pytest.raises(ValueError, match="BEITFAST_BACKEND names toy backend 'missing'"):
        run(toy_op, None, torch.zeros(2))
    # a global name the op does not have leaves it on auto
    monkeypatch.setenv("BEITFAST_BACKEND", "sdpa")
    assert run(toy_op, None, torch.zeros(2)) == "fast"


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
    assert chosen.name in ("sdpa", "eager")


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
