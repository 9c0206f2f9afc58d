"""The book's part of vefi: its datasets (MNIST, Fashion-MNIST, an8Flower), its networks and their training,
the cached relevant features and studies its chapters show, the explorer and the command line.

Everything here is built on the general library's public API (``vefi.descriptors``, ``vefi.book.relevant``,
``vefi.explain``, the attribution methods and the metrics); nothing in the general library imports it.
"""
