"""Average images: ranking, peak positions, crops and averages against a direct computation."""

import numpy as np
import pytest
import torch

from vefi.interpret import average_images, average_images_figure
from vefi.book.models import build_model
from vefi.receptive import receptive_fields


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    net = build_model("mnist").eval()
    images = torch.rand(30, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    features = [("conv2", 5), ("relu3", 7), ("conv1", 0), ("fc2", 3)]
    return net, images, features, average_images(net, images, features, top=6, batch_size=7,
                                                   show_progress=False)


def direct(net, images, layer_number, channel, top):
    """One image at a time: response = L2 norm of the channel's map (fc: |unit|), L1-normalised over the layer;
    peak = argmax of the map; crop by the receptive field, zero outside the image."""
    fields = receptive_fields(net)
    field = fields[layer_number]
    responses, peaks = [], []
    for image in images:
        with torch.no_grad():
            out = torch.nn.Sequential(*list(net.children())[:layer_number])(image[None])[0]
        norms = out.flatten(1).norm(dim=1) if out.dim() == 3 else out.abs()
        responses.append(float(norms[channel] / norms.sum()))
        if out.dim() == 3:
            p = int(out[channel].argmax())
            peaks.append((p // out.shape[-1], p % out.shape[-1]))
        else:
            peaks.append((0, 0))
    order = sorted(range(len(images)), key=lambda i: -responses[i])[:top]
    crops = []
    for i in order:
        top_, left, bottom, right = field.box(*peaks[i], clip=False) if not field.whole else (0, 0, 28, 28)
        crop = torch.zeros(1, bottom - top_, right - left)
        for y in range(top_, bottom):
            for x in range(left, right):
                if 0 <= y < 28 and 0 <= x < 28:
                    crop[:, y - top_, x - left] = images[i, :, y, x]
        crops.append(crop)
    return order, [responses[i] for i in order], torch.stack(crops).mean(0)


def test_against_direct_computation(setup):
    net, images, features, result = setup
    for (layer, channel), avg in zip(features, result):
        number = avg.feature.layer_number
        assert avg.feature.channel == channel
        order, responses, mean = direct(net, images, number, channel, 6)
        assert avg.indices.tolist() == order
        np.testing.assert_allclose(avg.responses, responses, rtol=1e-5)
        torch.testing.assert_close(avg.average, mean, rtol=1e-5, atol=1e-6)


def test_shapes_and_whole_image(setup):
    _, _, _, result = setup
    shapes = [tuple(a.average.shape) for a in result]
    assert shapes == [(1, 11, 11), (1, 19, 19), (1, 5, 5), (1, 28, 28)]
    assert [a.whole_image for a in result] == [False, False, False, True]


def test_uint8_image_set_like_data(setup):
    net, images, features, result = setup
    as_bytes = (images * 255).round().to(torch.uint8)
    again = average_images(net, as_bytes, features[:1], top=6, show_progress=False)
    assert again[0].indices.tolist() == result[0].indices.tolist()


def test_model_unchanged_and_bad_input(setup):
    net, images, features, _ = setup
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    average_images(net, images[:8], features[:2], top=2, show_progress=False)
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(m._forward_hooks for m in net.modules())
    net.eval()
    with pytest.raises(ValueError, match="top=40 is more than the 30"):
        average_images(net, images, features, top=40, show_progress=False)
    with pytest.raises(ValueError, match="top must be a positive int"):
        average_images(net, images, features, top=0, show_progress=False)
    with pytest.raises(ValueError, match="channel 64 out of range"):
        average_images(net, images, [("conv2", 64)], show_progress=False, top=2)
    with pytest.raises(ValueError, match="unknown layer"):
        average_images(net, images, [("conv9", 0)], show_progress=False, top=2)
    with pytest.raises(ValueError, match="features is empty"):
        average_images(net, images, [], show_progress=False, top=2)
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        average_images(net, bad, features, show_progress=False, top=2)


def test_figure(setup):
    _, _, _, result = setup
    fig = average_images_figure({0: result[:2], 3: result[2:]}, classes=[str(i) for i in range(10)], first_fc=9)
    assert len(fig.axes) == 4
    import matplotlib.pyplot as plt
    plt.close("all")
