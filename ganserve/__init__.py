"""ganserve's importable parts for users: `ganserve.client` (the REST client; no torch needed)."""
