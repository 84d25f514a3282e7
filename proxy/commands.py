"""Subcommands beyond run and check-config register themselves here (imported by proxy.cli)."""
