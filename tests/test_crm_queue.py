"""actors.crm: a chat's job queue is bounded, and a job its full queue refuses is given up, never dropped."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from actors.crm import QUEUE_CAPACITY, CrmSupervisor, LeadRequest
from tests.conftest import wait_for
from tests.fakes.krayin import FakeKrayin
from tests.fakes.server import running_server
from tests.test_crm import JID, PHONE, TOKEN, Events, crm_for, make_settings


async def test_a_job_refused_by_a_full_queue_is_given_up(autojump_clock: trio.testing.MockClock,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    fake = FakeKrayin(token=TOKEN)
    fake.down_for(3600)   # the first job keeps retrying, so the chat's later jobs wait in its queue
    async with crm_for(fake) as (crm, events):
        crm.submit(LeadRequest(JID, "Juan", PHONE, job_id=1))
        await wait_for(lambda: crm.statistics().running == 1, timeout=60)
        for job_id in range(2, QUEUE_CAPACITY + 2):
            crm.submit(LeadRequest(JID, "Juan", PHONE, job_id=job_id))
        assert crm.statistics().failed == 0
        crm.submit(LeadRequest(JID, "Juan", PHONE, job_id=9999))
        await events.wait_done(1, timeout=1)   # at once: it does not wait for the chat's queue
        stats = crm.statistics()
        crm.submit(LeadRequest("5491100000000@s.whatsapp.net", "Ana", None, job_id=7))   # other chats still queue
        assert crm.statistics().queued == QUEUE_CAPACITY + 1
    assert [(request.job_id, outcome) for request, outcome in events.done] == [(9999, "failed")]
    assert (stats.failed, stats.running, stats.queued) == (1, 1, QUEUE_CAPACITY)
    [failure] = stats.failures
    assert (failure.jid, failure.job_id, failure.attempts) == (JID, 9999, 0)
    assert "cola llena" in failure.error
    assert f"[CRM] Fallo al registrar lead para user_id={JID}: cola llena" in caplog.text


async def test_a_job_refused_before_run_is_settled_once_it_runs() -> None:
    fake = FakeKrayin(token=TOKEN)
    async with running_server(fake) as url:
        events = Events()
        crm = CrmSupervisor(make_settings(url + "/api/v1"), on_lead=events.on_lead, on_done=events.on_done)
        for job_id in range(1, QUEUE_CAPACITY + 2):
            crm.submit(LeadRequest(JID, "Juan", PHONE, job_id=job_id))
        before = crm.statistics()
        async with trio.open_nursery() as nursery:
            await nursery.start(crm.run)
            await events.wait_done(QUEUE_CAPACITY + 1)
            nursery.cancel_scope.cancel()
    assert (before.failed, before.queued) == (1, QUEUE_CAPACITY)
    assert events.done[0][0].job_id == QUEUE_CAPACITY + 1 and events.done[0][1] == "failed"
    outcomes = [outcome for _, outcome in events.done[1:]]
    assert outcomes == ["created"] + ["skipped"] * (QUEUE_CAPACITY - 1)   # the queued ones, in order, one lead
    assert [request.job_id for request, _ in events.done[1:]] == list(range(1, QUEUE_CAPACITY + 1))
    assert len(fake.calls_to("POST", "/leads")) == 1
