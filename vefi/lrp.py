"""Layer-wise relevance propagation (LRP): the class score redistributed, layer by layer, down to the pixels.

LRP (Bach et al. 2015; Montavon, Samek & Mueller 2018) starts from the score of the target class,
:math:`R^{(L)} = f_c(x)` on the target's output unit and zero elsewhere, and moves it one layer down at a time.
A layer with inputs :math:`x_i`, weights :math:`w_{ij}` and outputs :math:`z_j = \\sum_i x_i w_{ij} + b_j`
hands the relevance :math:`R_j` of output :math:`j` to its inputs in proportion to their contributions:

* **epsilon**: :math:`R_i = \\sum_j \\frac{x_i w_{ij}}{z_j + \\epsilon\\,\\mathrm{sign}(z_j)} R_j`.
  With :math:`\\epsilon \\to 0` (LRP-0) this is gradient x input; a larger :math:`\\epsilon` absorbs weak and
  contradictory contributions, so the map gets sparser and less noisy.
* **alpha-beta**: :math:`R_i = \\sum_j \\left(\\alpha \\frac{(x_i w_{ij})^+}{z_j^+}
  - \\beta \\frac{(x_i w_{ij})^-}{z_j^-}\\right) R_j` with :math:`\\alpha - \\beta = 1`; the bias joins the
  positive or negative part by its sign (Bach et al. 2015). ``alpha1beta0`` keeps only positive
  contributions, ``alpha2beta1`` also shows negative evidence.
* **z+** (deep Taylor decomposition, Montavon et al. 2017): :math:`R_i = \\sum_j \\frac{x_i w_{ij}^+}
  {\\sum_{i'} x_{i'} w_{i'j}^+} R_j`, the bias left out. For non-negative inputs (every layer after a ReLU)
  it equals ``alpha1beta0`` on a bias-free net; the two differ only through the bias.
* **z^B** for the first layer, whose inputs lie in a box :math:`[l, h]` (pixels in [0, 1]):
  :math:`R_i = \\sum_j \\frac{x_i w_{ij} - l_i w_{ij}^+ - h_i w_{ij}^-}
  {\\sum_{i'} x_{i'} w_{i'j} - l_{i'} w_{i'j}^+ - h_{i'} w_{i'j}^-} R_j`.
* **composite** (Montavon et al. 2019's recommendation, as zennit's ``EpsilonPlus``/``EpsilonGammaBox``):
  z^B for the first layer, alpha1-beta0 (or z+) for the other convolutions, epsilon for dense layers.

Other layers: a ReLU, dropout (evaluation mode), flatten, reshapes, ``torch.cat`` and ``chunk`` pass relevance on
unchanged; a max-pool gives a pooled unit's relevance to its winner, the input that was the maximum (zennit does
the same: it leaves pools to the gradient); an average pool, ``mean`` and global pooling split it in proportion to
the inputs (zennit's ``Norm`` rule, here exact); local response normalisation passes relevance through as the
identity (zennit has no rule for it: configure ``Pass()`` to compare). Containers (``nn.Sequential``, also an
empty one, as shufflenet's ``branch1``) need no rule. Any other layer raises a ``TypeError``.

**Batch norm** in evaluation mode is an affine map, :math:`y = s\\,z + t` per channel with
:math:`s = \\gamma / \\sqrt{\\sigma^2 + \\epsilon_{bn}}` and :math:`t = \\beta - s \\mu`. When its input is the
output of a Conv2d or Linear layer (VGG's conv-bn-relu, ResNet's conv-bn and downsample, densenet's stem), the two are
*canonized* into one layer with weights :math:`s_j w_{ij}` and bias :math:`s_j (b_j - \\mu_j) + \\beta_j`, and that
layer's rule applies (Montavon et al. 2019; zennit's ``SequentialMergeBatchNorm``/``ResNetCanonizer``). Why: a
rule must see the layer's real output :math:`y_j` as its denominator; applied to the convolution alone it would
share out :math:`z_j` and then need a second rule for :math:`y_j = s_j z_j + t_j`, whose shift steals relevance
and whose scale can flip signs, so that z+ or alpha-beta would no longer see which contributions are positive.
The merge is computed on the fly from copies of the parameters: the user's model is never modified. A batch
norm whose input is no such output (densenet's pre-activation ``norm1``, which follows a concatenation and a
ReLU, cannot be merged) gets the epsilon rule as an element-wise linear layer,
:math:`R_z = \\frac{s z}{y + \\epsilon\\,\\mathrm{sign}(y)} R_y`.

**Residual sums** (torchvision ResNet's ``out += identity``, ``x + f(x)``): the sum :math:`y = a + b` of two
tensors that both carry relevance is a linear layer with unit weights and no bias, so it gets the epsilon rule,
:math:`R_a = \\frac{a}{y + \\epsilon\\,\\mathrm{sign}(y)} R_y` and the same for :math:`b`: each summand keeps the share
it contributed (zennit's canonizer does the same with its ``Sum`` layer and ``Norm`` rule). Why proportional:
it is what LRP does with the inputs of every layer; it is conservative, and a branch that contributed nothing
(a skip carrying zeros) gets nothing, where an even split would credit it with half. Why the epsilon:
where the two branches cancel (:math:`a \\approx -b`, :math:`y \\approx 0`) the shares :math:`a/y` and :math:`b/y`
are large and of opposite signs, and the map fills with that noise exactly as LRP-0 does at a convolution; the
epsilon absorbs it. The epsilon is the one of the rule the convolutions get: ``epsilon`` under
``rule="epsilon"`` (or a composite with ``conv_rule="epsilon"``), else ``stabilizer`` (zennit's choice for its
composites). The sums are caught at the level of torch functions (``+``, ``+=``, ``torch.add``, ``Tensor.add``);
a sum with a constant (a tensor that carries no relevance) is a bias and keeps the gradient.

A denominator that is exactly zero (possible with ``epsilon=0``: a ReLU'd zero map into a batch norm, a
cancelling sum) gives zero relevance, never NaN: its output is zero too, so there is nothing to share.

How: the *gradient trick*. Each weighted layer's output is replaced, in the forward pass, by
``z.detach() + g(x) - g(x).detach()``: the same value, but the gradient of ``g``, a modified forward pass
built so that gradient times input is the rule's relevance. One forward and one backward pass give the
relevance of every pixel of the batch; ``relevance = input * gradient`` (plus the box terms for z^B).
Forward hooks do the replacing, so in-place ReLUs are no trouble; they are removed in ``finally``. A merged
batch norm's hook replaces the output of the pair (the layer's own hook has already built its rule, which then
goes unused unless its output also feeds something else, where it is the right one). Residual sums are
replaced by a :class:`~torch.overrides.TorchFunctionMode` around the forward pass, which also refuses
functional nonlinearities without a rule.

Conservation: with zero biases and epsilon -> 0 the relevance entering each layer sums to the score;
:func:`relevance_sums` returns those sums for every layer so you can watch it.

Examples
--------
>>> import torch
>>> from vefi.book.models import build_model
>>> from vefi.lrp import lrp
>>> _ = torch.manual_seed(0)
>>> net = build_model("mnist")
>>> lrp(net, torch.rand(2, 1, 28, 28), target=3, rule="composite").shape
torch.Size([2, 1, 28, 28])
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vefi._model_state import gradients_on, preserved
from vefi._tensors import all_finite
from vefi.backproject import NonlinearityGuard
from vefi.layers import check_images
from vefi.targets import resolve_target

__all__ = ["RULES", "lrp", "relevance_sums"]

RULES = ("epsilon", "zplus", "alpha1beta0", "alpha2beta1", "composite")
LAYER_RULES = ("epsilon", "zplus", "alpha1beta0", "alpha2beta1", "zbox")

_WEIGHTED = (nn.Conv2d, nn.Linear)
_GRADIENT = (nn.ReLU, nn.Dropout, nn.Dropout2d, nn.Flatten, nn.Identity, nn.MaxPool2d, nn.AdaptiveMaxPool2d,
             nn.AvgPool2d, nn.AdaptiveAvgPool2d)
_IDENTITY = (nn.LocalResponseNorm,)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)  # no computation of their own, even when empty
_SUPPORTED = ("Conv2d, Linear, ReLU (module, in place or functional), MaxPool2d, AvgPool2d, Flatten, Dropout, "
              "BatchNorm, LocalResponseNorm, residual sums, containers")
_SUM_FUNCTIONS = (torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__)
_SUM_INPLACE_FUNCTIONS = (torch.Tensor.add_, torch.Tensor.__iadd__)


def _stabilise(z: torch.Tensor, eps: float) -> torch.Tensor:
    # sign(0) counts as +1, as zennit does, so that a zero denominator becomes eps (0 only when eps = 0)
    return z + eps * (torch.sign(z) + (z == 0).to(z))


def _ratio(z: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``z / denominator``, and 0 where the denominator is 0: that happens only with a zero stabiliser, where
    the output ``z`` is 0 too and has no relevance to share (0/0 would make the whole map NaN)."""
    zero = denominator == 0
    return torch.where(zero, torch.zeros_like(z), z / torch.where(zero, torch.ones_like(z), denominator))


