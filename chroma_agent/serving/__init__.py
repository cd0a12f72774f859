"""The serving layer: the uvicorn runner with its drain, connection limits and log safety
shared by every `chroma-agent serve KIND`, and the OpenAI Realtime server. Imports the
runtime and model layers; FastAPI and uvicorn only inside the servers."""
