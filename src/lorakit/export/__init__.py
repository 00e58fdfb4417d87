"""GGUF out, for llama.cpp and Ollama: adapters in llama.cpp's LoRA format, merged models as GGUF models."""
