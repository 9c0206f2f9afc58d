"""vefi: Visual Explanation by Interpretation (Oramas, Wang & Tuytelaars, ICLR 2019), reproduced in PyTorch."""

__version__ = "0.1.0"
