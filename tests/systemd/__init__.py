"""Tests that boot a real systemd under systemd-nspawn."""
