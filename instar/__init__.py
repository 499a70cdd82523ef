"""instar: grow a small language model through every stage of its training, offline.

Generate data with a local LLM, then carry a model through random init, pretraining, instruction
fine-tuning, preference fine-tuning and reasoning fine-tuning. Heavy libraries (torch, transformers,
llama_cpp) are imported lazily by the modules that need them, so `instar --help` starts fast.
"""

__version__ = "0.1.0"

