"""POST /v1/completions: the route (`api_router`) and its handler (`serving`)."""
