"""The fast step around the fused ops, on CPU against the plain path: each option of ``BEiTConfig``
(``fuse_blocks``, ``residual_dtype``, ``checkpoint_blocks``) and of ``TrainConfig``
(``fused_optimizer``, ``compile``, ``cuda_graphs``, ``fp8``) keeps the numerics within tolerance and
compiles with ``fullgraph=True``."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from beitfast import BEiT, BEiTConfig
from beitfast.train import TrainConfig, pretrain


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> BEiTConfig:
    return BEiTConfig.tiny(**{"img_size": 32, "patch_size": 8, "depth": 4, "embed_dim": 32, "num_heads": 2,
                              "vocab_size": 16, "drop_path_rate": 0.3, "fuse_blocks": "off", **overrides})


def inputs(batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 32, 32, generator=g)
    mask = torch.rand(batch, 16, generator=g) < 0.4
    mask[:, 0] = True  # every image has a masked patch
    labels = torch.randint(0, 16, (batch, 16), generator=g)
    return images, mask, labels


def twins(**fast):
    """A plain model and one with the ``fast`` options, with the same (random, not initial) weights."""
    plain = BEiT(tiny())
    with torch.no_grad():
        for p in plain.parameters():  # layer scale, biases and tables off their constant initial values
            p.add_(torch.randn_like(p) * 0.05)
    model = BEiT(tiny(**fast))
    model.load_state_dict(plain.state_dict())
    return plain, model


def loss_and_grads(model, forward=None, seed=7, autocast=False):
    images, mask, labels = inputs()
    torch.manual_seed(seed)  # the drop-path draws
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        loss = (model if forward is None else forward)(images, bool_masked_pos=mask, labels=labels)
    params = [p for p in model.parameters()]
    return loss.detach(), torch.autograd.grad(loss, params)


def assert_same_step(plain, model, forward=None, rtol=1e-6, atol=1e-7):
    loss, grads = loss_and_grads(plain)
    fast_loss, fast_grads = loss_and_grads(model, forward)
    torch.testing.assert_close(fast_loss, loss, rtol=rtol, atol=atol)
    names = [name for name, _ in plain.named_parameters()]
    for name, got, want in zip(names, fast_grads, grads):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def count_attention_calls(model):
    calls = []
    for block in model.blocks:
        block.attn.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("checkpoint_blocks", [1, -1])
def test_checkpoint_blocks_match_plain(checkpoint_blocks):
    plain, model = twins(checkpoint_blocks=checkpoint_blocks)
    assert_same_step(plain, model)
    # Recomputation really happens: a checkpointed block runs its attention again in backward.
    calls = count_attention_calls(model)
    loss_and_grads(model)
    recomputed = 4 if checkpoint_blocks == -1 else checkpoint_blocks
    assert len(calls) == 4 + recomputed
    model.eval()  # no recomputation without training
    calls.clear()
    loss_and_grads(model)
    assert len(calls) == 4


@pytest.mark.slow
def test_fused_blocks_match_plain():
    """Each block through Inductor (CPU code here): same loss and gradients, drop path included, with
    a checkpointed block; the blocks share compiled graphs instead of compiling one each."""
    plain, model = twins(fuse_blocks="compile", checkpoint_blocks=1)
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    assert_same_step(plain, model, rtol=1e-4, atol=1e-6)
    # Four blocks: one graph for the block without drop path (rate 0), one for the other three.
    assert counters["stats"]["unique_graphs"] - graphs <= 2
    assert sum(counters["graph_break"].values()) == breaks  # each body is one whole graph
    plain.eval(), model.eval()
    images, _, _ = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images), plain.forward_features(images),
                                   rtol=1e-4, atol=1e-5)


def test_fuse_blocks_auto_is_plain_on_cpu():
    plain, model = twins(fuse_blocks="auto")
    graphs = counters["stats"]["unique_graphs"]
    assert_same_step(plain, model, rtol=0, atol=0)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled on CPU


def block_output_dtypes(model):
    dtypes = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    return dtypes


def test_residual_dtype_autocast():
    plain, model = twins(residual_dtype="autocast")
    # Without autocast there is nothing to round to: the very same computation.
    assert_same_step(plain, model, rtol=0, atol=0)
    # Under bfloat16 autocast the stream is bfloat16 (official: float32, as gamma * y promotes).
    plain_dtypes, fast_dtypes = block_output_dtypes(plain), block_output_dtypes(model)
    loss, grads = loss_and_grads(plain, autocast=True)
    fast_loss, fast_grads = loss_and_grads(model, autocast=True)
    assert set(plain_dtypes) == {torch.float32} and set(fast_dtypes) == {torch.bfloat16}
    torch.testing.assert_close(fast_loss, loss, rtol=2e-2, atol=0)
    for got, want in zip(fast_grads, grads):
        assert torch.isfinite(got).all() and got.dtype == want.dtype


def test_layer_norm_outputs_in_the_autocast_dtype():
    """Under autocast the attention and the MLP get bf16 LayerNorm outputs (the cast their linear
    layers make anyway, so the loss is the same); without autocast float32, untouched."""
    _, model = twins()
    seen = []
    for block in model.blocks:
        for module in (block.attn, block.mlp):
            module.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    loss_and_grads(model, autocast=True)
    assert seen and set(seen) == {torch.bfloat16}
    seen.clear()
    loss_and_grads(model)
    assert set(seen) == {torch.float32}


def loss_curve(config: BEiTConfig, steps=40, lr=3e-3):
    """Losses of ``steps`` AdamW steps under bfloat16 autocast on a fixed, learnable batch (the
    label of a patch is the sign pattern of its mean colour)."""
    torch.manual_seed(0)
    model = BEiT(config)
    images, mask, _ = inputs(batch=8, seed=3)
    means = images.unflatten(2, (4, 8)).unflatten(4, (4, 8)).mean((3, 5)).flatten(2)  # [B, 3, 16]
    labels = ((means > 0).long() * torch.tensor([1, 2, 4])[:, None]).sum(1)  # 8 tokens of 16
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        torch.manual_seed(100 + step)
        with torch.autocast("cpu", torch.bfloat16):
            loss = model(images, bool_masked_pos=mask, labels=labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_residual_dtype_autocast_loss_curve():
    """A short training run keeps the loss curve of the float32-residual path."""
    official = loss_curve(tiny(drop_path_rate=0.1))
    fast = loss_curve(tiny(drop_path_rate=0.1, residual_dtype="autocast"))
    assert official[-1] < 0.7 * official[0]  # the run learns, so the comparison means something
    assert fast[-1] < 0.7 * fast[0]
    gaps = [abs(a - b) / a for a, b in zip(official, fast)]
    assert max(gaps) < 0.05, gaps
    assert sum(gaps[-10:]) / 10 < 0.02, gaps


@pytest.mark.parametrize("fast", [{"residual_dtype": "autocast"}, {"checkpoint_blocks": -1},
                                  {"fuse_blocks": "compile", "checkpoint_blocks": 2}], ids=str)
def test_compiles_with_fullgraph(fast):
    """The whole model in one graph with each option (aot_eager: Dynamo and AOTAutograd, no code
    generation, so it stays fast on CPU); a compiled model runs the plain body of fused blocks."""
    plain, model = twins(**fast)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    graphs = counters["stats"]["unique_graphs"]
    assert_same_step(plain, model, forward=compiled, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] - graphs == 1


def test_fast_step_options_are_checked():
    for name, value in (("fuse_blocks", "yes"), ("residual_dtype", "bfloat16"), ("checkpoint_blocks", -2),
                        ("checkpoint_blocks", 1.5)):
        with pytest.raises((TypeError, ValueError), match=name):
            tiny(**{name: value})
    for name in ("fused_optimizer", "compile", "cuda_graphs", "fp8"):
        with pytest.raises(TypeError, match=name):
            TrainConfig(**{name: "yes"})


# -- trainer options -------------------------------------------------------------------------------


def _train_helpers():
    """The stand-in tokenizer and photos of tests/test_train.py (one definition of each)."""
    path = Path(__file__).with_name("test_train.py")
    spec = importlib.util.spec_from_file_location("train_test_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(tmp_path, name, **train_overrides):
    helpers = _train_helpers()
    config = TrainConfig(output_dir=str(tmp_path / name), steps=3, batch_size=4, warmup_steps=1, lr=2e-3,
                         checkpoint_every=3, progress=False, **train_overrides)
    model, records = pretrain(helpers.tiny_config(), helpers.MeanBrightnessTokenizer(), helpers.photos(),
                              config)
    return model, [r["loss"] for r in records]


def test_fused_optimizer_matches_plain_adamw(tmp_path):
    plain, plain_losses = run(tmp_path, "plain", fused_optimizer=False)
    fused, fused_losses = run(tmp_path, "fused", fused_optimizer=True)
    assert all(math.isfinite(x) for x in plain_losses)
    torch.testing.assert_close(fused_losses, plain_losses, rtol=1e-5, atol=0)
    for (name, want), got in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_trainer_compile_matches_eager(tmp_path, monkeypatch):
    """``TrainConfig.compile`` compiles the model the trainer runs; aot_eager stands in for Inductor
    to keep the test fast (the compiled path is the same up to code generation)."""
    compile_ = torch.compile
    calls = []

    def compile_with_aot_eager(model, **options):
        calls.append(options)
        return compile_(model, **{**options, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", compile_with_aot_eager)
    _, losses = run(tmp_path, "eager")
    assert not calls
    _, compiled_losses = run(tmp_path, "compiled", compile=True)
    assert calls == [{}]
    torch.testing.assert_close(compiled_losses, losses, rtol=1e-5, atol=0)


def test_cuda_only_options_refuse_on_cpu(tmp_path):
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device, this run is on cpu"):
        run(tmp_path, "graphs", cuda_graphs=True, device="cpu")
    with pytest.raises(ValueError, match=r"fp8: float8 linear layers need a CUDA GPU .* this run is on cpu"):
        run(tmp_path, "fp8", fp8=True, device="cpu")
