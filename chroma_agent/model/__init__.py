"""The model layer: Chroma's checkpoint, config and weights, its layers and matmul planning,
the streaming Mimi codec, the processor, voices and code sampling. Imports nothing above it."""
