"""Text side of distillation: class prompts and LLM-written class descriptions."""