def _layer_forward(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        return module._conv_forward(x, weight, bias)  # honours the padding mode
    return F.linear(x, weight, bias)


def _merged_parameters(layer: nn.Module, norm: nn.Module, norm_input: torch.Tensor):
    """Weight and bias of ``layer`` followed by the batch norm ``norm`` (evaluation mode) as one layer, new
    tensors (the model's own are not touched); None when the two cannot be merged."""
    if norm.running_mean is None or norm.running_var is None:
        return None  # no running statistics: the norm uses the batch's, it is no fixed affine map
    weight = layer.weight.detach()
    if norm.num_features != weight.shape[0] or (isinstance(layer, nn.Linear) and norm_input.dim() != 2):
        return None  # the norm's channels are not the layer's outputs
    scale = (norm.running_var.detach() + norm.eps).rsqrt()
    if norm.weight is not None:
        scale = scale * norm.weight.detach()
    bias = -norm.running_mean.detach() * scale
    if layer.bias is not None:
        bias = bias + layer.bias.detach() * scale
    if norm.bias is not None:
        bias = bias + norm.bias.detach()
    return weight * scale.view(-1, *([1] * (weight.dim() - 1))), bias


@dataclass
class _Pass:
    """One LRP pass: the rule of each layer and what the forward pass recorded."""
    rule: str
    epsilon: float
    stabilizer: float
    low: float | torch.Tensor
    high: float | torch.Tensor
    conv_rule: str
    dense_rule: str
    first_rule: str
    image: torch.Tensor | None = None
    boxes: list = field(default_factory=list)  # (low, high) leaves of every z^B term
    seen_first: bool = False
    inputs: list = field(default_factory=list)  # (name, input tensor, rule) of every weighted layer, forward order
    produced: dict = field(default_factory=dict)  # id(output) -> (output, layer, input, rule) of weighted layers
    record: bool = False
    busy: int = 0  # > 0 while a hook computes: its own sums are no residual sums

    def layer_rule(self, module: nn.Module) -> str:
        first = not self.seen_first
        self.seen_first = True
        if self.rule != "composite":
            return self.rule
        if first:
            return self.first_rule
        return self.conv_rule if isinstance(module, nn.Conv2d) else self.dense_rule

    @property
    def sum_epsilon(self) -> float:
        """The epsilon of residual sums: that of the rule the convolutions get (see the module docstring)."""
        conv = self.conv_rule if self.rule == "composite" else self.rule
        return self.epsilon if conv == "epsilon" else self.stabilizer


def _terms(module: nn.Module, x: torch.Tensor, rule: str, state: _Pass, weight: torch.Tensor, bias):
    """The modified forward passes ``f_k(x)`` and their denominators: relevance = x * grad(sum_k c_k f_k)."""
    if rule == "epsilon":
        f = _layer_forward(module, x, weight, bias)
        return [(f, 1.0, _stabilise(f.detach(), state.epsilon))]
    if rule in ("alpha1beta0", "alpha2beta1", "zplus"):
        alpha, beta = {"alpha1beta0": (1.0, 0.0), "alpha2beta1": (2.0, 1.0), "zplus": (1.0, 0.0)}[rule]
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        wp, wn = weight.clamp(min=0), weight.clamp(max=0)
        has_bias = bias is not None and rule != "zplus"  # deep Taylor's z+ leaves the bias out
        bp = bias.clamp(min=0) if has_bias else None
        positive = _layer_forward(module, xp, wp, bp) + _layer_forward(module, xn, wn, None)
        terms = [(positive, alpha, _stabilise(positive.detach(), state.stabilizer))]
        if beta:
            bn = bias.clamp(max=0) if has_bias else None
            negative = _layer_forward(module, xp, wn, bn) + _layer_forward(module, xn, wp, None)
            terms.append((negative, -beta, _stabilise(negative.detach(), state.stabilizer)))
        return terms
    if rule == "zbox":
        if state.image is None or x is not state.image:
            raise ValueError(f"the z^B rule takes the image as input; layer {type(module).__name__} gets the "
                             "output of another layer (apply z^B to the first layer only)")
        low = torch.as_tensor(state.low, dtype=x.dtype, device=x.device).expand_as(x).clone().requires_grad_(True)
        high = torch.as_tensor(state.high, dtype=x.dtype, device=x.device).expand_as(x).clone().requires_grad_(True)
        state.boxes.append((low, high))
        # the bias parts cancel (b - b+ - b- = 0), as in zennit's ZBox
        f = (_layer_forward(module, x, weight, None) - _layer_forward(module, low, weight.clamp(min=0), None)
             - _layer_forward(module, high, weight.clamp(max=0), None))
        return [(f, 1.0, _stabilise(f.detach(), state.stabilizer))]
    raise ValueError(f"unknown LRP layer rule {rule!r}; expected one of {', '.join(LAYER_RULES)}")


def _rule_output(module, x, output, rule, state, weight, bias) -> torch.Tensor:
    """The layer's output value, with the gradient of the rule: ``z + g - g.detach()``."""
    z = output.detach()
    state.busy += 1
    try:
        g = sum(sign * f * _ratio(z, denominator)
                for f, sign, denominator in _terms(module, x, rule, state, weight, bias))
        return z + (g - g.detach())
    finally:
        state.busy -= 1


class _DeferredRule(torch.autograd.Function):
    """A layer's output value whose gradient is the rule's, built only when the backward pass reaches it.

    A layer merged with the batch norm after it has its relevance moved by the merged rule; its own output goes
    to nothing but the norm, so building its own rule in the forward pass (as many convolutions again) would be
    wasted. When the output does go elsewhere too, the rule is built in the backward pass, same result."""

    @staticmethod
    def forward(ctx, x, z, make):
        ctx.make = make
        ctx.save_for_backward(x)
        return z.clone()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            (gx,) = torch.autograd.grad(ctx.make(leaf), leaf, grad)
        return gx, None, None


def _weighted_hook(name: str, state: _Pass):
    def hook(module, inputs, output):
        x = inputs[0]
        rule = state.layer_rule(module)
        state.inputs.append((name, x, rule))
        weight = module.weight.detach()
        bias = module.bias.detach() if module.bias is not None else None
        if rule == "zbox":  # its box leaves must exist in the forward pass: built now
            out = _rule_output(module, x, output, rule, state, weight, bias)
        else:
            z = output.detach()

            def make(leaf):
                return sum(sign * f * _ratio(z, denominator)
                           for f, sign, denominator in _terms(module, leaf, rule, state, weight, bias))

            out = _DeferredRule.apply(x, z, make)
        # a batch norm that takes this output merges with the layer (see _batchnorm_hook)
        state.produced[id(out)] = (out, module, x, rule)
        return out
    return hook


def _batchnorm_hook(state: _Pass):
    def hook(module, inputs, output):
        z_in = inputs[0]
        source = state.produced.get(id(z_in))
        if source is not None and source[0] is z_in:
            _, layer, x, rule = source
            merged = _merged_parameters(layer, module, z_in)
            if merged is not None:  # canonized: the layer's rule on layer and norm as one affine layer
                return _rule_output(layer, x, output, rule, state, *merged)
        # batch norm as an element-wise affine layer, epsilon rule: gradient times z / stabilised z
        z = output.detach()
        state.busy += 1
        try:
            return z + (output - z) * _ratio(z, _stabilise(z, state.epsilon))
        finally:
            state.busy -= 1
    return hook


def _identity_hook(module, inputs, output):
    # relevance passes unchanged: x * grad = y * upstream gradient, whatever the layer did to x
    x, y = inputs[0], output.detach()
    ratio = torch.where(x.detach() != 0, y / torch.where(x.detach() != 0, x.detach(), torch.ones_like(y)),
                        torch.zeros_like(y))
    return y + (x * ratio - (x * ratio).detach())


def _is_residual_sum(args, kwargs) -> bool:
    """``a + b`` of two tensors of one shape that both carry relevance (a tensor without is a bias)."""
    if len(args) != 2 or (kwargs and set(kwargs) != {"alpha"}) or kwargs.get("alpha", 1) != 1:
        return False
    a, b = args
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.is_floating_point()
            and b.is_floating_point() and a.shape == b.shape and a.requires_grad and b.requires_grad)


