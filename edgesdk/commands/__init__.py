"""One module per CLI verb. Each defines ``register(subparsers)``; VERBS lists them in help order."""

VERBS = ["export", "info", "run", "chat", "serve", "bench", "eval", "targets", "doctor", "sign", "verify", "build", "package"]
