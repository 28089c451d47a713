"""tether: the RLHF pipeline for Hugging Face causal language models.

Importing this package is cheap on purpose: torch, transformers and the other heavy
libraries are imported by the modules that use them, not here.
"""

__version__ = "0.1.0"
