"""POST /v1/chat/completions: the route (`api_router`) and its handler (`serving`)."""
