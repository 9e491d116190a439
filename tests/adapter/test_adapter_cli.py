"""The command line: `comfyautomate adapter ...` as `up`/the CLI will wire it."""

from __future__ import annotations

import argparse

import pytest

from gateway.settings import SettingsError
from plugins.comfyui import cli


def test_adapter_subcommand_parses_its_options():
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command")
    cli.add_parser(commands)
    args = parser.parse_args(
        [
            "adapter",
            "--server-id",
            "gpu-1",
            "--address",
            "10.0.0.5:8188",
            "--capacity",
            "3",
            "--weight",
            "2.5",
            "--label",
            "gpu=a100",
            "--label",
            "zone=eu",
            "--nats-url",
            "nats://n:4222",
            "--prefix",
            "test",
            "--storage",
            "nats",
        ]
    )
    assert args.handler is cli.main
    assert (args.server_id, args.address, args.capacity, args.weight) == (
        "gpu-1",
        "10.0.0.5:8188",
        3,
        2.5,
    )
    assert cli.parse_labels(args.label) == {"gpu": "a100", "zone": "eu"}
    assert (args.nats_url, args.subject_prefix, args.storage) == ("nats://n:4222", "test", "nats")


def test_a_label_needs_an_equals_sign():
    with pytest.raises(SettingsError, match="key=value"):
        cli.parse_labels(["gpu"])


def test_job_timeout_and_start_wait_reach_the_adapter_options():
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    base = ["--server-id", "gpu-1", "--address", "10.0.0.5:8188"]
    args = parser.parse_args([*base, "--job-timeout", "90", "--start-wait", "600"])
    options = cli._options(args)
    assert (options.default_timeout_s, options.start_wait_s) == (90.0, 600.0)
    defaults = cli._options(parser.parse_args(base))
    assert (defaults.default_timeout_s, defaults.start_wait_s) == (3600.0, 3600.0)


def test_times_of_zero_or_less_are_refused_with_the_flag_named():
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    base = ["--server-id", "gpu-1", "--address", "10.0.0.5:8188"]
    for flag in ("--job-timeout", "--start-wait", "--grace", "--ack-wait"):
        for value in ("0", "-5", "nan"):
            with pytest.raises(SettingsError, match=flag):
                cli._options(parser.parse_args([*base, flag, value]))
