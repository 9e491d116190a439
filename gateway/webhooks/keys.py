"""Which key signs a job's webhooks: its API key's `webhook_secret`, else the global one."""

from __future__ import annotations

from gateway.settings import ApiKey, Settings, SettingsError
from gateway.webhooks.signing import SecretError, secret_key


class SigningKeys:
    """The signing keys of the settings, by caller id (an API key's name)."""

    def __init__(self, settings: Settings) -> None:
        self._global = _key(settings.webhook_secret, "webhook_secret")
        self._by_caller: dict[str, bytes] = {}
        for position, entry in enumerate(settings.api_keys, 1):
            if not isinstance(entry, ApiKey) or entry.webhook_secret is None:
                continue
            if entry.name is None:
                # The caller id of an unnamed key is derived from a secret of each gateway;
                # a name is what ties a job to this key the same way everywhere.
                raise SettingsError(
                    f"api_keys entry {position} has a webhook_secret but no name: give it one"
                )
            key = _key(entry.webhook_secret, f"api_keys entry {position}'s webhook_secret")
            if key is not None:
                self._by_caller[entry.name] = key

    def for_caller(self, caller: str | None) -> bytes | None:
        """The key that signs the webhooks of `caller`'s jobs; None when none is set."""
        if caller is not None and caller in self._by_caller:
            return self._by_caller[caller]
        return self._global


def _key(secret: str | None, what: str) -> bytes | None:
    if secret is None:
        return None
    try:
        return secret_key(secret)
    except SecretError as exc:
        # The message names the setting, never the secret.
        raise SettingsError(f"{what}: {exc}") from None
