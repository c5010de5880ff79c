"""The connection limits each LLM SDK client is given.

The chain's slots (actors/llm/slot.py: ``LLM_CONCURRENCY`` per provider, more for a fallback that
carries an open circuit's calls) are what bound the calls in flight. The SDKs' own pools keep fewer
idle connections than that: openai and anthropic 100, google-genai's httpx client 20. Past that
number, each connection a burst of calls opened beyond it is closed when the burst ends and opened
again for the next one: a TCP and TLS handshake per call. Measured with bench/llm_connections.py,
ten bursts of 32 calls 1 s apart (the default ``LLM_CONCURRENCY``) opened 140 connections to Gemini
instead of 32, and bursts of 128 opened 380 to OpenAI or Anthropic and 799 to Gemini instead of 128.
With no cap here the pool keeps every connection the slots' calls opened, each until it has been
idle for httpx's keep-alive expiry (5 s). (huggingface_hub's ``AsyncInferenceClient`` takes no
client of its own: only a process-wide factory, whose default hooks are private. It keeps its 20.)
"""

from __future__ import annotations

import httpx2

LLM_HTTP_LIMITS = httpx2.Limits(max_connections=None, max_keepalive_connections=None)
