"""The training knobs of the embedded default (head lr multiplier, head weight decay, fixed logit
scale, head bias init) do what they say, and at their neutral values training is open_clip's
recipe bit for bit: checked against open_clip_train's own AdamW set-up, written out here."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.clip.loss import SparseClipObjective
from pipeline.clip.model import build_model
from pipeline.clip.recipe import RecipeStep, lr_at, make_optimizer, param_groups
from pipeline.config import ModelParams, OptimParams, load_params

from .test_model_loss import batch, micro

CPU = torch.device("cpu")
OPTIM = OptimParams(lr=1e-3, weight_decay=0.2, warmup_steps=2)


def train(model_params, optim: OptimParams, steps: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(model_params)
    recipe = RecipeStep(model, make_optimizer(model, optim), SparseClipObjective(model_params), optim, steps)
    for step in range(steps):
        images, texts = batch(8, seed=step)
        recipe({"image": images, "text": texts}, step)
    return model


def open_clip_reference(model_params, optim: OptimParams, steps: int = 4, seed: int = 0, fused: bool = True):
    """open_clip_train's main.py optimiser and train.py step, independent of pipeline.clip.train. The
    pipeline runs torch's fused AdamW (open_clip's default is for-each): ``fused=False`` is
    open_clip exactly, equal to the fused update to rounding."""
    torch.manual_seed(seed)
    model = build_model(model_params)
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad], "weight_decay": optim.weight_decay}],
        lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, fused=fused)
    loss = SparseClipObjective(model_params)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, optim.warmup_steps, optim.lr)
        images, texts = batch(8, seed=step)
        optimizer.zero_grad()
        loss(model(images, texts))["loss"].backward()
        optimizer.step()
        with torch.no_grad():
            model.clip.logit_scale.clamp_(0, math.log(model_params.logit_scale_cap))
    return model


def states_equal(a, b, keys=None) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in (keys or sa))


def test_neutral_knobs_are_open_clips_recipe_bit_for_bit():
    model_params = micro(expansion=4, logit_scale_cap=50)
    explicit = OPTIM.model_copy(update={"head_lr_multiplier": 1.0, "head_weight_decay": OPTIM.weight_decay})
    reference = open_clip_reference(model_params, OPTIM)
    assert states_equal(train(model_params, OPTIM), reference)
    assert states_equal(train(model_params, explicit), reference)
    assert states_equal(train(micro(expansion=4, logit_scale_cap=50, logit_scale_mode="learnable",
                                    head_bias_init=None), OPTIM), reference)
    # open_clip's own for-each AdamW makes the same update, to rounding (one step from the same
    # state: after that, the attention key biases, whose true gradient is zero, move on noise)
    fused, for_each = (open_clip_reference(model_params, OPTIM, steps=1, fused=f).state_dict() for f in (True, False))
    assert all(torch.allclose(v, for_each[k], rtol=1e-6, atol=1e-8) for k, v in fused.items())
    # and training really moved the weights (the comparison is not between two untouched models)
    torch.manual_seed(0)
    assert not states_equal(build_model(model_params), reference)


def test_head_multiplier_reaches_only_the_heads():
    model_params = micro(expansion=4)
    fast = OPTIM.model_copy(update={"head_lr_multiplier": 10.0})
    model = build_model(model_params)
    scaled = {id(p) for g in param_groups(model, fast) if g["lr_scale"] == 10.0 for p in g["params"]}
    heads = {id(p) for n, p in model.named_parameters() if n.startswith(("image_head.", "text_head."))}
    assert scaled == heads and len(heads) == 4  # weight and bias of each tower's head

    # One step of Adam moves each weight by ~lr, so the heads move 10x as far; nothing else changes.
    start = build_model(model_params)
    torch.manual_seed(0)
    start.load_state_dict(build_model(model_params).state_dict())
    neutral, boosted = train(model_params, OPTIM, steps=1), train(model_params, fast, steps=1)
    others = [k for k in start.state_dict() if not k.startswith(("image_head.", "text_head."))]
    assert states_equal(neutral, boosted, others)
    for key in ("image_head.linear.weight", "text_head.linear.bias"):
        moved = boosted.state_dict()[key] - start.state_dict()[key]
        expected = 10.0 * (neutral.state_dict()[key] - start.state_dict()[key])
        assert torch.allclose(moved, expected, rtol=1e-4, atol=1e-7), key


def test_head_weight_decay_applies_to_head_weights_only():
    groups = param_groups(build_model(micro(expansion=4)), OPTIM.model_copy(update={"head_weight_decay": 0.0}))
    head_weights = [g for g in groups if g["lr_scale"] == 1.0 and any(p.shape == (64, 16) for p in g["params"])]
    by_decay = {(g["weight_decay"], len(g["params"])) for g in groups}
    assert len(groups) == 4 and head_weights
    assert all(g["weight_decay"] in (0.0, OPTIM.weight_decay) for g in groups)
    assert sum(n for decay, n in by_decay if decay == OPTIM.weight_decay) > 0


def test_fixed_logit_scale_does_not_move_and_learnable_does():
    params = micro(expansion=4, logit_scale_cap=20, logit_scale_mode="fixed", init_logit_scale=None)
    start = build_model(params).logit_scale.detach().clone()
    fixed = train(params, OPTIM)
    assert start.item() == pytest.approx(math.log(20)) and not fixed.logit_scale.requires_grad
    assert torch.equal(fixed.logit_scale.detach(), start)  # held at the cap, to the bit
    learnable = train(micro(expansion=4, logit_scale_cap=20), OPTIM)
    assert learnable.logit_scale.item() != pytest.approx(math.log(1 / 0.07), abs=1e-6)


def test_init_above_the_cap_starts_at_the_cap():
    """open_clip clamps after every step; a cap below the default start (Fig 2c's 5 and 10) starts at it."""
    assert build_model(micro(logit_scale_cap=5)).logit_scale.item() == pytest.approx(math.log(5))
    assert build_model(micro(logit_scale_cap=50)).logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_head_bias_init_sets_only_the_biases():
    torch.manual_seed(0)
    default = build_model(micro(expansion=4))
    torch.manual_seed(0)
    shifted = build_model(micro(expansion=4, head_bias_init=-0.5))
    for tower in ("image_head", "text_head"):
        assert torch.all(shifted.state_dict()[f"{tower}.linear.bias"] == -0.5)
    others = [k for k in default.state_dict() if not k.endswith("_head.linear.bias")]
    assert states_equal(default, shifted, others)  # no random numbers drawn or skipped


def test_knobs_are_validated_params(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  optim: {head_lr_multiplier: 0}\n  model: {logit_scale_mode: frozen}\n")
    with pytest.raises(ValueError) as err:
        load_params(path)
    assert "train.optim.head_lr_multiplier" in str(err.value) and "train.model.logit_scale_mode" in str(err.value)


def test_topk_with_a_negative_bias_start_is_refused_and_the_ablation_starts_it_at_torch_init():
    """ReLU(TopK) of pre-activations that all start below 0 is all-zero with zero gradient: such a
    head never trains."""
    from pipeline.clip.ablation import Point, point_model

    model = build_model(micro(expansion=4, head_bias_init=-50.0))
    model.image_head.activation = build_model(micro(expansion=4, activation="topk", topk=2)).image_head.activation
    images, texts = batch(8, seed=0)
    image = model(images, texts)["image_raw"]
    image.sum().backward()
    assert (image == 0).all() and (model.image_head.linear.weight.grad == 0).all()  # the failure refused below
    with pytest.raises(ValueError, match="head_bias_init -0.5 with activation topk"):
        ModelParams(**{**micro(expansion=4, head_bias_init=-0.5).model_dump(), "activation": "topk"})
    base = micro(expansion=4, head_bias_init=-0.5)
    started = point_model(base, Point("activation", "topk", 0, 0, {"activation": "topk"}, "embedded"))
    assert started.activation == "topk" and started.head_bias_init is None
    trained = train(started, OPTIM)
    assert (trained(images, texts)["image_raw"] != 0).any(1).all()
    assert point_model(base, Point("activation", "relu", 0, 0, {"activation": "relu"}, "embedded")).head_bias_init == -0.5
    assert point_model(base, Point("activation", "relu", 0, 0, {"activation": "relu"}, "paper")).head_bias_init is None
