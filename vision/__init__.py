"""VLM adapters, visual-token pruning and VLM drafters (``mmspec.vision``)."""
