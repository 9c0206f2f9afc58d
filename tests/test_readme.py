"""The README's five lines run as written, on a model and data the repository does not ship."""

import re
from pathlib import Path

import matplotlib
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

matplotlib.use("Agg")

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block() -> str:
    text = README.read_text()
    section = text[text.index("## Using vefi on your own model"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_lines_run_on_a_new_model_and_loader():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.ReLU(), nn.Conv2d(6, 8, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    images_all = torch.rand(160, 3, 20, 20)
    labels = torch.arange(160) % 4
    images_all[labels == 1, 0] += 0.5  # something for the features to find
    loader = DataLoader(TensorDataset(images_all, labels), batch_size=16)
    images = images_all[:3]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scope = {"model": model, "loader": loader, "images": images}
    exec(readme_block(), scope)
    relevant, explanation, averages = scope["relevant"], scope["explanation"], scope["averages"]
    assert relevant.classes == (0, 1, 2, 3) and relevant.input_shape == (3, 20, 20)
    assert relevant.selector.converged_ and len(relevant.features) > 0
    assert explanation.heatmap.shape == (3, 20, 20) and torch.isfinite(explanation.heatmap).all()
    assert len(averages) == min(3, len(relevant.features))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
