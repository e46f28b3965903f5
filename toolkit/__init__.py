"""lingogap: per-language SAE activation gaps, activation-aware LoRA, multilingual benchmarks.

Importing the package is cheap and never imports torch: `analysis` relies on `toolkit.store`.
"""

__version__ = "0.1.0"
