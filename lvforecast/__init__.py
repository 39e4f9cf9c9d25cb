"""lvforecast: LoRA fine-tuning of language models as Lotka-Volterra forecasters under a FLOP budget.

Importing the package only defines names; it touches no disk, network or GPU.
"""

__version__ = "0.1.0"
