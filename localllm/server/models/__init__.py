"""GET /health, /metrics, /v1/models; POST /tokenize, /detokenize: routes and their handler."""
