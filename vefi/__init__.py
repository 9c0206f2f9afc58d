"""vefi: Visual Explanation by Interpretation (Oramas, Wang & Tuytelaars, ICLR 2019), reproduced in PyTorch.

The method on your own model and data (see :mod:`vefi.relevant`)::

    import vefi
    relevant = vefi.select_features(model, loader, mu=10)    # relevant features by mu-Lasso (Sec. 3.1)
    explanation = relevant.explain(images)                   # top-3 features of each prediction (Sec. 3.2)
    explanation.plot(0)
    averages = relevant.average_images(dataset, relevant.per_class[0][:3])  # interpretation (Sec. 4.1)

The general library (descriptors, selection, back-projection, the other explanation methods and the
metrics) takes any ``nn.Module`` and any data; :mod:`vefi.book` holds the book's datasets, networks and
cached studies, built on that library.
"""

from vefi.descriptors import Feature
from vefi.interpret import average_images
from vefi.layers import layer_table
from vefi.relevant import RelevantFeatures, select_features

__version__ = "0.1.0"

__all__ = ["Feature", "RelevantFeatures", "average_images", "layer_table", "select_features"]
