"""cai-lab: Constitutional AI and alignment-robustness experiments on open language models."""

__version__ = "0.1.0"