def _sum_rule(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    # gradient ratio y / (y + eps sign y) on both summands: R_a = a R_y / (y + eps sign y), and so for b
    y = a + b
    ratio = _ratio(y.detach(), _stabilise(y.detach(), eps))
    g = y * ratio
    return y.detach() + (g - g.detach())


class _LRPMode(NonlinearityGuard):
    """Refuse nonlinearities without a rule (see NonlinearityGuard); give residual sums the epsilon rule."""

    def __init__(self, model: nn.Module, state: _Pass):
        super().__init__(model, "propagate LRP relevance", _SUPPORTED)
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.state.busy:  # the hooks' own arithmetic
            return func(*args, **kwargs)
        inplace = func in _SUM_INPLACE_FUNCTIONS
        if (inplace or func in _SUM_FUNCTIONS) and _is_residual_sum(args, kwargs):
            out = _sum_rule(args[0], args[1], self.state.sum_epsilon)
            # in place as the model asked (copy_ keeps autograd's history right): whoever holds the tensor sees it
            return args[0].copy_(out) if inplace else out
        self.refuse(func)
        return func(*args, **kwargs)


def _check_rules(rule, conv_rule, dense_rule, first_rule) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown LRP rule {rule!r}; expected one of {', '.join(RULES)}")
    for label, value in (("conv_rule", conv_rule), ("dense_rule", dense_rule), ("first_rule", first_rule)):
        if value not in LAYER_RULES:
            raise ValueError(f"unknown {label} {value!r}; expected one of {', '.join(LAYER_RULES)}")
    if rule == "composite" and "zbox" in (conv_rule, dense_rule):
        raise ValueError("z^B is for the first layer only: pass it as first_rule")


def _check_numbers(epsilon, stabilizer, low, high, image_shape) -> None:
    """Every LRP hyper-parameter finite and in its range: a NaN epsilon gives NaN maps without a word."""
    for name, value, positive in (("epsilon", epsilon, False), ("stabilizer", stabilizer, True)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {value!r}")
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    bounds = []
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
            raise TypeError(f"{name} must be a number or a tensor broadcastable to one image {image_shape}, "
                            f"got {type(value).__name__}")
        value = torch.as_tensor(value, dtype=torch.float64).cpu()
        try:
            value = value.expand(image_shape)
        except RuntimeError:
            raise ValueError(f"{name} must be broadcastable to one image {image_shape}, got shape "
                             f"{tuple(value.shape)}") from None
        if not all_finite(value):
            raise ValueError(f"{name} (the input box of the z^B rule) must be finite, got NaN or Inf")
        bounds.append(value)
    if (bounds[0] > bounds[1]).any():
        raise ValueError("low must not exceed high (the input box of the z^B rule is [low, high])")


def _run(model, images, target, rule, epsilon, stabilizer, low, high, conv_rule, dense_rule, first_rule,
         record):
    images = check_images(images, model)
    _check_rules(rule, conv_rule, dense_rule, first_rule)
    _check_numbers(epsilon, stabilizer, low, high, tuple(images.shape[1:]))
    state = _Pass(rule, float(epsilon), float(stabilizer), low, high, conv_rule, dense_rule, first_rule,
                  record=record)
    handles = []
    with preserved(model), gradients_on(model):
        try:
            for name, module in model.named_modules():
                if isinstance(module, _WEIGHTED):
                    handles.append(module.register_forward_hook(_weighted_hook(name, state)))
                elif isinstance(module, _IDENTITY):
                    handles.append(module.register_forward_hook(_identity_hook))
                elif isinstance(module, _BATCHNORM):
                    handles.append(module.register_forward_hook(_batchnorm_hook(state)))
                elif isinstance(module, _GRADIENT + _CONTAINERS) or len(list(module.children())) > 0:
                    continue
                else:
                    raise TypeError(f"LRP has no rule for layer {name!r} ({type(module).__name__}); supported: "
                                    f"{_SUPPORTED}")
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            x = images.detach().clone().requires_grad_(True)  # created inside gradients_on, see there
            state.image = x
            # a nonlinearity called as a function in forward (F.gelu, torch.sigmoid) has no module to hook:
            # refuse it rather than pass it by its gradient; residual sums get their rule there too
            with _LRPMode(model, state):
                logits = model(x)
            target = resolve_target(target, logits)
            score = logits.gather(1, target[:, None])
            wanted = [x] + ([inp for _, inp, _ in state.inputs] if record else [])
            boxes = [leaf for box in state.boxes for leaf in box]
            grads = torch.autograd.grad(score.sum(), wanted + boxes, allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
            state.produced.clear()
    grads = [torch.zeros_like(w) if g is None else g for w, g in zip(wanted + boxes, grads)]
    relevance = x.detach() * grads[0]
    # the box terms of z^B (more than one pair when the first layer was also merged with a batch norm: the
    # unmerged pair then has zero gradient)
    for leaf, g in zip(boxes, grads[len(wanted):]):
        relevance = relevance + leaf.detach() * g
    if not record:
        return relevance
    sums = []
    for (name, inp, layer_rule), g in zip(state.inputs, grads[1:1 + len(state.inputs)]):
        r = relevance if inp is x else inp.detach() * g
        sums.append((name, r.reshape(r.shape[0], -1).sum(1)))
    sums.append(("output", score.detach()[:, 0]))
    return sums


def lrp(model: nn.Module, images: torch.Tensor, target=None, *, rule: str = "epsilon", epsilon: float = 0.25,
        stabilizer: float = 1e-6, low=0.0, high=1.0, conv_rule: str = "alpha1beta0",
        dense_rule: str = "epsilon", first_rule: str = "zbox") -> torch.Tensor:
    """LRP relevance of every input pixel and channel, (n, C, H, W), for the target class score.

    Parameters
    ----------
    model : nn.Module
        Made of Conv2d, Linear, ReLU (in place or not), MaxPool2d, AvgPool2d, Flatten, Dropout, BatchNorm and
        LocalResponseNorm modules in any containers (functional ReLU, global pooling, reshapes, ``torch.cat``
        and residual sums in ``forward`` are fine): torchvision's VGG, ResNet, DenseNet and ShuffleNetV2 are.
        A batch norm after a Conv2d or Linear layer is merged into it. Left unchanged.
    images : Tensor (n, C, H, W) or (C, H, W)
        Float images (pixels in [``low``, ``high``] for the z^B rule).
    target : None, int or LongTensor (n,)
        Class to explain; None = predicted. The seed relevance is that class's logit.
    rule : {"epsilon", "zplus", "alpha1beta0", "alpha2beta1", "composite"}
        One rule for every Conv2d and Linear layer, or the composite (``first_rule`` for the first weighted
        layer, ``conv_rule`` for the other convolutions, ``dense_rule`` for Linear layers).
    epsilon : float
        Of the epsilon rule (also used for a batch norm that cannot be merged, and for residual sums under the
        epsilon rule).
    stabilizer : float
        Added (with the denominator's sign) to the denominators of the other rules, to avoid 0/0; also the
        epsilon of residual sums when the convolutions get another rule than epsilon.
    low, high : float or Tensor broadcastable to one image
        The input box of the z^B rule.

    Returns
    -------
    Tensor (n, C, H, W)

    Raises
    ------
    TypeError
        A layer with no LRP rule (e.g. Sigmoid, Softmax), also a nonlinearity called as a function in the
        model's forward (``F.gelu``, ``torch.sigmoid``, ...); images of another dtype than the model's; a model
        that does not return a tensor of class scores.
    ValueError
        Unknown rule, NaN/Inf input, z^B on a layer that does not take the image, bad target; ``epsilon`` or
        ``stabilizer`` not finite or out of range, ``low``/``high`` not finite or ``low > high``.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3, bias=False), torch.nn.ReLU(),
    ...                           torch.nn.Linear(3, 2, bias=False))
    >>> x = torch.rand(1, 1, 2, 2)
    >>> r = lrp(net, x, target=0, epsilon=0.0)
    >>> torch.allclose(r.sum(), net(x)[0, 0], atol=1e-5)
    True
    """
    return _run(model, images, target, rule, epsilon, stabilizer, low, high, conv_rule, dense_rule, first_rule,
                record=False)


def relevance_sums(model: nn.Module, images: torch.Tensor, target=None, **options) -> list[tuple[str, torch.Tensor]]:
    """Total relevance entering every weighted layer, and the seed at the output: conservation at a glance.

    Takes the options of :func:`lrp`. Returns a list of ``(layer name, sums (n,))`` in forward order, the
    first entry being the input layer (its sums equal ``lrp(...).sum((1, 2, 3))``) and the last
    ``("output", target logit)``. With zero biases and ``epsilon=0`` every entry equals the last.

    Examples
    --------
    >>> import torch
    >>> from vefi.book.models import build_model
    >>> _ = torch.manual_seed(0)
    >>> net = build_model("mnist")
    >>> [name for name, _ in relevance_sums(net, torch.rand(1, 1, 28, 28))]
    ['conv1', 'conv2', 'conv3', 'fc1', 'fc2', 'fc3', 'output']
    """
    defaults = dict(rule="epsilon", epsilon=0.25, stabilizer=1e-6, low=0.0, high=1.0, conv_rule="alpha1beta0",
                    dense_rule="epsilon", first_rule="zbox")
    unknown = set(options) - set(defaults)
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}; expected some of {sorted(defaults)}")
    defaults.update(options)
    return _run(model, images, target, record=True, **defaults)
