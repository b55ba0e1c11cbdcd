"""lmcache-supervise: a process supervisor for Dynamo + vLLM + LMCache deployments."""

__version__ = "0.1.0"
