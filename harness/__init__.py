"""Cross-framework reproducibility harness (framework-free core).

    python -m harness run specs/demo.yaml

Importing this package never imports tensorflow, keras or torch.
"""

__version__ = "0.1.0"
