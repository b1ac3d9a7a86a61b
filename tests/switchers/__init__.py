"""Tests of the switchers and the command runner they share."""
