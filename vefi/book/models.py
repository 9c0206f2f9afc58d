"""The book's models: one small CNN per dataset, flat ``nn.Sequential`` nets with named layers.

Every net has at least one strided convolution, at least one strided max-pool and two hidden fully connected
layers, so that the stride fix (chapter 4) and fully connected features (chapter 3) both matter. The
an8Flower net follows VGG-F (Chatfield et al. 2014) in spirit: a large 11x11 stride-4 first convolution, local
response normalisation, three max-pools, two hidden fully connected layers; narrower, for 2 CPU cores.

Beside them, the authors' kind of MNIST network (:func:`matconvnet_mnist`, architecture ``"matconvnet-mnist"``)
and one torchvision classifier (chapter 15).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from vefi.book.data import dataset_info
from vefi.layers import local_response_norm

__all__ = ["FastLocalResponseNorm", "VefiNet", "ARCHITECTURES", "build_model", "matconvnet_mnist", "small_cnn",
           "vggf_like"]

#: Other architectures the book trains on its datasets, besides its own net per dataset: the authors' kind of
#: MNIST network (:func:`matconvnet_mnist`, chapter 10) and a torchvision classifier (chapter 15, "Your own
#: network"). Each has a training schedule in :data:`vefi.book.train.ARCHITECTURE_HYPERPARAMS`.
ARCHITECTURES = ("matconvnet-mnist", "mobilenet_v3_small")


class VefiNet(nn.Sequential):
    """A sequential net that knows its input shape and class names, with its weights in channels-last layout.

    Channels-last (``torch.channels_last``, NHWC) is a layout of the same numbers, chosen for speed: on CPU
    the activations of a channels-last net are channels-last too, where PyTorch's max-pool is vectorised. On
    the book's 28x28 nets an ablation's forward passes run about 1.6 times as fast and a training step 1.4
    times (``make bench``: ``benchmarks/bench_layout.py``, which also times the an8Flower net, where the layout
    matters less than its :class:`FastLocalResponseNorm`). Inputs stay as they are (NCHW), and every result
    has the shape and the meaning it had.

    Parameters
    ----------
    layers : OrderedDict of str to nn.Module
        The layers, in forward order; their names (``conv1``, ``relu1``, ...) appear in every table.
    input_shape : tuple of int
        Shape of one input image, ``(channels, height, width)``; pixels are floats in [0, 1].
    classes : list of str
        Class names, one per output unit.
    """

    def __init__(self, layers: OrderedDict, input_shape: tuple[int, int, int], classes: list[str]):
        super().__init__(layers)
        self.to(memory_format=torch.channels_last)
        self.input_shape = tuple(input_shape)
        self.classes = list(classes)


class FastLocalResponseNorm(nn.LocalResponseNorm):
    """:class:`torch.nn.LocalResponseNorm` computed by :func:`vefi.layers.local_response_norm`, its window sum
    a 1x1 convolution with a banded matrix: the same function and gradient (a test checks both against
    PyTorch's), about twice as fast on CPU, where PyTorch's goes through a 3-D average pool and most of the
    an8Flower net's forward time went (``make bench``: ``benchmarks/bench_layout.py``).

    Being a ``LocalResponseNorm``, it is treated as one by every rule of :mod:`vefi` (layer kinds, LRP).
    """

    def forward(self, input):
        return local_response_norm(input, self.size, self.alpha, self.beta, self.k)


def small_cnn(in_channels: int = 1, size: int = 28, num_classes: int = 10) -> OrderedDict:
    """Layers of the MNIST / Fashion-MNIST net (28x28 -> 14 -> 7)."""
    side = size // 2 // 2
    return OrderedDict([
        ("conv1", nn.Conv2d(in_channels, 32, 5, padding=2)),
        ("relu1", nn.ReLU(inplace=True)),
        ("pool1", nn.MaxPool2d(3, stride=2, padding=1)),
        ("conv2", nn.Conv2d(32, 64, 3, stride=2, padding=1)),
        ("relu2", nn.ReLU(inplace=True)),
        ("conv3", nn.Conv2d(64, 64, 3, padding=1)),
        ("relu3", nn.ReLU(inplace=True)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(64 * side * side, 256)),
        ("relu4", nn.ReLU(inplace=True)),
        ("dropout1", nn.Dropout(0.3)),
        ("fc2", nn.Linear(256, 128)),
        ("relu5", nn.ReLU(inplace=True)),
        ("fc3", nn.Linear(128, num_classes)),
    ])


def vggf_like(num_classes: int, in_channels: int = 3) -> OrderedDict:
    """Layers of the an8Flower net for 112x112 input (112 -> 27 -> 13 -> 6 -> 2)."""
    return OrderedDict([
        ("conv1", nn.Conv2d(in_channels, 32, 11, stride=4, padding=2)),
        ("relu1", nn.ReLU(inplace=True)),
        ("norm1", FastLocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)),
        ("pool1", nn.MaxPool2d(3, stride=2)),
        ("conv2", nn.Conv2d(32, 64, 5, padding=2)),
        ("relu2", nn.ReLU(inplace=True)),
        ("pool2", nn.MaxPool2d(3, stride=2)),
        ("conv3", nn.Conv2d(64, 96, 3, padding=1)),
        ("relu3", nn.ReLU(inplace=True)),
        ("conv4", nn.Conv2d(96, 96, 3, padding=1)),
        ("relu4", nn.ReLU(inplace=True)),
        ("pool3", nn.MaxPool2d(3, stride=2)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(96 * 2 * 2, 256)),
        ("relu5", nn.ReLU(inplace=True)),
        ("dropout1", nn.Dropout(0.5)),
        ("fc2", nn.Linear(256, 256)),
        ("relu6", nn.ReLU(inplace=True)),
        ("dropout2", nn.Dropout(0.5)),
        ("fc3", nn.Linear(256, num_classes)),
    ])


def matconvnet_mnist(in_channels: int = 1, num_classes: int = 10) -> OrderedDict:
    """Layers of the authors' kind of MNIST network, MatConvNet's MNIST example (28x28 -> 24 -> 12 -> 8 -> 4 ->
    1): the network whose layer range 2-7 the authors' released demo explains. MatConvNet's ``res(i + 1)``
    holds the output of layer ``i``, so the range is the outputs of ``conv1`` to ``relu1``, every output but
    the classifier's and the softmax's.

    conv 5x5x20, max-pool 2/2, conv 5x5x50, max-pool 2/2, conv 4x4x500, ReLU, conv 1x1x10, all without padding.
    MatConvNet writes the two fully connected layers as convolutions: ``conv3``'s 4x4 kernel covers its whole
    4x4 input and gives one position, ``conv4`` is the classifier; ``flatten`` turns its 1x1 map into the
    logits. The strides are the max-pools' only: the stride fix (chapter 4) acts on them.
    """
    return OrderedDict([
        ("conv1", nn.Conv2d(in_channels, 20, 5)),
        ("pool1", nn.MaxPool2d(2, stride=2)),
        ("conv2", nn.Conv2d(20, 50, 5)),
        ("pool2", nn.MaxPool2d(2, stride=2)),
        ("conv3", nn.Conv2d(50, 500, 4)),
        ("relu1", nn.ReLU(inplace=True)),
        ("conv4", nn.Conv2d(500, num_classes, 1)),
        ("flatten", nn.Flatten()),
    ])


def build_model(dataset: str, architecture: str | None = None) -> nn.Module:
    """A freshly initialised (untrained) net for ``dataset``; see :data:`vefi.book.data.DATASETS`.

    ``architecture`` None builds the book's own net for the dataset (a :class:`VefiNet`); ``"matconvnet-mnist"``
    the authors' kind of MNIST network (a :class:`VefiNet` of :func:`matconvnet_mnist`, for 28x28 grayscale
    datasets); another name of :data:`ARCHITECTURES` builds that torchvision classifier, unchanged but for its
    number of outputs, with ``input_shape`` and ``classes`` attributes added as the book's nets have them.

    Initialisation follows ``torch``'s global generator: seed it first for a reproducible net.

    Examples
    --------
    >>> model = build_model("an8flower-single", "mobilenet_v3_small")
    >>> type(model).__name__, model.classifier[-1].out_features, model.input_shape
    ('MobileNetV3', 6, (3, 112, 112))
    >>> [name for name, _ in build_model("mnist", "matconvnet-mnist").named_children()]
    ['conv1', 'pool1', 'conv2', 'pool2', 'conv3', 'relu1', 'conv4', 'flatten']
    """
    info = dataset_info(dataset)
    if architecture == "matconvnet-mnist":
        if tuple(info.shape) != (1, 28, 28):
            raise ValueError(f"matconvnet-mnist takes 28x28 grayscale images and {dataset} has shape {info.shape}: "
                             f"use mnist or fashion-mnist, or the book's own net (architecture=None)")
        return VefiNet(matconvnet_mnist(1, len(info.classes)), info.shape, info.classes)
    if architecture is not None:
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {architecture!r}; the book trains {', '.join(ARCHITECTURES)} "
                             f"(or None, the book's own net for the dataset)")
        import torchvision

        if info.shape[0] != 3:
            raise ValueError(f"{architecture} takes colour images (3 channels) and {dataset} has {info.shape[0]}: "
                             f"use an an8Flower dataset, or the book's own net (architecture=None)")
        model = torchvision.models.get_model(architecture, weights=None, num_classes=len(info.classes))
        model.input_shape, model.classes = tuple(info.shape), list(info.classes)
        return model
    if info.shape[1] == 112:
        layers = vggf_like(len(info.classes), info.shape[0])
    else:
        layers = small_cnn(info.shape[0], info.shape[1], len(info.classes))
    return VefiNet(layers, info.shape, info.classes)

