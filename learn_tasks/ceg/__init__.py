"""CEG: the frozen LLM that turns item text into content embeddings, and the embedding store."""
