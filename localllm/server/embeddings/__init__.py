"""POST /v1/embeddings: the route (`api_router`) and its handler (`serving`)."""
