"""Prompt data: loaders for local files and Hugging Face datasets, plus bundled original sets."""

from cai.data.loaders import BUNDLED, Prompt, PromptSet, bundled_path, load_prompts, stable_id

__all__ = ["BUNDLED", "Prompt", "PromptSet", "bundled_path", "load_prompts", "stable_id"]
