"""API keys on the REST API, over real HTTP with real NATS."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import msgspec
import pytest
import pytest_asyncio
import websockets
from websockets.asyncio.client import connect as ws_connect

from gateway.api.auth import (
    caller_secret,
    check_exposure,
    check_settings,
    hash_key,
    is_loopback,
    key_entries,
)
from gateway.settings import Settings, SettingsError, load_settings
from sdk import AsyncComfyUISDK
from sdk.errors import ApiError as SdkApiError
from tests.conftest import own_broker, running_gateway, settings_on, start_gateway
from tests.test_gateway_api import TINY

KEY_A = "alpha-secret-4f1c9e"
KEY_B = "bravo-secret-77d02a"
WRONG = "wrong-secret-0b3e11"


@pytest_asyncio.fixture(scope="module")
async def keyed_gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """A gateway with two keys: one stored hashed, one given as `plain:`. One for the module:
    no test changes what the others read (no servers; a job or two queued)."""
    base = tmp_path_factory.mktemp("keyed")
    async with own_broker(base) as broker:
        keyed = settings_on(broker, base, api_keys=[hash_key(KEY_A), "plain:" + KEY_B])
        async with running_gateway(keyed) as url:
            yield url


async def test_no_key_is_401_with_a_bearer_challenge(keyed_gateway: str) -> None:
    async with httpx.AsyncClient(base_url=keyed_gateway) as client:
        for reply in (
            await client.get("/servers"),
            await client.post("/workflow/submit", json={"workflow": TINY}),
            # Basic without a password carries no key.
            await client.get("/servers", headers={"Authorization": "Basic dXNlcjo="}),
        ):
            assert reply.status_code == 401
            assert reply.headers["www-authenticate"].startswith("Bearer")
            body = reply.json()
            assert body["code"] == "unauthorized"
            assert "Authorization: Bearer" in body["message"] and "X-API-Key" in body["message"]


def basic(password: str) -> dict[str, str]:
    """Basic auth with the key as the password, for clients that only know user and password."""
    token = base64.b64encode(f"comfy:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


async def test_a_wrong_key_is_403_in_either_header(keyed_gateway: str) -> None:
    async with httpx.AsyncClient(base_url=keyed_gateway) as client:
        for headers in ({"Authorization": f"Bearer {WRONG}"}, {"X-API-Key": WRONG}, basic(WRONG)):
            reply = await client.get("/servers", headers=headers)
            assert reply.status_code == 403
            assert reply.json()["code"] == "forbidden"


async def test_either_key_in_either_header_is_let_in(keyed_gateway: str) -> None:
    async with httpx.AsyncClient(base_url=keyed_gateway) as client:
        for key in (KEY_A, KEY_B):
            for headers in ({"Authorization": f"Bearer {key}"}, {"X-API-Key": key}, basic(key)):
                assert (await client.get("/servers", headers=headers)).status_code == 200
        submitted = await client.post(
            "/workflow/submit", json={"workflow": TINY}, headers={"X-API-Key": KEY_B}
        )
        assert submitted.status_code == 202, submitted.text
        # A key may ask who it is: its caller id and role, nothing of the key.
        me = (await client.get("/whoami", headers={"X-API-Key": KEY_B})).json()
        assert me["role"] == "admin" and me["caller"].startswith("key-")
        assert KEY_B not in str(me)
        assert (await client.get("/whoami")).status_code == 401


async def test_the_sdk_sends_its_key(keyed_gateway: str) -> None:
    async with AsyncComfyUISDK(keyed_gateway, api_key=KEY_A) as sdk:
        assert await sdk.list_servers() == []
    async with AsyncComfyUISDK(keyed_gateway) as sdk:
        with pytest.raises(SdkApiError, match="API key"):
            await sdk.list_servers()


async def test_health_metrics_and_schema_need_no_key(keyed_gateway: str) -> None:
    async with httpx.AsyncClient(base_url=keyed_gateway) as client:
        assert (await client.get("/health")).status_code in (200, 503)  # 503: no log sink here
        assert (await client.get("/metrics")).status_code == 200
        assert (await client.get("/schema/openapi.json")).status_code == 200


async def test_the_dashboard_and_its_files_need_no_key_and_hold_no_data(
    keyed_gateway: str,
) -> None:
    async with httpx.AsyncClient(base_url=keyed_gateway) as client:
        page = await client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        script = await client.get("/static/js/app.js")
        assert script.status_code == 200
        assert script.headers["content-type"].startswith("text/javascript")
        # What the files lead to still needs the key; a path cannot leave the files' folder.
        assert (await client.get("/static/../servers")).status_code in (401, 404)
        assert (await client.get("/static/%2e%2e/auth.py")).status_code == 404


async def test_the_event_websocket_needs_a_key(keyed_gateway: str) -> None:
    ws_url = keyed_gateway.replace("http://", "ws://") + "/workflow/events/nosuchjob/ws"
    with pytest.raises(websockets.InvalidStatus):
        async with ws_connect(ws_url):
            pass
    # With the key the guard lets it through to the handler, which knows no such job.
    async with ws_connect(ws_url, additional_headers={"X-API-Key": KEY_A}) as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4404


async def test_keys_never_reach_the_logs(
    keyed_gateway: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    bodies = []
    async with httpx.AsyncClient(base_url=keyed_gateway) as client:
        for key in (KEY_A, WRONG):
            for headers in ({"Authorization": f"Bearer {key}"}, {"X-API-Key": key}):
                reply = await client.get("/servers", headers=headers)
                bodies.append(reply.text)
    # The refusal is logged, so the check below looks at real log lines.
    assert "refused an unknown API key" in caplog.text
    for secret in (KEY_A, WRONG, KEY_B):
        assert secret not in caplog.text
        assert all(secret not in body for body in bodies)


async def test_an_open_gateway_beyond_loopback_refuses_to_start(settings: Settings) -> None:
    # Binds 0.0.0.0 for a moment but fails before serving; no traffic is sent.
    exposed = msgspec.structs.replace(settings, host="0.0.0.0")
    with pytest.raises(SettingsError, match="api_keys") as refused:
        await start_gateway(exposed, asyncio.Event())
    assert "0.0.0.0" in str(refused.value)


def test_only_loopback_may_run_without_keys() -> None:
    for host in ("127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
        check_exposure(Settings(host=host), [])
    for host in ("0.0.0.0", "::", "", "192.168.1.20", "gpu-box.lan"):
        assert not is_loopback(host), host
        with pytest.raises(SettingsError, match="api_keys"):
            check_exposure(Settings(host=host), [])
    keyed = Settings(host="0.0.0.0", api_keys=["plain:k"])
    check_exposure(keyed, key_entries(keyed))


def test_keys_are_stored_as_digests() -> None:
    abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert hash_key("abc") == abc
    for entry in (abc, abc.upper(), "plain:abc", "user/al@plain:abc", "admin@" + abc.upper()):
        assert key_digests(Settings(api_keys=[entry])) == [abc.encode()]
    # One key twice would be two callers, or two roles, for the same client: refused.
    with pytest.raises(SettingsError, match="entry 3 repeats"):
        key_digests(Settings(api_keys=["plain:x", abc, "user@plain:abc"]))
    # A malformed entry may be a key written wrongly: the error gives its place, not its text.
    with pytest.raises(SettingsError, match="entry 2") as bad:
        key_digests(Settings(api_keys=[abc, "not-a-digest-s3cret"]))
    assert "s3cret" not in str(bad.value)
    with pytest.raises(SettingsError):
        key_digests(Settings(api_keys=["plain:"]))


def test_keys_come_from_the_environment(tmp_path: Path) -> None:
    environ = {"COMFYAUTOMATE_API_KEYS": f"plain:{KEY_A},{hash_key(KEY_B)}"}
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    loaded = load_settings(config_file=empty, environ=environ)
    assert key_digests(loaded) == [hash_key(KEY_A).encode(), hash_key(KEY_B).encode()]


def test_keys_with_roles_and_names_from_toml_and_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "keys.toml"
    config.write_text(
        'api_keys = [\n  "admin@plain:ops",\n  "user/alice@plain:a",\n'
        '  { key = "plain:b", role = "user", name = "bob" },\n  "plain:legacy",\n]\n'
        f'data_dir = "{tmp_path / "data"}"\n'
    )
    keys = check_settings(load_settings(config_file=config, environ={}))
    callers = [keys.caller(entry) for entry in keys.entries]
    assert [(c.id, c.admin) for c in callers[1:3]] == [("alice", False), ("bob", False)]
    assert callers[0].admin and callers[3].admin  # no role given: an admin key
    assert callers[0].id.startswith("key-") and callers[0].id != callers[3].id

    environ = {"COMFYAUTOMATE_API_KEYS": "user/alice@plain:a,admin@" + hash_key("ops")}
    from_env = key_entries(load_settings(config_file=_empty(tmp_path), environ=environ))
    assert [(e.role, e.name) for e in from_env] == [("user", "alice"), ("admin", None)]


def test_bad_names_are_refused_without_the_key_in_the_message() -> None:
    for entry in ("user/@plain:s3cret", "user/a b@plain:s3cret", "user/key-1@plain:s3cret"):
        with pytest.raises(SettingsError, match="entry 1") as bad:
            key_entries(Settings(api_keys=[entry]))
        assert "s3cret" not in str(bad.value)
    with pytest.raises(SettingsError, match="same name"):
        key_entries(Settings(api_keys=["user/a@plain:x", "admin/a@plain:y"]))


def test_an_unnamed_key_is_the_same_caller_after_a_restart_and_tells_nothing(
    tmp_path: Path,
) -> None:
    settings = Settings(api_keys=["user@plain:" + KEY_A], data_dir=str(tmp_path / "data"))
    first = check_settings(settings)
    again = check_settings(settings)  # a restart: the secret is read back from the data folder
    ident = first.caller(first.entries[0]).id
    assert again.caller(again.entries[0]).id == ident
    assert hash_key(KEY_A)[:16] not in ident and KEY_A not in ident
    secret = tmp_path / "data" / "caller-secret"
    assert secret.stat().st_mode & 0o077 == 0  # readable by its owner alone
    # Another secret (another system, or `caller_secret` set) gives another id.
    other = check_settings(msgspec.structs.replace(settings, caller_secret="x" * 40))
    assert other.caller(other.entries[0]).id != ident


def _empty(tmp_path: Path) -> Path:
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    return empty


def test_gateways_starting_together_agree_on_the_caller_secret(tmp_path: Path) -> None:
    settings = Settings(data_dir=str(tmp_path / "data"))
    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda _: caller_secret(settings), range(8)))
    assert len(set(made)) == 1 and len(made[0]) >= 32
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["caller-secret"]


def key_digests(settings: Settings) -> list[bytes]:
    return [entry.digest for entry in key_entries(settings)]
