"""The chat page at `/`: the route (`api_router`) and its files (`static/`, served as they are)."""
