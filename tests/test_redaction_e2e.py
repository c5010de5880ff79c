"""No secret reaches a log file in a full run with fake keys, including provider and Evolution errors,
nor the credentials of a ``scheme://user:password@host`` URL."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from tests.fakes.evolution import FakeEvolution
from tests.fakes.llm import Fail, OpenAIFake
from tests.fakes.server import running_server
from tests.payloads import upsert
from tests.procs import ServiceProcess

pytestmark = pytest.mark.slow

SECRETS = {
    "OPENAI_API_KEY": "sk-proj-FAKEopenai0123456789abcdef",
    "ANTHROPIC_API_KEY": "sk-ant-FAKEanthropic0123456789",
    "EVOLUTION_API_KEY": "evo-FAKE-api-key-0123456789",
    "KRAYIN_API_TOKEN": "krayin-FAKE-token-0123456789",
    "ADMIN_TOKEN": "admin-FAKE-token-0123456789",
    "WEBHOOK_SECRET": "hook-FAKE-secret-0123456789",
}
# Passwords in the URLs' authority (not registered as secrets: only the URL pattern can catch them).
URL_PASSWORDS = {"EVOLUTION_API_URL": "evoPASS-in-url-4711", "KRAYIN_API_URL": "krayinPASS-in-url-4711"}


async def test_no_secret_in_any_log_file(tmp_path: Path) -> None:
    llm = OpenAIFake(default=Fail(401))            # the primary rejects the key
    evolution = FakeEvolution(api_key="a-different-key", instances={"prueba-py-agent"})  # 401 on every send
    async with running_server(llm) as llm_url, running_server(evolution) as evo_url:
        env = {
            **SECRETS,
            "LLM_PROVIDER": "openai", "OPENAI_BASE_URL": llm_url + "/v1",
            "LLM_PROVIDER_FALLBACK": "anthropic", "ANTHROPIC_BASE_URL": "http://127.0.0.1:9",  # refused
            "EVOLUTION_API_URL": evo_url.replace("http://", f"http://evo-user:{URL_PASSWORDS['EVOLUTION_API_URL']}@"),
            "EVOLUTION_INSTANCE": "prueba-py-agent", "CRM_AUTO_REGISTER": "true",
            "KRAYIN_API_URL": f"http://krayin-user:{URL_PASSWORDS['KRAYIN_API_URL']}@127.0.0.1:9/api/v1",
            "GOOGLE_BOOKING_URL": "https://calendar.app.google/example",
            "DATA_DIR": str(tmp_path / "data"), "LOG_DIR": str(tmp_path / "logs"), "LOG_LEVEL": "DEBUG",
            "OUTBOUND_MAX_ATTEMPTS": "2", "OUTBOUND_MIN_GAP_SECONDS": "0", "REORDER_DELAY_SECONDS": "0",
        }
        with ServiceProcess(env, tmp_path / "service.out") as service:
            service.start()
            await service.wait_ready()
            headers = {"x-webhook-token": SECRETS["WEBHOOK_SECRET"]}
            admin = {"Authorization": f"Bearer {SECRETS['ADMIN_TOKEN']}"}
            async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
                for text in ("hola", "quiero una cita"):
                    assert (await client.post("/webhook", json=upsert(text), headers=headers)).status_code == 200
                await client.post("/webhook", json=upsert("sin token"))                  # 401
                with trio.fail_after(30):
                    while len(evolution.calls("/message/sendText")) < 2:
                        await trio.sleep(0.05)
                await trio.sleep(1.0)
                bodies = [await client.get(p, headers=admin) for p in ("/supervisors", "/actors", "/metrics")]
            await service.terminate()
    files = [p for p in (tmp_path / "logs").rglob("*") if p.is_file()] + [tmp_path / "service.out"]
    text = "\n".join(p.read_text(errors="replace") for p in files)
    assert "Error con LLM provider principal (openai)" in text       # the run really hit the error paths
    assert "Tried sendText with candidate=" in text
    assert "http://***@127.0.0.1" in text                           # the URLs were logged, without credentials
    for name, password in URL_PASSWORDS.items():
        assert password not in text, f"the password in {name} leaked into a log file"
        for response in bodies:
            assert password not in response.text, f"the password in {name} leaked into {response.url}"
    for name, secret in SECRETS.items():
        assert secret not in text, f"{name} leaked into a log file"
        for response in bodies:
            assert secret not in response.text, f"{name} leaked into {response.url}"
