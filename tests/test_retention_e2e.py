"""Retention seen by clients: ``cursor_too_old`` over a real websocket (raw and through the
Python client), the ``prune`` op, and ``jobspine prune`` through the console script."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import trio

from transport import RunningServer
from transport.client import Reset, RoomCursor, open_client

from .conftest import wait_for_state
from .serving import raw, request, serving, token
from .test_cli import COMMAND, Served, serve_process

TRADE = {"symbol": "X", "side": "buy", "quantity": 1}


async def _finished(running: RunningServer, user: str = "alice") -> str:
    job = await running.runtime.create_job("trade", user, TRADE)
    await wait_for_state(running.runtime, job.id, timeout=10)
    return job.id


async def _admin_prune(running: RunningServer, **fields: object) -> dict[str, object]:
    async with raw(running, None) as ws:
        await ws.send_message(
            json.dumps({"op": "hello", "id": 0, "token": token("root", admin=True)})
        )
        await ws.get_message()
        reply = await request(ws, "prune", 1, **fields)
    assert reply["type"] == "reply", reply
    result: dict[str, object] = reply["result"]
    return result


async def test_cursor_too_old_over_a_websocket(tmp_path: Path) -> None:
    async with serving(tmp_path / "e2e.db") as running:
        runtime = running.runtime
        first = await _finished(running)
        cursor = await runtime._store.user_head("alice")
        second = await _finished(running)
        head = await runtime._store.user_head("alice")
        # A cursor before pruned events: a snapshot reset, not a replay with holes.
        result = await _admin_prune(running, older_than=0)
        assert result == {"jobs": 2, "events": result["events"], "batches": 1, "dry_run": False}
        assert runtime.epoch
        epoch = runtime.epoch
        async with raw(running) as ws:
            reply = await request(
                ws, "subscribe", 2, room="user:alice", cursor={"epoch": epoch, "seq": cursor}
            )
            joined = reply["result"]
            assert joined["recovered"] is False and joined["replayed"] == 0, joined
            assert joined["reset_reason"].startswith("cursor_too_old: "), joined
            assert joined["head"] == head and joined["snapshot"] == {"jobs": []}
            # A job of a pruned room is gone like any unknown job.
            gone = await request(ws, "subscribe", 3, room=f"job:{first}")
            assert (gone["type"], gone["code"]) == ("error", "unknown_job")
            # A cursor at the horizon continues with no gap: what came after the prune.
            third = await _finished(running)
            again = await request(
                ws, "subscribe", 4, room="user:alice", cursor={"epoch": epoch, "seq": head}
            )
            assert again["result"]["recovered"] is True, again
            assert again["result"]["replayed"] == again["result"]["head"] - head > 0
        assert second != third

        # Through the Python client: a Reset with the reason and the snapshot, then events.
        async with open_client(running.url, token("alice")) as client:
            await client.subscribe("user:alice", RoomCursor(epoch, cursor))
            with trio.fail_after(10):
                async for item in client.events():
                    assert isinstance(item, Reset), item
                    assert item.reason.startswith("cursor_too_old")
                    assert [job["id"] for job in item.snapshot["jobs"]] == [third]
                    break
                fourth = (await client.create("trade", TRADE))["id"]
                async for item in client.events():
                    assert not isinstance(item, Reset)
                    if item.job_id == fourth and item.state == "completed":
                        break
            assert client.counters.resets == 1


async def test_prune_op_refuses_bad_input(tmp_path: Path) -> None:
    async with serving(tmp_path / "bad.db") as running, raw(running, None) as ws:
        await ws.send_message(
            json.dumps({"op": "hello", "id": 0, "token": token("root", admin=True)})
        )
        await ws.get_message()
        for fields, code in (
            ({"older_than": -1}, "invalid_input"),
            ({"older_than": "1d"}, "bad_request"),
            ({"dry_run": 1}, "bad_request"),
            ({"keep": 1}, "bad_request"),
        ):
            reply = await request(ws, "prune", 5, **fields)
            assert (reply["type"], reply["code"]) == ("error", code), (fields, reply)


async def test_jobspine_prune_cli(tmp_path: Path) -> None:
    # Every submit has an idempotency key, and a job is kept while its key is: a short
    # window lets this one go.
    config = tmp_path / "config.toml"
    config.write_text("[runtime]\nidempotency_window = 0.5\n")
    async with serve_process(tmp_path / "data", extra=("--config", str(config))) as served:
        done = await served.cli("submit", "trade", json.dumps(TRADE), "--watch", "--json")
        assert done.returncode == 0, done.stderr
        await trio.sleep(1.0)  # past the key's window
        # Not an admin: refused with the auth status.
        refused = await served.cli("prune", "--older-than", "0")
        assert refused.returncode == 5 and "forbidden" in refused.stderr, refused
        bad = await served.cli("prune", "--older-than", "7 days")
        assert bad.returncode == 2 and "--older-than" in bad.stderr, bad
        served.tokens["root"] = _admin_token(served)
        dry = await served.cli("prune", "--older-than", "0s", "--dry-run", "--json", user="root")
        assert dry.returncode == 0, dry.stderr
        assert json.loads(dry.stdout) == {"jobs": 1, "events": 0, "batches": 0, "dry_run": True}
        kept = await served.cli("prune", user="root")  # the default policy: 7 days
        assert kept.returncode == 0 and "removed 0 finished jobs" in kept.stdout, kept
        real = await served.cli("prune", "--older-than", "0", user="root")
        assert real.returncode == 0, real.stderr
        assert real.stdout.startswith("removed 1 finished jobs and "), real.stdout
        jobs = await served.cli("jobs", "--json")
        assert json.loads(jobs.stdout) == []


def _admin_token(served: Served) -> str:
    out = subprocess.run(
        [*COMMAND, "token", "--user", "root", "--admin"],
        env=served.env(),
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()
