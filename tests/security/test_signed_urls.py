"""Signed output URLs: a result's URL opens without an API key while keys are on; a tampered,
expired or borrowed signature is refused (403); an unsigned URL still needs a key."""

from __future__ import annotations

import math
import time
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import msgspec
import pytest

from gateway.api.auth import caller_secret
from gateway.api.errors import ApiError
from gateway.api.signing import UrlSigner
from gateway.settings import Settings, SettingsError
from tests.e2e.conftest import running_system, tiny

KEY = "signed-urls-key-7f3a"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = {name: values[0] for name, values in parse_qs(parts.query).items()}
    query.update(changes)
    return parts._replace(query=urlencode(query)).geturl()


async def test_signed_urls_open_without_a_key_and_only_as_signed(settings: Settings) -> None:
    keyed = msgspec.structs.replace(settings, api_keys=[f"admin@plain:{KEY}"])
    async with running_system(keyed, headers=AUTH) as system:
        await system.add_server("a")
        async with httpx.AsyncClient(base_url=system.url, headers=AUTH, timeout=60) as http:
            results = []
            asked = time.time()
            for seed in (1, 2):
                reply = await http.post("/workflow/execute", json={"workflow": tiny(seed)})
                assert reply.status_code == 200, reply.text
                results.append(reply.json())
            output, other = (result["outputs"][0] for result in results)
            url = output["url"]
            assert results[0]["images"] == [url]
            query = parse_qs(urlsplit(url).query)
            assert set(query) == {"expires", "sig"}
            expires = int(query["expires"][0])
            week = 7 * 24 * 3600  # the default life
            assert asked + week <= expires <= math.ceil(time.time() + week)
            unsigned = f"{system.url}/images/{output['key']}"
            with_key = await http.get(unsigned)
            assert with_key.status_code == 200

        async with httpx.AsyncClient() as browser:  # no key at all
            opened = await browser.get(url)
            assert opened.status_code == 200, opened.text
            assert opened.content == with_key.content
            assert opened.headers["content-type"] == "image/png"
            assert opened.headers["x-content-type-options"] == "nosniff"  # served as safely
            max_age = int(opened.headers["cache-control"].split("max-age=")[1].split(",")[0])
            assert max_age <= expires - time.time() + 1  # no cache keeps it past its expiry
            ranged = await browser.get(url, headers={"Range": "bytes=1-3"})
            assert ranged.status_code == 206 and ranged.content == with_key.content[1:4]

            assert (await browser.get(unsigned)).status_code == 401

            sig = query["sig"][0]
            flipped = sig[:-1] + ("A" if sig[-1] != "A" else "B")
            other_sig = parse_qs(urlsplit(other["url"]).query)["sig"][0]
            refused = [
                _with_query(url, sig=flipped),
                _with_query(url, expires=str(expires + 1)),  # a longer life than signed
                _with_query(url, sig=other_sig),  # another output's signature
                _with_query(other["url"], sig=sig),
                _with_query(url, sig=""),
                _with_query(url, expires="soon"),
                f"{unsigned}?expires={expires}",  # no signature
                f"{unsigned}?sig={sig}",  # no expiry
            ]
            for bad in refused:
                reply = await browser.get(bad)
                assert reply.status_code == 403, (bad, reply.text)
                assert reply.json()["code"] == "invalid_signature", bad
            # A key does not make a wrong signature right: the signature decides.
            assert (await browser.get(refused[0], headers=AUTH)).status_code == 403

            # Signed as the gateway signs, an hour too early for a one-hour life: expired.
            signer = UrlSigner(caller_secret(keyed), 3600)
            stale = signer.url(system.url, output["key"], now=time.time() - 7200)
            reply = await browser.get(stale)
            assert reply.status_code == 403, reply.text
            assert reply.json()["code"] == "url_expired"
            fresh = signer.url(system.url, output["key"])
            assert (await browser.get(fresh)).status_code == 200


def test_signing_off_hands_out_plain_urls_and_accepts_no_signature() -> None:
    plain = UrlSigner(b"", 0)
    assert plain.url("http://gw", "job1/a b.png") == "http://gw/images/job1/a%20b.png"
    signed = UrlSigner(b"s" * 32, 3600).url("http://gw", "job1/a.png")
    query = {name: values[0] for name, values in parse_qs(urlsplit(signed).query).items()}
    with pytest.raises(ApiError) as refused:
        plain.check("job1/a.png", query["expires"], query["sig"])
    assert (refused.value.status, refused.value.code) == (403, "invalid_signature")


@pytest.mark.parametrize("ttl", [-1.0, math.inf, math.nan])
def test_a_life_that_is_no_time_is_refused_at_start(ttl: float, tmp_path: Path) -> None:
    settings = Settings(data_dir=str(tmp_path), output_url_ttl_s=ttl)
    with pytest.raises(SettingsError, match="output_url_ttl_s"):
        UrlSigner.from_settings(settings, caller_secret)
