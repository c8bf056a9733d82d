"""What users call: the offline ``LLM`` class and the command line (``python -m entrypoints``)."""
from entrypoints.llm import LLM, GenerationStats

__all__ = ["LLM", "GenerationStats"]
