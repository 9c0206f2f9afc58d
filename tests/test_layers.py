"""The one numbering of layers, and models left as they were found."""

import pytest
import torch
from torch import nn

from vefi._model_state import preserved
from vefi.layers import layer_kind, layer_table, resolve_layer
from vefi.book.models import build_model


class Branchy(nn.Module):
    """Modules declared in one order, called in another; a functional relu in between."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.body = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2), nn.ReLU(inplace=True))

    def forward(self, x):
        x = torch.relu(self.body(x)).flatten(1)
        return self.head(x[:, :8])


def test_numbering_follows_the_forward_pass_not_declaration():
    layers = layer_table(Branchy(), (1, 9, 9))
    assert [(layer.number, layer.name, layer.kind) for layer in layers] == [
        (1, "body.0", "conv"), (2, "body.1", "relu"), (3, "head", "fc")]
    assert layers[0].input_shape == (1, 9, 9) and layers[0].output_shape == (2, 4, 4)
    assert layers[2].output_shape == (3,) and layers[2].channels == 3


def test_model_left_as_found():
    model = build_model("mnist").train()
    model.conv1.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer_table(model)
    assert model.training and all(m.training for m in model.modules())
    assert not model.conv1.weight.requires_grad and model.fc1.weight.requires_grad
    assert all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_preserved_restores_on_error():
    model = build_model("mnist").train()
    with pytest.raises(RuntimeError):
        with preserved(model):
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            raise RuntimeError("boom")
    assert model.training and all(p.requires_grad for p in model.parameters())
    with pytest.raises(TypeError, match="nn.Module"):
        with preserved("not a model"):
            pass


def test_resolve_layer_by_number_name_and_errors():
    layers = layer_table(build_model("an8flower-single"))
    assert resolve_layer(layers, 1).name == "conv1"
    assert resolve_layer(layers, "fc2").kind == "fc"
    assert resolve_layer(layers, layers[4]) is layers[4]
    with pytest.raises(ValueError, match="unknown layer 'conv9'.*1='conv1' \\(conv\\)"):
        resolve_layer(layers, "conv9")
    with pytest.raises(ValueError, match="unknown layer 0"):
        resolve_layer(layers, 0)
    with pytest.raises(ValueError, match="unknown layer True"):
        resolve_layer(layers, True)


def test_input_shape_required_for_foreign_models():
    with pytest.raises(ValueError, match="input_shape"):
        layer_table(nn.Sequential(nn.Linear(2, 2)))


def test_kinds():
    assert layer_kind(nn.LocalResponseNorm(3)) == "lrn"
    assert layer_kind(nn.AdaptiveAvgPool2d(1)) == "pool"
    assert layer_kind(nn.GELU()) == "gelu"
    assert layer_kind(nn.Tanh()) == "other"
    assert layer_kind(nn.Sequential(nn.ReLU())) == "block"


def test_an_unknown_layer_of_a_large_model_names_the_closest():
    """A model of many layers: the error names the closest layer names, not all of them, and where the rest are."""
    model = nn.Sequential(*[nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU()) for _ in range(12)])
    layers = layer_table(model, (2, 4, 4))
    assert len(layers) > 20
    with pytest.raises(ValueError, match=r"unknown layer '11\.2'; the closest names: .*'11\.1' \(relu\).*"
                                         r"vefi\.layer_table\(model, input_shape\) lists them all") as err:
        resolve_layer(layers, "11.2")
    assert "'3.0'" not in str(err.value)
    with pytest.raises(ValueError, match=rf"unknown layer 'zzz'; this model has {len(layers)} layers"):
        resolve_layer(layers, "zzz")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_is_isfinite_all(dtype):
    """The check every tool makes on every batch, against torch's own (slow on a multi-threaded CPU)."""
    from vefi._tensors import all_finite

    big = torch.finfo(dtype).max
    cases = [torch.zeros(0, dtype=dtype), torch.rand(3, 4).to(dtype), torch.full((1000,), big, dtype=dtype)]
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.rand(2, 3, 5).to(dtype)
        t[1, 2, 3] = bad
        cases.append(t)
    for t in cases:
        assert all_finite(t) == bool(torch.isfinite(t).all()), t
    assert all_finite(torch.arange(5)) and all_finite(torch.tensor([True]))
