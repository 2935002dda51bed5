"""The FastAPI service: loads model-repository entries, batches requests, serves images."""
