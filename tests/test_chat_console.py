"""scripts/chat.py against the service as a real process: a photo from the console (``--image``)
reaches a vision model (the OpenAI fake describing what it got) and its answer comes back."""

from __future__ import annotations

import sys

import trio

from actors.settings import PROJECT_ROOT
from tests.fakes.llm import TINY_PNG, OpenAIFake, describe_images
from tests.fakes.server import running_server
from tests.procs import ServiceProcess


async def test_a_photo_from_the_chat_console_is_described_by_a_vision_model(tmp_path) -> None:
    photo = tmp_path / "grifo.png"
    photo.write_bytes(TINY_PNG)
    llm = OpenAIFake(default=describe_images)
    async with running_server(llm) as llm_url:
        env = {"LLM_PROVIDER": "openai", "OPENAI_API_KEY": "sk-console", "OPENAI_BASE_URL": llm_url,
               "STORE": "memory", "DATA_DIR": str(tmp_path / "data"), "LOG_DIR": str(tmp_path / "logs"),
               "REORDER_DELAY_SECONDS": "0", "LOG_STDERR": "false"}
        with ServiceProcess(env, tmp_path / "service.log") as service:
            service.start()
            await service.wait_ready()
            done = await trio.run_process(
                [sys.executable, "scripts/chat.py", "--url", service.url, "--image", str(photo),
                 "--caption", "¿tiene arreglo?", "--once"],
                cwd=PROJECT_ROOT, capture_stdout=True, capture_stderr=True, check=False)
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    assert f"bot> Veo una imagen image/png de {len(TINY_PNG)} bytes." in out
    [request] = llm.requests
    assert request.json["messages"][-1]["content"][0] == {"type": "text", "text": "¿tiene arreglo?"}
