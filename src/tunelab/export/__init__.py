"""From trained to used: a run or model as a file other runtimes load (GGUF for llama.cpp and Ollama,
or a merged safetensors checkpoint for plain transformers)."""
