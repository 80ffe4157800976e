"""The server's engine is the one generation engine (`tunesmith.generation`): continuous batching over every
served model, the same sampler and stop handling as `tunesmith generate`, chat and evaluation."""

from ..generation import GREEDY_BELOW, Engine, Event, QueueFull, Request, Row, SamplingParams, Served, Token

_Row = Row  # the per-row decoding state under the name this module gave it before the engine moved

__all__ = ["GREEDY_BELOW", "Engine", "Event", "QueueFull", "Request", "Row", "SamplingParams", "Served", "Token"]
