"""`edgesdk serve`: an OpenAI-compatible local server (pip install "edgesdk[serve]").

app: routes and middleware; handlers: the chat/completions work and SSE; schemas: request bodies
and the error shape; worker: the thread that owns the model's sessions and slots; tools: tool
calls in and out of the chat template; metrics: Prometheus.
"""
