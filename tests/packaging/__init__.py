"""Tests of guardd's Debian package."""
