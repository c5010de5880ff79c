"""Voice notes to text (TRANSCRIBE_PROVIDER), through the provider's own SDK: OpenAI's transcription
endpoint (``audio.transcriptions.create``, the audio uploaded as a file named after its mimetype, e.g.
``audio.ogg``: the endpoint tells formats by the name) or Gemini with the audio as an ``inline_data``
part. Used for a voice note that arrives without Evolution's own ``speechToText`` (actors/media.py).
The SDKs are imported when a transcriber is built, so a service with TRANSCRIBE_PROVIDER=off never
imports them.
"""

from __future__ import annotations

from typing import Protocol

from typing import Any

import httpx2
import trio

from ..settings import Settings
from .base import ErrorKind, ProviderError
from .providers import GEMINI_DEFAULT_BASE_URL, OPENAI_DEFAULT_BASE_URL, empty_reply, missing_key, unexpected_error

# mimetype (without parameters) → the extension the transcription endpoint recognises
_EXTENSIONS = {"audio/ogg": "ogg", "audio/opus": "ogg", "audio/mpeg": "mp3", "audio/mp3": "mp3", "audio/mp4": "m4a",
               "audio/m4a": "m4a", "audio/x-m4a": "m4a", "audio/aac": "m4a", "audio/wav": "wav", "audio/x-wav": "wav",
               "audio/webm": "webm", "audio/flac": "flac", "audio/amr": "amr"}


def audio_file_name(mimetype: str) -> str:
    """``audio.<ext>`` for the mimetype (WhatsApp's voice notes: ``audio/ogg; codecs=opus`` → ``audio.ogg``)."""
    return f"audio.{_EXTENSIONS.get(mimetype.partition(';')[0].strip().lower(), 'ogg')}"


class Transcriber(Protocol):
    name: str

    async def transcribe(self, audio: bytes, mimetype: str) -> str:
        """The voice note's words. Raises ProviderError on any failure."""

    async def aclose(self) -> None: ...


class OpenAITranscriber:
    """``POST /audio/transcriptions`` (multipart) through one ``AsyncOpenAI`` client."""

    name = "openai"

    def __init__(self, settings: Settings) -> None:
        import openai

        self._model = settings.llm.openai_transcribe_model
        self._timeout = settings.llm.llm_timeout
        self._client: Any = None
        if settings.llm.openai_api_key:
            self._client = openai.AsyncOpenAI(api_key=settings.llm.openai_api_key, max_retries=0, timeout=self._timeout,
                                              base_url=settings.llm.openai_base_url or OPENAI_DEFAULT_BASE_URL)

    async def transcribe(self, audio: bytes, mimetype: str) -> str:
        import openai

        from .openai_provider import map_openai_error

        if self._client is None:
            raise missing_key(self.name)
        try:
            with trio.fail_after(self._timeout + 1):
                result = await self._client.audio.transcriptions.create(
                    model=self._model, file=(audio_file_name(mimetype), audio, mimetype.partition(";")[0] or "audio/ogg"))
        except trio.TooSlowError:
            raise ProviderError(ErrorKind.TIMEOUT, f"timeout after {self._timeout:g}s") from None
        except openai.OpenAIError as exc:
            raise map_openai_error(exc, self._timeout) from None
        except Exception as exc:
            raise unexpected_error(exc) from None
        text = getattr(result, "text", "") or ""
        if not text.strip():
            raise empty_reply("no transcript")
        return text.strip()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()


class GeminiTranscriber:
    """generateContent with the instruction and the audio as an ``inline_data`` part."""

    name = "gemini"

    def __init__(self, settings: Settings, instruction: str) -> None:
        from google import genai
        from google.genai import types

        self._types = types
        self._model = settings.llm.gemini_model
        self._timeout = settings.llm.llm_timeout
        self._instruction = instruction
        self._http: httpx2.AsyncClient | None = None
        self._client: Any = None
        if settings.llm.gemini_api_key:
            self._http = httpx2.AsyncClient(timeout=self._timeout)
            self._client = genai.Client(api_key=settings.llm.gemini_api_key, vertexai=False, http_options=types.HttpOptions(
                base_url=settings.llm.gemini_base_url or GEMINI_DEFAULT_BASE_URL,
                timeout=max(1, int(self._timeout * 1000)), httpx_async_client=self._http))

    async def transcribe(self, audio: bytes, mimetype: str) -> str:
        from google.genai import errors as genai_errors

        from .gemini_provider import map_gemini_error

        if self._client is None:
            raise missing_key(self.name)
        types = self._types
        contents = [types.Content(role="user", parts=[
            types.Part(text=self._instruction),
            types.Part.from_bytes(data=audio, mime_type=mimetype.partition(";")[0] or "audio/ogg")])]
        try:
            with trio.fail_after(self._timeout + 1):
                response = await self._client.aio.models.generate_content(model=self._model, contents=contents)  # type: ignore[arg-type]
        except trio.TooSlowError:
            raise ProviderError(ErrorKind.TIMEOUT, f"timeout after {self._timeout:g}s") from None
        except (genai_errors.APIError, httpx2.HTTPError) as exc:
            raise map_gemini_error(exc, self._timeout) from None
        except Exception as exc:
            raise unexpected_error(exc) from None
        text = response.text or ""
        if not text.strip():
            raise empty_reply("no transcript")
        return text.strip()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aio.aclose()
            self._client.close()
        if self._http is not None:
            await self._http.aclose()


def build_transcriber(settings: Settings, instruction: str) -> Transcriber | None:
    """The TRANSCRIBE_PROVIDER's transcriber (None when off)."""
    provider = settings.conversation.transcribe_provider
    if provider == "openai":
        return OpenAITranscriber(settings)
    if provider == "gemini":
        return GeminiTranscriber(settings, instruction)
    return None


__all__ = ["ProviderError", "Transcriber", "audio_file_name", "build_transcriber"]
